//! Loading, attaching and pinning the object's programs, and the pieces of bpffs and
//! cgroupfs that go with it: the part of [`super::Interception`] that talks to the kernel
//! once at start-up (or at `gateway node uninstall`), kept apart from the live map handles.

use std::{
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapInfo},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps, links::FdLink},
};

use super::{
    Context, EbpfError, InterceptConfig, Interception,
    maps::{self, CidrKeyData, Config, Limits, OrigDstValue, PortKey, SockKey},
    pins,
};

/// The compiled `gateway-ebpf/intercept.bpf.c` (build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/intercept.bpf.o"));
/// `statfs.f_type` of bpffs (linux/magic.h `BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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
pub(super) fn expected_sizes(map: &str) -> (u32, u32) {
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

/// Is every hook's link pinned, alive and attached to `cgroup_id`, and every map pinned?
pub(super) fn is_live(pin_dir: &Path, cgroup_id: u64) -> Result<bool, EbpfError> {
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
pub(super) fn install(
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

pub(super) fn open_map(pin_dir: &Path, name: &str) -> Result<Map, EbpfError> {
    let path = pin_dir.join(name);
    let data =
        MapData::from_pin(&path).context(|| format!("open pinned map {}", path.display()))?;
    Map::from_map_data(data).context(|| format!("use pinned map {}", path.display()))
}

pub(super) fn check_pinned_map(pin_dir: &Path, name: &str) -> Result<(), EbpfError> {
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
pub(super) fn check_map_size(pin_dir: &Path, name: &str, expected: u32) -> Result<(), EbpfError> {
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

pub(super) fn is_bpffs(path: &Path) -> io::Result<bool> {
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
pub(super) fn bump_memlock_rlimit() {
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
