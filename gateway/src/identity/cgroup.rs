//! From a cgroup id to a pod UID and container id.
//!
//! The eBPF hooks report the cgroup id of the socket's owner. On cgroup v2 that id is the
//! inode number of the cgroup's directory in cgroupfs, so a walk of the cgroup2 tree maps ids
//! to paths, and the path names the pod (kubelet creates one cgroup per pod) and the container
//! (the runtime creates one per container). The rules follow SPIRE's Kubernetes workload
//! attestor: pod UIDs with `-` or `_`, 64-hex container ids, and fail closed when a path could
//! mean two workloads.

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

/// Container runtimes name their cgroups `<prefix><64 hex>` (cgroupfs driver) or
/// `<prefix><64 hex>.scope` (systemd driver).
const RUNTIME_PREFIXES: &[&str] = &["cri-containerd-", "crio-", "docker-"];
/// CRI-O's per-container monitor process lives next to the container, in the pod's cgroup.
/// It is runtime machinery, not the workload, so it never gets a container id.
const CONMON_PREFIX: &str = "crio-conmon-";

/// Finds the cgroup v2 mount point in `/proc/self/mountinfo`. On a unified host that is
/// `/sys/fs/cgroup`; on hybrid hosts (v1 controllers plus v2) it is often
/// `/sys/fs/cgroup/unified`, so it is looked up, never assumed.
pub fn cgroup2_mount() -> Result<PathBuf, IdentityError> {
    let text = fs::read_to_string(MOUNTINFO).map_err(|source| IdentityError::Read {
        path: PathBuf::from(MOUNTINFO),
        source,
    })?;
    cgroup2_mount_in(&text)
}

/// The mount point of the cgroup2 hierarchy's root in mountinfo text (see proc(5)):
/// `id parent major:minor root mount-point options [optional fields...] - fstype source
/// super-options`. Only a mount of the hierarchy root (`root` = `/`) will do: the paths we
/// derive must be the kernel's paths, not those of a bind-mounted subtree.
pub fn cgroup2_mount_in(mountinfo: &str) -> Result<PathBuf, IdentityError> {
    let mut subtree = None;
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
            return Ok(PathBuf::from(mount_point));
        }
        subtree.get_or_insert(mount_point);
    }
    Err(match subtree {
        Some(mount_point) => IdentityError::NoCgroup2Root { mount_point },
        None => IdentityError::NoCgroup2Mount,
    })
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

/// The cgroup v2 directory of this process (from /proc/self/cgroup, line `0::<path>`, under
/// the cgroup v2 mount): the node agent exempts its own cgroup from interception.
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
    Ok(root.join(rel.trim_start_matches('/')))
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

/// What a cgroup path says about its processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod UID as Kubernetes writes it: lower-case, dash-separated.
    pub pod_uid: String,
    /// 64 lower-case hex digits; `None` for the pod-level cgroup and for runtime helpers
    /// (CRI-O's conmon) that live in the pod's cgroup but are not a container.
    pub container_id: Option<String>,
    /// `burstable`, `besteffort` or `guaranteed` (guaranteed pods sit directly under
    /// kubepods); `None` when the layout does not say (no QoS level in the path).
    pub qos: Option<String>,
}

/// One segment's meaning.
#[derive(Debug, PartialEq, Eq)]
enum Segment {
    Pod { uid: String, qos: Option<String> },
    Container(String),
    Conmon,
    Other,
}

/// Parses a cgroup path (as `/proc/<pid>/cgroup` shows it) into pod and container.
///
/// `Ok(None)`: no pod segment, a host process. The pod may sit anywhere in the path (kind
/// nodes run kubelet under `/kubelet.slice`, tests under `/dbgw-test-N`); a container-like
/// segment above the pod (the kind node's own container) is ignored. Errors: a segment that
/// looks like a pod or container but is malformed, two pod segments, two different
/// container ids, or an unrecognised cgroup directly under the pod. A path that could name
/// two workloads gets neither.
pub fn parse_pod_container(path: &str) -> Result<Option<PodContainer>, IdentityError> {
    let bad = |reason: String| IdentityError::BadCgroupPath {
        path: path.to_owned(),
        reason,
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut found: Option<(usize, String, Option<String>)> = None;
    // From the leaf: the pod nearest to the process wins, and every other pod segment must
    // agree with it.
    for (index, segment) in segments.iter().enumerate().rev() {
        let parents = &segments[..index];
        if let Segment::Pod { uid, qos } = classify(segment, parents).map_err(&bad)? {
            // Even the same UID twice is a layout nobody creates; refuse rather than guess
            // which segment the container belongs to.
            if let Some((_, first, _)) = &found {
                return Err(IdentityError::ConflictingCgroupPath {
                    path: path.to_owned(),
                    reason: format!("two pod segments: pod {uid} and pod {first}"),
                });
            }
            found = Some((index, uid, qos));
        }
    }
    let Some((pod_index, pod_uid, qos)) = found else {
        return Ok(None);
    };
    let mut container_id: Option<String> = None;
    let mut conmon = false;
    for (offset, segment) in segments[pod_index + 1..].iter().enumerate() {
        let index = pod_index + 1 + offset;
        match classify(segment, &segments[..index]).map_err(&bad)? {
            Segment::Container(id) => match &container_id {
                Some(first) if *first != id => {
                    return Err(IdentityError::ConflictingCgroupPath {
                        path: path.to_owned(),
                        reason: format!("two container ids: {first} and {id}"),
                    });
                }
                _ => container_id = Some(id),
            },
            Segment::Conmon => conmon = true,
            // Kubelet puts only container cgroups directly under a pod; anything else there
            // is a layout we do not understand, and guessing would hand out the pod's identity.
            Segment::Other if offset == 0 => {
                return Err(bad(format!(
                    "unrecognised cgroup {segment:?} directly under pod {pod_uid}"
                )));
            }
            // Below the container: nested cgroups the workload made itself. (A second pod
            // segment was refused by the first loop already.)
            Segment::Other | Segment::Pod { .. } => {}
        }
    }
    if conmon && let Some(id) = &container_id {
        return Err(IdentityError::ConflictingCgroupPath {
            path: path.to_owned(),
            reason: format!("container {id} inside CRI-O's conmon cgroup"),
        });
    }
    Ok(Some(PodContainer {
        pod_uid,
        container_id,
        qos,
    }))
}

/// Classifies one segment; `parents` are the segments above it (for the cgroupfs driver,
/// whose pod segments are recognised by where they sit).
fn classify(segment: &str, parents: &[&str]) -> Result<Segment, String> {
    if let Some(pod) = systemd_pod(segment)? {
        return Ok(pod);
    }
    if let Some(pod) = cgroupfs_pod(segment, parents)? {
        return Ok(pod);
    }
    container(segment)
}

/// systemd driver: `kubepods[-<qos>]-pod<uid>.slice`, possibly with a prefix of its own
/// (kind: `kubelet-kubepods-...`). The UID's dashes are underscores there, because a dash in
/// a slice name means nesting.
fn systemd_pod(segment: &str) -> Result<Option<Segment>, String> {
    let Some(stem) = segment.strip_suffix(".slice") else {
        return Ok(None);
    };
    let Some(at) = stem.find("kubepods-") else {
        return Ok(None);
    };
    if at > 0 && !stem[..at].ends_with('-') {
        return Ok(None);
    }
    let rest = &stem[at + "kubepods-".len()..];
    let (qos, rest) = match rest.split_once('-') {
        Some((q @ ("burstable" | "besteffort"), r)) => (Some(q), r),
        _ => (None, rest),
    };
    let Some(raw) = rest.strip_prefix("pod") else {
        // The QoS slices themselves (`kubepods-burstable.slice`).
        return Ok(None);
    };
    let uid = pod_uid(raw).map_err(|r| format!("pod segment {segment:?}: {r}"))?;
    Ok(Some(Segment::Pod {
        uid,
        qos: Some(qos.unwrap_or("guaranteed").to_owned()),
    }))
}

/// cgroupfs driver: `pod<uid>` under `kubepods`, `kubepods/burstable` or
/// `kubepods/besteffort`. Elsewhere, a `pod…` segment counts only if the rest is made of UID
/// characters (so `podman` stays a name, while `pod12ab` is a malformed pod, not a host
/// process).
fn cgroupfs_pod(segment: &str, parents: &[&str]) -> Result<Option<Segment>, String> {
    let Some(raw) = segment.strip_prefix("pod") else {
        return Ok(None);
    };
    let qos = match parents {
        [.., "kubepods", q @ ("burstable" | "besteffort")] => Some(*q),
        [.., "kubepods"] => Some("guaranteed"),
        _ => None,
    };
    let uid_like = !raw.is_empty()
        && raw
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
    if qos.is_none() && !uid_like {
        return Ok(None);
    }
    let uid = pod_uid(raw).map_err(|r| format!("pod segment {segment:?}: {r}"))?;
    Ok(Some(Segment::Pod {
        uid,
        qos: qos.map(str::to_owned),
    }))
}

/// Container segments: a bare id (cgroupfs driver: containerd, Docker) or a runtime prefix
/// with an optional `.scope`. A known prefix with a bad id is an error, not "other".
fn container(segment: &str) -> Result<Segment, String> {
    let stem = segment.strip_suffix(".scope").unwrap_or(segment);
    if let Some(id) = stem.strip_prefix(CONMON_PREFIX) {
        container_id(id).map_err(|r| format!("conmon segment {segment:?}: {r}"))?;
        return Ok(Segment::Conmon);
    }
    for prefix in RUNTIME_PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix) {
            let id = container_id(id).map_err(|r| format!("container segment {segment:?}: {r}"))?;
            return Ok(Segment::Container(id));
        }
    }
    Ok(match container_id(segment) {
        Ok(id) => Segment::Container(id),
        Err(_) => Segment::Other,
    })
}

/// A pod UID: 8-4-4-4-12 hex digits, all separators `-` or all `_`. Returned lower-case
/// with dashes, as the API server spells it.
fn pod_uid(raw: &str) -> Result<String, String> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    if raw.len() != 36 {
        return Err(format!("pod UID {raw:?} is not 36 characters"));
    }
    let separator = if raw.contains('_') { '_' } else { '-' };
    let groups: Vec<&str> = raw.split(separator).collect();
    let shape_ok = groups.len() == GROUPS.len()
        && groups
            .iter()
            .zip(GROUPS)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !shape_ok {
        return Err(format!(
            "pod UID {raw:?} is not 8-4-4-4-12 hex digits separated by '-' or '_'"
        ));
    }
    Ok(groups.join("-").to_ascii_lowercase())
}

/// A container id: exactly 64 lower-case hex digits (containerd, CRI-O and Docker all use a
/// SHA-256 in hex).
fn container_id(id: &str) -> Result<String, String> {
    if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(id.to_owned())
    } else {
        Err(format!(
            "container id {id:?} is not 64 lower-case hex digits"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TempDir;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";
    const OTHER_UID: &str = "daa5c7ee-3484-4533-af39-3591564fd03e";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const OTHER_CID: &str = "aff34703e5e1f89443e9a1bffcc80f43f74d4808a2dd22c8f88c08547b323934";

    fn pod(path: &str) -> PodContainer {
        match parse_pod_container(path) {
            Ok(Some(p)) => p,
            other => panic!("{path}: {other:?}"),
        }
    }

    fn expect(path: &str, uid: &str, cid: Option<&str>, qos: Option<&str>) {
        assert_eq!(
            pod(path),
            PodContainer {
                pod_uid: uid.to_owned(),
                container_id: cid.map(str::to_owned),
                qos: qos.map(str::to_owned),
            },
            "{path}"
        );
    }

    fn bad(path: &str) -> String {
        match parse_pod_container(path) {
            Err(e @ IdentityError::BadCgroupPath { .. }) => e.to_string(),
            other => panic!("{path}: expected BadCgroupPath, got {other:?}"),
        }
    }

    fn conflict(path: &str) -> String {
        match parse_pod_container(path) {
            Err(e @ IdentityError::ConflictingCgroupPath { .. }) => e.to_string(),
            other => panic!("{path}: expected ConflictingCgroupPath, got {other:?}"),
        }
    }

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
            cgroup2_mount_in(text).unwrap(),
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
            cgroup2_mount_in(text).unwrap(),
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    #[test]
    fn mountinfo_unescapes_octal_and_handles_many_optional_fields() {
        let text = "40 22 0:26 / /mnt/my\\040cgroups rw shared:3 master:1 propagate_from:2 - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_in(text).unwrap(),
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
            cgroup2_mount_in(text).unwrap(),
            PathBuf::from("/sys/fs/cgroup")
        );
        let only_subtree = "50 22 0:26 /kubepods.slice /host/kubepods rw - cgroup2 cgroup2 rw\n";
        assert!(matches!(
            cgroup2_mount_in(only_subtree),
            Err(IdentityError::NoCgroup2Root { .. })
        ));
    }

    #[test]
    fn mountinfo_without_cgroup2_or_malformed_is_an_error() {
        let v1_only = "33 31 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert!(matches!(
            cgroup2_mount_in(v1_only),
            Err(IdentityError::NoCgroup2Mount)
        ));
        let no_dash = "33 31 0:30 / /sys/fs/cgroup rw shared:1 x cgroup2 cgroup2 rw\n";
        assert!(matches!(
            cgroup2_mount_in(no_dash),
            Err(IdentityError::Mountinfo { line: 1, .. })
        ));
        let bad_escape = "1 1 0:1 / /x rw - ext4 /dev/x rw\n2 1 0:2 / /a\\09 rw - cgroup2 c rw\n";
        assert!(matches!(
            cgroup2_mount_in(bad_escape),
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

    #[test]
    fn containerd_systemd_driver_all_qos_classes() {
        let base = "/kubepods.slice";
        expect(
            &format!(
                "{base}/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            UID,
            Some(CID),
            Some("burstable"),
        );
        expect(
            &format!(
                "{base}/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            UID,
            Some(CID),
            Some("besteffort"),
        );
        expect(
            &format!("{base}/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
            UID,
            Some(CID),
            Some("guaranteed"),
        );
    }

    #[test]
    fn crio_systemd_driver_and_conmon_is_not_a_container() {
        let pod_slice =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        expect(
            &format!("{pod_slice}/crio-{CID}.scope"),
            UID,
            Some(CID),
            Some("burstable"),
        );
        expect(
            &format!("{pod_slice}/crio-conmon-{CID}.scope"),
            UID,
            None,
            Some("burstable"),
        );
    }

    #[test]
    fn docker_systemd_driver() {
        expect(
            &format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope"
            ),
            UID,
            Some(CID),
            Some("besteffort"),
        );
    }

    #[test]
    fn cgroupfs_driver_containerd_docker_and_crio() {
        expect(
            &format!("/kubepods/burstable/pod{UID}/{CID}"),
            UID,
            Some(CID),
            Some("burstable"),
        );
        expect(
            &format!("/kubepods/besteffort/pod{UID}/{CID}"),
            UID,
            Some(CID),
            Some("besteffort"),
        );
        expect(
            &format!("/kubepods/pod{UID}/{CID}"),
            UID,
            Some(CID),
            Some("guaranteed"),
        );
        expect(
            &format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
            UID,
            Some(CID),
            Some("burstable"),
        );
    }

    #[test]
    fn pod_level_cgroup_gives_the_pod_only() {
        expect(
            &format!("/kubepods/burstable/pod{UID}"),
            UID,
            None,
            Some("burstable"),
        );
        expect(
            &format!("/kubepods.slice/kubepods-pod{UID_}.slice"),
            UID,
            None,
            Some("guaranteed"),
        );
    }

    #[test]
    fn pod_under_a_prefix_is_found() {
        expect(
            &format!(
                "/dbgw-test-1234/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            UID,
            Some(CID),
            Some("burstable"),
        );
        // kind, systemd driver: kubelet's cgroup root is /kubelet.
        expect(
            &format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            UID,
            Some(CID),
            Some("besteffort"),
        );
        // kind, cgroupfs driver: the node's own container id sits above the pod and is ignored.
        expect(
            &format!("/docker/{OTHER_CID}/kubepods/besteffort/pod{UID}/{CID}"),
            UID,
            Some(CID),
            Some("besteffort"),
        );
        // A bare `pod<uid>` outside kubepods still counts, without a QoS class.
        expect(
            &format!("/dbgw-test-7/pod{UID}/{CID}"),
            UID,
            Some(CID),
            None,
        );
    }

    #[test]
    fn pod_uid_is_normalised_to_lower_case_dashes() {
        let upper = UID_.to_ascii_uppercase();
        expect(
            &format!("/kubepods.slice/kubepods-pod{upper}.slice"),
            UID,
            None,
            Some("guaranteed"),
        );
        expect(
            &format!("/kubepods/pod{}", UID.to_ascii_uppercase()),
            UID,
            None,
            Some("guaranteed"),
        );
    }

    #[test]
    fn nested_cgroups_inside_a_container_keep_its_identity() {
        expect(
            &format!("/kubepods/burstable/pod{UID}/{CID}/init.scope"),
            UID,
            Some(CID),
            Some("burstable"),
        );
    }

    #[test]
    fn host_processes_have_no_pod() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/podman-1234.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            &format!("/system.slice/docker-{CID}.scope"),
        ] {
            assert_eq!(parse_pod_container(path).unwrap(), None, "{path}");
        }
    }

    #[test]
    fn malformed_pod_segments_are_errors() {
        let short = bad("/kubepods/burstable/pod2c48913c-b29f-11e7-9350/x");
        assert!(short.contains("not 36 characters"), "{short}");
        // Right length, a non-hex character: it sits where kubelet puts pods.
        let wrong_char = bad("/kubepods/burstable/pod2c48913c-b29f-11e7-9350-02096814779z");
        assert!(wrong_char.contains("8-4-4-4-12"), "{wrong_char}");
        // Mixed separators.
        bad("/kubepods/pod2c48913c_b29f-11e7-9350-020968147796");
        // Dashes grouped wrong.
        bad("/kubepods/pod2c48913cb-29f-11e7-9350-020968147796");
        bad("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice");
        // Outside kubepods, a UID-looking segment of the wrong length.
        bad("/dbgw-test-1/pod12ab");
    }

    #[test]
    fn malformed_container_segments_are_errors() {
        let pod_slice = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
        let short = bad(&format!("{pod_slice}/cri-containerd-abc123.scope"));
        assert!(short.contains("64 lower-case hex"), "{short}");
        bad(&format!(
            "{pod_slice}/docker-{}.scope",
            CID.to_ascii_uppercase()
        ));
        bad(&format!("{pod_slice}/crio-conmon-xyz.scope"));
        // Directly under a pod, only containers are expected.
        let odd = bad(&format!("/kubepods/pod{UID}/not-a-container"));
        assert!(odd.contains("directly under pod"), "{odd}");
    }

    #[test]
    fn two_pods_or_two_containers_conflict() {
        let two_pods = conflict(&format!(
            "/kubepods/pod{OTHER_UID}/{OTHER_CID}/kubepods/pod{UID}/{CID}"
        ));
        assert!(two_pods.contains("two pod segments"), "{two_pods}");
        let two_containers = conflict(&format!("/kubepods/pod{UID}/{CID}/{OTHER_CID}"));
        assert!(
            two_containers.contains("two container ids"),
            "{two_containers}"
        );
        let mixed_drivers = conflict(&format!(
            "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/docker-{OTHER_CID}.scope"
        ));
        assert!(
            mixed_drivers.contains("two container ids"),
            "{mixed_drivers}"
        );
        conflict(&format!(
            "/kubepods/pod{UID}/crio-conmon-{OTHER_CID}.scope/{CID}"
        ));
    }

    #[test]
    fn the_same_pod_twice_is_a_conflict_too() {
        conflict(&format!("/kubepods/pod{UID}/{CID}/pod{UID_}"));
    }
}
