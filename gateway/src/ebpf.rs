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
//! - `ebpf/load.rs`: loading, attaching and pinning the programs; bpffs; cgroup ids;
//! - `ebpf/pins.rs`: the pin directory and the raw `bpf(2)` calls for pinned links.
//!
//! Ground floor: imports nothing of ours. Its defaults (pin directory,
//! intercepted port) are the ones `config` uses.

pub mod intercept;
mod load;
pub mod maps;
pub mod pins;

use std::{
    collections::HashSet,
    fs::File,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray};

use self::maps::{CidrKeyData, Config, Limits, OrigDstValue, PortKey, SockKey, cidr_key};

pub use self::intercept::{InterceptConfig, OrigDst};
use self::load::{bump_memlock_rlimit, check_map_size, install, is_bpffs, is_live, open_map};
pub use self::load::{cgroup_id, ensure_bpffs, uninstall};

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
