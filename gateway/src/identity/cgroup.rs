//! From a cgroup id to a cgroup path.
//!
//! The eBPF hooks report the cgroup id of the socket's owner. On cgroup v2 that id is the
//! inode number of the cgroup's directory in cgroupfs, so a walk of the cgroup2 tree maps ids
//! to paths; what a path says about pods and containers is `pod_path`'s part. A walk reads
//! the whole tree, so it never runs on a data-plane thread (`lookup` runs it, rate-limited).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use super::IdentityError;

/// Where the kernel describes this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Finds the cgroup v2 mount point in `/proc/self/mountinfo`. On a unified host that is
/// `/sys/fs/cgroup`; on hybrid hosts (v1 controllers plus v2) it is often
/// `/sys/fs/cgroup/unified`, so it is looked up, never assumed.
///
/// In a private cgroup namespace (the default for containers on cgroup v2, so the agent's
/// DaemonSet pod) mountinfo shows roots relative to the namespace's root: the host's
/// hierarchy root, bind-mounted over the container's own cgroupfs, appears as `/..` (or
/// `/../..`, one `..` per level), and the container's own mount as `/`. Of the candidates,
/// the first whose directory is the hierarchy root (the root cgroup has no `cgroup.type`)
/// is taken; paths derived from any other would be relative to the wrong cgroup.
pub fn cgroup2_mount() -> Result<PathBuf, IdentityError> {
    let text = fs::read_to_string(MOUNTINFO).map_err(|source| IdentityError::Read {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    let candidates = cgroup2_mounts_in(&text)?;
    candidates
        .iter()
        .find(|dir| is_hierarchy_root(dir))
        .cloned()
        .ok_or_else(|| IdentityError::NoCgroup2Root {
            mount_point: candidates[0].display().to_string(),
        })
}

/// Is `dir` the root of a cgroup v2 hierarchy? Every cgroup but the root has `cgroup.type`.
fn is_hierarchy_root(dir: &Path) -> bool {
    dir.join("cgroup.procs").exists() && !dir.join("cgroup.type").exists()
}

/// The mount points of cgroup2 mounts that may be the hierarchy's root, from mountinfo
/// text (see proc(5)): `id parent major:minor root mount-point options [optional
/// fields...] - fstype source super-options`. Only mounts whose `root` is `/` or made of
/// `..` alone (an ancestor of a private cgroup namespace's root) will do: the paths we
/// derive must be the kernel's paths, not those of a bind-mounted subtree. `/` ones come
/// first, in mountinfo order.
pub fn cgroup2_mounts_in(mountinfo: &str) -> Result<Vec<PathBuf>, IdentityError> {
    let mut subtree = None;
    let (mut roots, mut ancestors) = (Vec::new(), Vec::new());
    for (index, line) in mountinfo.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: &str| IdentityError::Mountinfo {
            line: index + 1,
            reason: reason.to_owned(),
        };
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 10 {
            return Err(bad("too few fields"));
        }
        // The optional fields (shared:N, master:N, ...) run until a lone "-".
        let dash = fields[6..]
            .iter()
            .position(|f| *f == "-")
            .map(|p| p + 6)
            .ok_or_else(|| bad("no ' - ' separator after the optional fields"))?;
        let fstype = fields
            .get(dash + 1)
            .ok_or_else(|| bad("no filesystem type after ' - '"))?;
        if *fstype != "cgroup2" {
            continue;
        }
        let root = unescape_octal(fields[3]).map_err(|r| bad(&r))?;
        let mount_point = unescape_octal(fields[4]).map_err(|r| bad(&r))?;
        if root == "/" {
            roots.push(PathBuf::from(mount_point));
        } else if root.split('/').skip(1).all(|c| c == "..") {
            ancestors.push(PathBuf::from(mount_point));
        } else {
            subtree.get_or_insert(mount_point);
        }
    }
    roots.extend(ancestors);
    if roots.is_empty() {
        return Err(match subtree {
            Some(mount_point) => IdentityError::NoCgroup2Root { mount_point },
            None => IdentityError::NoCgroup2Mount,
        });
    }
    Ok(roots)
}

/// Mountinfo escapes space, tab, newline and backslash in paths as `\ooo` (octal).
fn unescape_octal(field: &str) -> Result<String, String> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let digits = bytes
                .get(i + 1..i + 4)
                .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
                .ok_or_else(|| format!("bad octal escape in {field:?}"))?;
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).map_err(|_| format!("bad octal escape in {field:?}"))?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("path {field:?} is not UTF-8"))
}

/// Where the kernel names this process's cgroups.
pub const PROC_SELF_CGROUP: &str = "/proc/self/cgroup";

/// The cgroup v2 directory of this process, under the cgroup v2 mount: the node agent
/// exempts its own cgroup from interception.
///
/// `/proc/self/cgroup` (line `0::<path>`) names it relative to this process's cgroup
/// namespace root. In the initial namespace that is the hierarchy's root and the path is
/// the kernel's. In a private namespace (a container) the line says `0::/` (or a path with
/// `..`), which names no directory of the host's hierarchy: then the cgroup is found as the
/// one whose `cgroup.procs` lists this process (the kernel shows each reader the pids of
/// its own pid namespace, so only ours matches).
pub fn current_cgroup() -> Result<PathBuf, IdentityError> {
    let root = cgroup2_mount()?;
    let own = fs::read_to_string(PROC_SELF_CGROUP).map_err(|source| IdentityError::Read {
        path: PathBuf::from(PROC_SELF_CGROUP),
        source,
    })?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(IdentityError::NoCgroup2Entry)?;
    if rel != "/" && !rel.split('/').any(|c| c == "..") {
        return Ok(root.join(rel.trim_start_matches('/')));
    }
    cgroup_of_pid(&root, std::process::id()).ok_or(IdentityError::OwnCgroupNotFound { root })
}

/// The cgroup under `root` whose `cgroup.procs` lists `pid`, breadth first (the root first).
/// Unreadable directories (a cgroup removed meanwhile, threaded ones) are skipped.
fn cgroup_of_pid(root: &Path, pid: u32) -> Option<PathBuf> {
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        let listed = fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| {
            procs
                .lines()
                .any(|l| l.trim().parse::<u32>().is_ok_and(|p| p == pid))
        });
        if listed {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(entry.path());
            }
        }
    }
    None
}

/// The cgroup id of a cgroup directory: its inode number.
pub fn id_of(path: &Path) -> io::Result<u64> {
    Ok(fs::symlink_metadata(path)?.ino())
}

/// Cgroup id → cgroup path, for one cgroup2 hierarchy.
///
/// Paths are rooted at the hierarchy's root, the way `/proc/<pid>/cgroup` shows them
/// (`/kubepods.slice/...`; the root itself is `/`). The map is a cache of one walk of the
/// tree; an id it does not know triggers a fresh walk, because new pods create new cgroups
/// and the first connection of a new pod is the one that misses.
#[derive(Debug)]
pub struct CgroupPaths {
    root: PathBuf,
    ids: RwLock<HashMap<u64, PathBuf>>,
    /// Serialises walks: a burst of misses (a new pod opening a pool) walks once.
    walking: Mutex<()>,
    /// Completed walks, so a caller that waited for another walk can use its result.
    walks: AtomicU64,
}

impl CgroupPaths {
    /// A map over the hierarchy mounted at `root` (from [`cgroup2_mount`], or any directory
    /// in tests). The first walk happens on the first lookup.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ids: RwLock::new(HashMap::new()),
            walking: Mutex::new(()),
            walks: AtomicU64::new(0),
        }
    }

    /// The mount point this map walks.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `id` if the last walk saw it; never walks.
    pub fn known(&self, id: u64) -> Option<PathBuf> {
        self.cached(id)
    }

    /// Walks completed so far (each one reads the whole tree).
    pub fn walks(&self) -> u64 {
        self.walks.load(Ordering::Acquire)
    }

    /// The cgroup path of `id`, walking the tree again if the id is not cached. `None`: no
    /// such cgroup under the root (gone already, or never there).
    pub fn path_of(&self, id: u64) -> Option<PathBuf> {
        if let Some(path) = self.cached(id) {
            return Some(path);
        }
        let seen = self.walks.load(Ordering::Acquire);
        let guard = self.walking.lock().unwrap_or_else(PoisonError::into_inner);
        // Another thread walked while we waited for the lock: its map is fresh enough.
        if self.walks.load(Ordering::Acquire) != seen {
            return self.cached(id);
        }
        self.walk_locked();
        drop(guard);
        self.cached(id)
    }

    /// Walks the whole tree and replaces the map (so ids of removed cgroups go too).
    /// Directories that cannot be read are skipped: a cgroup can vanish mid-walk.
    pub fn rescan(&self) {
        let _guard = self.walking.lock().unwrap_or_else(PoisonError::into_inner);
        self.walk_locked();
    }

    fn walk_locked(&self) {
        let mut ids = HashMap::new();
        if let Ok(meta) = fs::symlink_metadata(&self.root) {
            ids.insert(meta.ino(), PathBuf::from("/"));
            walk(&self.root, Path::new("/"), &mut ids);
        }
        *self.ids.write().unwrap_or_else(PoisonError::into_inner) = ids;
        self.walks.fetch_add(1, Ordering::Release);
    }

    fn cached(&self, id: u64) -> Option<PathBuf> {
        self.ids
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }
}

/// Depth-first walk; cgroup trees are shallow (kubepods: about five levels), so recursion
/// depth is no concern.
fn walk(dir: &Path, rel: &Path, ids: &mut HashMap<u64, PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // `DirEntry::metadata` does not follow symlinks; cgroupfs has none anyway.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let rel = rel.join(entry.file_name());
        walk(&entry.path(), &rel, ids);
        ids.insert(meta.ino(), rel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TempDir;

    #[test]
    fn mountinfo_hybrid_layout_finds_unified() {
        let text = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
";
        assert_eq!(
            cgroup2_mounts_in(text).unwrap()[0],
            PathBuf::from("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn mountinfo_unified_layout_without_optional_fields() {
        let text = "\
22 1 259:1 / / rw,relatime - ext4 /dev/nvme0n1p1 rw
27 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(
            cgroup2_mounts_in(text).unwrap()[0],
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    #[test]
    fn mountinfo_unescapes_octal_and_handles_many_optional_fields() {
        let text = "40 22 0:26 / /mnt/my\\040cgroups rw shared:3 master:1 propagate_from:2 - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mounts_in(text).unwrap()[0],
            PathBuf::from("/mnt/my cgroups")
        );
    }

    #[test]
    fn mountinfo_skips_subtree_bind_mounts_of_cgroup2() {
        let text = "\
50 22 0:26 /kubepods.slice /host/kubepods rw - cgroup2 cgroup2 rw
51 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mounts_in(text).unwrap()[0],
            PathBuf::from("/sys/fs/cgroup")
        );
        let only_subtree = "50 22 0:26 /kubepods.slice /host/kubepods rw - cgroup2 cgroup2 rw\n";
        assert!(matches!(
            cgroup2_mounts_in(only_subtree),
            Err(IdentityError::NoCgroup2Root { .. })
        ));
    }

    #[test]
    fn mountinfo_in_a_private_cgroup_namespace_offers_the_host_root_bound_over_it() {
        // The agent's DaemonSet pod: the runtime's own cgroupfs (root `/` = the container's
        // cgroup), then the host's root bind-mounted over it (`/../../..` from inside).
        let text = "\
701 690 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
720 701 0:26 /../../.. /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw
721 690 0:26 /../kubepods.slice /host/kubepods rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mounts_in(text).unwrap(),
            vec![
                PathBuf::from("/sys/fs/cgroup"),
                PathBuf::from("/sys/fs/cgroup")
            ]
        );
        let only_ancestor = "720 701 0:26 /.. /host/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mounts_in(only_ancestor).unwrap(),
            vec![PathBuf::from("/host/cgroup")]
        );
    }

    #[test]
    fn mountinfo_without_cgroup2_or_malformed_is_an_error() {
        let v1_only = "33 31 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert!(matches!(
            cgroup2_mounts_in(v1_only),
            Err(IdentityError::NoCgroup2Mount)
        ));
        let no_dash = "33 31 0:30 / /sys/fs/cgroup rw shared:1 x cgroup2 cgroup2 rw\n";
        assert!(matches!(
            cgroup2_mounts_in(no_dash),
            Err(IdentityError::Mountinfo { line: 1, .. })
        ));
        let bad_escape = "1 1 0:1 / /x rw - ext4 /dev/x rw\n2 1 0:2 / /a\\09 rw - cgroup2 c rw\n";
        assert!(matches!(
            cgroup2_mounts_in(bad_escape),
            Err(IdentityError::Mountinfo { line: 2, .. })
        ));
    }

    #[test]
    fn this_machine_has_a_cgroup2_mount_that_is_a_directory() {
        // Every supported host has one (hybrid or unified); the test environment too.
        let mount = cgroup2_mount().unwrap();
        assert!(mount.is_dir(), "{}", mount.display());
    }

    #[test]
    fn this_process_is_in_a_cgroup_under_the_mount_whose_id_is_its_inode() {
        let mount = cgroup2_mount().unwrap();
        let own = current_cgroup().unwrap();
        assert!(
            own.starts_with(&mount),
            "{} under {}",
            own.display(),
            mount.display()
        );
        assert!(own.is_dir(), "{}", own.display());
        // The id the resolver will look up is the one the directory walk finds.
        let id = id_of(&own).unwrap();
        let rel = Path::new("/").join(own.strip_prefix(&mount).unwrap());
        assert_eq!(CgroupPaths::new(&mount).path_of(id), Some(rel));
    }

    #[test]
    fn cgroup_paths_map_inodes_to_paths_and_refresh_on_miss() {
        let tmp = TempDir::new("cgroup-paths");
        let a = tmp.path().join("kubepods/burstable");
        fs::create_dir_all(&a).unwrap();
        fs::write(tmp.path().join("kubepods/cgroup.procs"), "").unwrap();
        let paths = CgroupPaths::new(tmp.path());
        assert_eq!(
            paths.path_of(id_of(&a).unwrap()),
            Some(PathBuf::from("/kubepods/burstable"))
        );
        assert_eq!(
            paths.path_of(id_of(tmp.path()).unwrap()),
            Some(PathBuf::from("/"))
        );
        // Created after the first walk: found by the walk a miss triggers.
        let b = tmp.path().join("kubepods/besteffort/podx");
        fs::create_dir_all(&b).unwrap();
        assert_eq!(
            paths.path_of(id_of(&b).unwrap()),
            Some(PathBuf::from("/kubepods/besteffort/podx"))
        );
        // Files are not cgroups.
        let file = id_of(&tmp.path().join("kubepods/cgroup.procs")).unwrap();
        assert_eq!(paths.path_of(file), None);
    }

    #[test]
    fn cgroup_paths_forget_removed_cgroups_after_a_walk() {
        let tmp = TempDir::new("cgroup-gone");
        let gone = tmp.path().join("gone");
        fs::create_dir(&gone).unwrap();
        let id = id_of(&gone).unwrap();
        let paths = CgroupPaths::new(tmp.path());
        assert_eq!(paths.path_of(id), Some(PathBuf::from("/gone")));
        fs::remove_dir(&gone).unwrap();
        paths.rescan();
        assert_eq!(paths.path_of(id), None);
    }

    #[test]
    fn cgroup_paths_of_a_missing_root_know_nothing() {
        let paths = CgroupPaths::new("/nonexistent/dbgw-cgroup-root");
        assert_eq!(paths.path_of(1), None);
    }
}
