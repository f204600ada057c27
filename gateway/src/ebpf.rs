//! Kernel interception (the loader side of `gateway-ebpf/`).
//!
//! [`Interception::install_or_adopt`] loads the embedded object, attaches its programs to a
//! cgroup v2 directory (the cgroup v2 root in production, a subtree made by a test) and pins
//! maps, programs and links under a pin directory on bpffs. The pins keep interception in
//! place while the agent restarts or upgrades; the next agent adopts them instead of
//! detaching and re-attaching (which would let connections slip past in between).
//!
//! - `ebpf/intercept.rs`: what to intercept ([`InterceptConfig`]) and what the kernel
//!   reports back ([`OrigDst`]);
//! - `ebpf/maps.rs`: `#[repr(C)]` mirrors of the maps' keys and values;
//! - `ebpf/pins.rs`: the pin directory and the raw `bpf(2)` calls for pinned links.
//!
//! Ground floor: imports nothing of ours. Its defaults (pin directory,
//! intercepted port) are the ones `config` uses.

pub mod intercept;
pub mod maps;
pub mod pins;

use std::{
    collections::HashSet,
    fs::File,
    io,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps, links::FdLink},
};

use self::maps::{CidrKeyData, Config, Limits, OrigDstValue, PortKey, SockKey, cidr_key};

pub use self::intercept::{InterceptConfig, OrigDst};

/// The compiled `gateway-ebpf/intercept.bpf.c` (build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/intercept.bpf.o"));

/// Where bpffs is mounted by convention.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Default pin directory (`--bpf-pin-dir`).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/db-gateway";
/// Default intercepted destination port (any address): PostgreSQL's.
pub const DEFAULT_PORT: u16 = 5432;
/// Entries of each connection map (records of intercepted connections not closed yet, all
/// pods together): the object's `DBGW_MAX_CONNS`, overridden at load from configuration.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
/// Open intercepted connections one cgroup (a container) may hold; the next connect fails
/// with EPERM for that cgroup only, so one flooding pod cannot evict the others' records.
/// 4096 is far above a connection pool's size, and sixteen such floods still fit in the
/// default maps.
pub const DEFAULT_CONNECTIONS_PER_CGROUP: u32 = 4096;
/// `statfs.f_type` of bpffs (linux/magic.h `BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The errors of this module: every step says what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("failed to {what}: {cause}")]
    Step {
        what: String,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid interception config: {0}")]
    Config(String),
    #[error(
        "{0} is not on a bpf filesystem: mount one (`mount -t bpf bpf {BPFFS_ROOT}`, or \
         gateway::ebpf::ensure_bpffs) or choose a pin directory under it"
    )]
    NotBpffs(PathBuf),
    #[error(
        "pinned map {path} has {found} entries, the configuration says {expected} \
         (interception.max_connections): remove the installation (`gateway node uninstall`) \
         to change it, or keep the old size"
    )]
    PinnedMapSize {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "pinned map {path} has key/value size {found:?}, this agent expects {expected:?}: \
         it was made by an incompatible version; remove the installation (uninstall) first"
    )]
    IncompatiblePin {
        path: PathBuf,
        found: (u32, u32),
        expected: (u32, u32),
    },
}

/// Adds what a step was doing to its error (the aya-template `.context()` habit).
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, EbpfError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, EbpfError> {
        self.map_err(|e| EbpfError::Step {
            what: what(),
            cause: Box::new(e),
        })
    }
}

/// The program types of the object, as aya loads them.
enum Kind {
    SockAddr,
    SockOps,
    /// `cgroup/sock_release` (aya's `CgroupSock`).
    Sock,
}

/// One program of the object and how it attaches.
struct Hook {
    /// Function name in intercept.bpf.c (also used in pin names).
    name: &'static str,
    kind: Kind,
    /// uapi attach type, to recognise the pinned link.
    attach_type: u32,
}

/// Attach order: the hooks that publish, forget and reverse-translate first, the rewriting
/// connect hooks last, so no connection is ever rewritten without its record being looked
/// after.
const HOOKS: [Hook; 6] = [
    Hook {
        name: "dbgw_sockops",
        kind: Kind::SockOps,
        attach_type: pins::BPF_CGROUP_SOCK_OPS,
    },
    Hook {
        name: "dbgw_sock_release",
        kind: Kind::Sock,
        attach_type: pins::BPF_CGROUP_INET_SOCK_RELEASE,
    },
    Hook {
        name: "dbgw_getpeername4",
        kind: Kind::SockAddr,
        attach_type: pins::BPF_CGROUP_INET4_GETPEERNAME,
    },
    Hook {
        name: "dbgw_getpeername6",
        kind: Kind::SockAddr,
        attach_type: pins::BPF_CGROUP_INET6_GETPEERNAME,
    },
    Hook {
        name: "dbgw_connect4",
        kind: Kind::SockAddr,
        attach_type: pins::BPF_CGROUP_INET4_CONNECT,
    },
    Hook {
        name: "dbgw_connect6",
        kind: Kind::SockAddr,
        attach_type: pins::BPF_CGROUP_INET6_CONNECT,
    },
];

/// Expected (key, value) sizes of each pinned map, to refuse a pin left by an incompatible
/// version instead of sharing it with programs that read it differently.
fn expected_sizes(map: &str) -> (u32, u32) {
    use std::mem::size_of;
    let s = |k: usize, v: usize| (k as u32, v as u32);
    match map {
        maps::MAP_CONFIG => s(size_of::<u32>(), size_of::<Config>()),
        maps::MAP_PORTS => s(size_of::<PortKey>(), size_of::<u32>()),
        maps::MAP_CIDRS => s(
            size_of::<aya::maps::lpm_trie::Key<CidrKeyData>>(),
            size_of::<u32>(),
        ),
        maps::MAP_BY_COOKIE => s(size_of::<u64>(), size_of::<OrigDstValue>()),
        maps::MAP_BY_ADDR => s(size_of::<SockKey>(), size_of::<OrigDstValue>()),
        maps::MAP_CG_CONNS => s(size_of::<u64>(), size_of::<u32>()),
        maps::MAP_LIMITS => s(size_of::<u32>(), size_of::<Limits>()),
        maps::MAP_REFUSED => s(size_of::<u32>(), size_of::<u64>()),
        other => unreachable!("unknown map {other}"),
    }
}

/// Interception installed (or adopted) under a pin directory.
pub struct Interception {
    pin_dir: PathBuf,
    adopted: bool,
    cfg: InterceptConfig,
    serving: bool,
    config: Array<MapData, Config>,
    ports: HashMap<MapData, PortKey, u32>,
    cidrs: LpmTrie<MapData, CidrKeyData, u32>,
    limits: Array<MapData, Limits>,
    refused: PerCpuArray<MapData, u64>,
    by_addr: OrigDsts,
}

/// The original-destination records alone, for the agent's data plane: a lookup takes
/// `&self` (the map lives in the kernel), so every data-plane thread shares one without a
/// lock, while [`Interception`] stays with the control side that changes the config.
pub struct OrigDsts {
    by_addr: HashMap<MapData, SockKey, OrigDstValue>,
}

impl OrigDsts {
    fn open(pin_dir: &Path) -> Result<Self, EbpfError> {
        Ok(Self {
            by_addr: HashMap::try_from(open_map(pin_dir, maps::MAP_BY_ADDR)?)
                .context(|| format!("use map {}", maps::MAP_BY_ADDR))?,
        })
    }

    /// See [`Interception::lookup`].
    pub fn lookup(&self, peer: SocketAddr) -> Result<Option<OrigDst>, EbpfError> {
        match self.by_addr.get(&SockKey::new(peer), 0) {
            Ok(v) => Ok(Some(v.into())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context(|| format!("look up {peer} in {}", maps::MAP_BY_ADDR)),
        }
    }
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interception")
            .field("pin_dir", &self.pin_dir)
            .field("adopted", &self.adopted)
            .field("serving", &self.serving)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Interception {
    /// Loads, attaches to `cgroup` (a cgroup v2 directory) and pins programs, maps and links
    /// under `pin_dir` (which must be on bpffs, see [`ensure_bpffs`]). If `pin_dir` already
    /// holds a live installation on that cgroup, adopts it: reopens the pinned maps and writes
    /// `cfg`, without detaching anything.
    ///
    /// Either way the result is not serving yet: call [`Interception::set_serving`] once the
    /// agent listens, so that until then the fail mode applies.
    pub fn install_or_adopt(
        cgroup: &Path,
        pin_dir: &Path,
        cfg: &InterceptConfig,
    ) -> Result<Self, EbpfError> {
        cfg.validate()?;
        bump_memlock_rlimit();
        let parent = pin_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent).context(|| format!("statfs {}", parent.display()))? {
            return Err(EbpfError::NotBpffs(pin_dir.to_path_buf()));
        }
        std::fs::create_dir_all(pin_dir)
            .context(|| format!("create pin directory {}", pin_dir.display()))?;
        let cgroup_file =
            File::open(cgroup).context(|| format!("open cgroup {}", cgroup.display()))?;
        let cgroup_id = cgroup_file
            .metadata()
            .context(|| format!("stat cgroup {}", cgroup.display()))?
            .ino();

        let adopted = is_live(pin_dir, cgroup_id)?;
        if adopted {
            // Interception must not drop on a restart: keep the maps as they are, and say
            // that the new size waits for a reinstallation.
            for name in maps::CONNECTION_MAPS {
                if let Err(e) = check_map_size(pin_dir, name, cfg.max_connections) {
                    tracing::warn!(%e, "adopted interception keeps its map size");
                }
            }
        } else {
            install(&cgroup_file, cgroup, pin_dir, cfg)?;
        }
        let mut me = Self::open(pin_dir, cfg.clone(), adopted)?;
        // On install, programs attached only after the table and config were written;
        // `install` did that through `open` too. Writing again is harmless and covers adopt.
        me.write_config()?;
        me.sync_table()?;
        tracing::info!(
            pin_dir = %pin_dir.display(),
            cgroup = %cgroup.display(),
            cgroup_id,
            adopted,
            "ebpf interception in place"
        );
        Ok(me)
    }

    /// Reopens the pinned maps.
    fn open(pin_dir: &Path, cfg: InterceptConfig, adopted: bool) -> Result<Self, EbpfError> {
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            adopted,
            config: Array::try_from(open_map(pin_dir, maps::MAP_CONFIG)?)
                .context(|| format!("use map {}", maps::MAP_CONFIG))?,
            ports: HashMap::try_from(open_map(pin_dir, maps::MAP_PORTS)?)
                .context(|| format!("use map {}", maps::MAP_PORTS))?,
            cidrs: LpmTrie::try_from(open_map(pin_dir, maps::MAP_CIDRS)?)
                .context(|| format!("use map {}", maps::MAP_CIDRS))?,
            limits: Array::try_from(open_map(pin_dir, maps::MAP_LIMITS)?)
                .context(|| format!("use map {}", maps::MAP_LIMITS))?,
            refused: PerCpuArray::try_from(open_map(pin_dir, maps::MAP_REFUSED)?)
                .context(|| format!("use map {}", maps::MAP_REFUSED))?,
            by_addr: OrigDsts::open(pin_dir)?,
            cfg,
            serving: false,
        })
    }

    /// Whether an existing installation was adopted rather than a new one attached.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Tells the kernel programs whether the agent accepts connections now.
    pub fn set_serving(&mut self, serving: bool) -> Result<(), EbpfError> {
        self.serving = serving;
        self.write_config()
    }

    /// Original destination and cgroup of an accepted connection, by the client's address as
    /// the agent sees it (the accepted peer address). Look up right after `accept()`: the
    /// entry is removed when the client's socket closes.
    pub fn lookup(&self, peer: SocketAddr) -> Result<Option<OrigDst>, EbpfError> {
        self.by_addr.lookup(peer)
    }

    /// A second handle on the original-destination records (reopened from the pins), for
    /// threads that only look up.
    pub fn orig_dsts(&self) -> Result<OrigDsts, EbpfError> {
        OrigDsts::open(&self.pin_dir)
    }

    /// Connects the kernel refused so far because their cgroup held its budget (all CPUs;
    /// since the maps were made, so across agent restarts).
    pub fn refused_total(&self) -> Result<u64, EbpfError> {
        let per_cpu = self
            .refused
            .get(&0, 0)
            .context(|| format!("read {}", maps::MAP_REFUSED))?;
        Ok(per_cpu.iter().sum())
    }

    fn write_config(&mut self) -> Result<(), EbpfError> {
        let limits = Limits {
            conns_per_cgroup: self.cfg.connections_per_cgroup,
            pad: 0,
        };
        self.limits
            .set(0, limits, 0)
            .context(|| format!("write {}", maps::MAP_LIMITS))?;
        let value = self.cfg.to_map(self.serving);
        self.config
            .set(0, value, 0)
            .context(|| format!("write {}", maps::MAP_CONFIG))
    }

    /// Makes the intercept table hold exactly the configured rules: adds the new ones first,
    /// then removes the stale ones, so a rule kept across a reload never disappears.
    fn sync_table(&mut self) -> Result<(), EbpfError> {
        let want: HashSet<PortKey> = self
            .cfg
            .ports
            .iter()
            .map(|p| PortKey { port: p.to_be() })
            .collect();
        for key in &want {
            self.ports.insert(key, 1, 0).context(|| {
                format!("add port {} to {}", u16::from_be(key.port), maps::MAP_PORTS)
            })?;
        }
        let have: Vec<PortKey> = self
            .ports
            .keys()
            .collect::<Result<_, _>>()
            .context(|| format!("list {}", maps::MAP_PORTS))?;
        for key in have.iter().filter(|k| !want.contains(k)) {
            self.ports.remove(key).context(|| {
                format!(
                    "remove port {} from {}",
                    u16::from_be(key.port),
                    maps::MAP_PORTS
                )
            })?;
        }

        let mut want = Vec::new();
        for &(ip, prefix, port) in &self.cfg.cidrs {
            let key = cidr_key(ip, prefix, port).map_err(|e| EbpfError::Config(e.to_string()))?;
            self.cidrs
                .insert(&key, 1, 0)
                .context(|| format!("add {ip}/{prefix} port {port} to {}", maps::MAP_CIDRS))?;
            want.push((key.prefix_len(), key.data()));
        }
        let have: Vec<_> = self
            .cidrs
            .keys()
            .collect::<Result<_, _>>()
            .context(|| format!("list {}", maps::MAP_CIDRS))?;
        for key in have {
            if !want.contains(&(key.prefix_len(), key.data())) {
                self.cidrs
                    .remove(&key)
                    .context(|| format!("remove a stale rule from {}", maps::MAP_CIDRS))?;
            }
        }
        Ok(())
    }
}

/// Is every hook's link pinned, alive and attached to `cgroup_id`, and every map pinned?
fn is_live(pin_dir: &Path, cgroup_id: u64) -> Result<bool, EbpfError> {
    for hook in &HOOKS {
        let path = pins::link_pin(pin_dir, hook.name);
        let link =
            pins::cgroup_link(&path).context(|| format!("inspect link {}", path.display()))?;
        match link {
            Some(l) if l.cgroup_id == cgroup_id && l.attach_type == hook.attach_type => {}
            _ => return Ok(false),
        }
    }
    Ok(maps::ALL_MAPS.iter().all(|m| pin_dir.join(m).exists()))
}

/// Fresh installation: clears stale link and program pins, loads the object (reusing pinned
/// maps and their contents), writes the table and config, then attaches and pins each hook.
fn install(
    cgroup_file: &File,
    cgroup: &Path,
    pin_dir: &Path,
    cfg: &InterceptConfig,
) -> Result<(), EbpfError> {
    for hook in &HOOKS {
        let link = pins::link_pin(pin_dir, hook.name);
        pins::detach_and_unpin_link(&link)
            .context(|| format!("remove stale link {}", link.display()))?;
        let prog = pins::program_pin(pin_dir, hook.name);
        pins::unpin(&prog).context(|| format!("remove stale program {}", prog.display()))?;
    }
    for name in maps::ALL_MAPS {
        check_pinned_map(pin_dir, name)?;
    }
    // A pinned map is reused as it is: its size must already be the configured one.
    for name in maps::CONNECTION_MAPS {
        check_map_size(pin_dir, name, cfg.max_connections)?;
    }

    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    for name in maps::CONNECTION_MAPS {
        loader.map_max_entries(name, cfg.max_connections);
    }
    let mut ebpf = loader
        .load(OBJECT)
        .context(|| "load the interception object (gateway-ebpf/intercept.bpf.c)".into())?;

    // Table and config before any hook runs (not serving: the fail mode applies until the
    // agent says otherwise).
    Interception::open(pin_dir, cfg.clone(), false).and_then(|mut i| {
        i.write_config()?;
        i.sync_table()
    })?;

    for hook in &HOOKS {
        attach_and_pin(&mut ebpf, hook, cgroup_file, cgroup, pin_dir)?;
    }
    // Dropping `ebpf` now closes our descriptors; the pins keep programs, maps and links.
    Ok(())
}

fn attach_and_pin(
    ebpf: &mut Ebpf,
    hook: &Hook,
    cgroup_file: &File,
    cgroup: &Path,
    pin_dir: &Path,
) -> Result<(), EbpfError> {
    let name = hook.name;
    let program = ebpf.program_mut(name).ok_or_else(|| EbpfError::Step {
        what: format!("find program {name}"),
        cause: "not in the object".into(),
    })?;
    // Other programs may be attached to the same cgroup (Cilium's socket load balancer
    // attaches connect4 at the root too). A cgroup bpf_link (Linux 5.7+, what aya uses there)
    // always shares the hook with them, and the kernel rejects any attach flag on it with
    // EINVAL, so the mode must be `Single` (flags 0). Only on older kernels, where aya falls
    // back to BPF_PROG_ATTACH (and nothing could be pinned anyway), would it mean "exclusive".
    let mode = CgroupAttachMode::Single;
    let at = || format!("attach {name} to {}", cgroup.display());
    // The two program kinds take the same steps, but aya 0.14 gives them no common trait.
    macro_rules! load_pin_attach {
        ($kind:ty, $what:literal) => {{
            let p: &mut $kind = program
                .try_into()
                .context(|| format!("use {name} as {}", $what))?;
            p.load().context(|| format!("load program {name}"))?;
            p.pin(pins::program_pin(pin_dir, name))
                .context(|| format!("pin program {name}"))?;
            let id = p.attach(cgroup_file, mode).context(at)?;
            let link = p.take_link(id).context(|| format!("take link of {name}"))?;
            link.try_into()
                .context(|| format!("use link of {name} as fd link"))?
        }};
    }
    let link: FdLink = match hook.kind {
        Kind::SockAddr => load_pin_attach!(CgroupSockAddr, "cgroup sock_addr"),
        Kind::SockOps => load_pin_attach!(SockOps, "sockops"),
        Kind::Sock => load_pin_attach!(CgroupSock, "cgroup sock"),
    };
    let path = pins::link_pin(pin_dir, name);
    link.pin(&path)
        .context(|| format!("pin link {}", path.display()))?;
    Ok(())
}

fn open_map(pin_dir: &Path, name: &str) -> Result<Map, EbpfError> {
    let path = pin_dir.join(name);
    let data =
        MapData::from_pin(&path).context(|| format!("open pinned map {}", path.display()))?;
    Map::from_map_data(data).context(|| format!("use pinned map {}", path.display()))
}

fn check_pinned_map(pin_dir: &Path, name: &str) -> Result<(), EbpfError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(&path).context(|| format!("inspect map {}", path.display()))?;
    let found = (info.key_size(), info.value_size());
    let expected = expected_sizes(name);
    if found != expected {
        return Err(EbpfError::IncompatiblePin {
            path,
            found,
            expected,
        });
    }
    Ok(())
}

/// A pinned connection map must have `expected` entries (nothing pinned is fine).
fn check_map_size(pin_dir: &Path, name: &str, expected: u32) -> Result<(), EbpfError> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(&path).context(|| format!("inspect map {}", path.display()))?;
    let found = info.max_entries();
    if found != expected {
        return Err(EbpfError::PinnedMapSize {
            path,
            found,
            expected,
        });
    }
    Ok(())
}

/// Detaches and removes everything under `pin_dir` (links first, then programs and maps) and
/// the directory itself. Nothing there is fine.
pub fn uninstall(pin_dir: &Path) -> Result<(), EbpfError> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context(|| format!("read {}", pin_dir.display())),
    };
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .context(|| format!("read {}", pin_dir.display()))?;
    // Links first: once they are gone nothing runs, and the rest can go in any order.
    paths.sort_by_key(|p| !is_link_pin(p));
    for path in &paths {
        if is_link_pin(path) {
            pins::detach_and_unpin_link(path)
                .context(|| format!("detach link {}", path.display()))?;
        } else if path.is_dir() {
            std::fs::remove_dir_all(path).context(|| format!("remove {}", path.display()))?;
        } else {
            pins::unpin(path).context(|| format!("unpin {}", path.display()))?;
        }
    }
    std::fs::remove_dir(pin_dir).context(|| format!("remove {}", pin_dir.display()))?;
    tracing::info!(pin_dir = %pin_dir.display(), "ebpf interception removed");
    Ok(())
}

fn is_link_pin(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("link_"))
}

/// Mounts bpffs at `path` unless one is mounted there already (creating the directory).
pub fn ensure_bpffs(path: &Path) -> Result<(), EbpfError> {
    std::fs::create_dir_all(path).context(|| format!("create {}", path.display()))?;
    if is_bpffs(path).context(|| format!("statfs {}", path.display()))? {
        return Ok(());
    }
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .context(|| format!("use {} as a mount point", path.display()))?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .context(|| format!("mount bpffs at {} (needs CAP_SYS_ADMIN)", path.display()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid, writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Raises RLIMIT_MEMLOCK to unlimited. Kernels before 5.11 charge BPF maps and programs to
/// the locked-memory rlimit (newer ones charge the memory cgroup and ignore it); the usual
/// 8 MiB (or 64 KiB on older distributions) default makes map creation fail with EPERM there.
/// A failure is only logged: on a new kernel it does not matter, on an old one the load that
/// follows reports it.
fn bump_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: passes a valid rlimit by pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// The id of a cgroup v2 directory as `bpf_get_current_cgroup_id()` reports it: its inode
/// number on cgroupfs.
pub fn cgroup_id(dir: &Path) -> Result<u64, EbpfError> {
    std::fs::symlink_metadata(dir)
        .map(|m| m.ino())
        .context(|| format!("stat cgroup {}", dir.display()))
}
