//! What a cgroup path says about its processes: the pod UID and container id, read only
//! under the kubelet's cgroup roots and only through directories owned by root.
//!
//! The naming rules follow SPIRE's Kubernetes workload attestor: pod UIDs with `-` or `_`,
//! 64-hex container ids, and fail closed when a path could mean two workloads. Names alone
//! prove nothing, though: anyone with a delegated cgroup subtree (`user@UID.service`,
//! rootless containers) can create `…/kubepods-burstable-pod<victim>.slice/…` and move a
//! process there. So a pod segment counts only where the kubelet puts pods (directly under
//! one of its cgroup roots, or under a QoS cgroup there), and every directory from that root
//! down to the process must belong to root, as the kubelet's and the runtime's do.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::IdentityError;

/// Container runtimes name their cgroups `<prefix><64 hex>` (cgroupfs driver) or
/// `<prefix><64 hex>.scope` (systemd driver).
const RUNTIME_PREFIXES: &[&str] = &["cri-containerd-", "crio-", "docker-"];
/// CRI-O's per-container monitor process lives next to the container, in the pod's cgroup.
/// It is runtime machinery, not the workload, so it never gets a container id.
const CONMON_PREFIX: &str = "crio-conmon-";

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

/// The kubelet's cgroup roots (paths as `/proc/<pid>/cgroup` shows them, e.g.
/// `/kubepods.slice` for the systemd driver, `/kubepods` for cgroupfs) and the owner every
/// directory from a root down to a pod's process must have.
#[derive(Debug, Clone)]
pub struct KubeletCgroups {
    /// Each root's segments, longest first (a root nested in another wins).
    roots: Vec<Vec<String>>,
    /// 0 (root): kubelet and the container runtime run as root, and only root can give a
    /// directory away. Tests that run unprivileged use their own uid.
    owner: u32,
}

impl KubeletCgroups {
    /// Roots from the configuration (`interception.identity.kubelet_cgroup_roots`); each is
    /// checked as the configuration check does.
    pub fn new(roots: &[String]) -> Result<Self, IdentityError> {
        let mut parsed = Vec::new();
        for root in roots {
            crate::config::check_cgroup_root(root).map_err(IdentityError::KubeletRoot)?;
            parsed.push(segments(root).map(str::to_owned).collect::<Vec<_>>());
        }
        if parsed.is_empty() {
            return Err(IdentityError::KubeletRoot(
                "no kubelet cgroup root: no process could ever be a pod's".into(),
            ));
        }
        parsed.sort_by_key(|r| std::cmp::Reverse(r.len()));
        Ok(Self {
            roots: parsed,
            owner: 0,
        })
    }

    /// The same roots with another required owner (unprivileged tests).
    pub fn with_owner(mut self, uid: u32) -> Self {
        self.owner = uid;
        self
    }

    fn describe_roots(&self) -> String {
        let list: Vec<String> = self
            .roots
            .iter()
            .map(|r| format!("/{}", r.join("/")))
            .collect();
        list.join(", ")
    }

    /// How many leading segments of `segs` are the kubelet root they sit under, if any.
    fn root_len(&self, segs: &[&str]) -> Option<usize> {
        self.roots
            .iter()
            .find(|r| r.len() <= segs.len() && r.iter().zip(segs).all(|(a, b)| a == b))
            .map(Vec::len)
    }

    /// Checks that every directory from the kubelet root down to `path` (under the cgroup2
    /// `mount`) belongs to the required owner, and that `path` is still cgroup `id`. Run only
    /// for paths that name a pod, off the data plane (it stats each directory).
    pub fn check_owners(&self, mount: &Path, path: &str, id: u64) -> Result<(), IdentityError> {
        let segs: Vec<&str> = segments(path).collect();
        let Some(root_len) = self.root_len(&segs) else {
            return Err(self.outside(path));
        };
        let mut dir = mount.to_path_buf();
        for (i, seg) in segs.iter().enumerate() {
            dir.push(seg);
            if i + 1 < root_len {
                continue;
            }
            let meta = fs::symlink_metadata(&dir).map_err(|source| IdentityError::Read {
                path: dir.clone(),
                source,
            })?;
            if meta.uid() != self.owner {
                return Err(IdentityError::NotRootOwned {
                    path: path.to_owned(),
                    dir: dir.clone(),
                    uid: meta.uid(),
                });
            }
            if i + 1 == segs.len() && meta.ino() != id {
                return Err(IdentityError::UnknownCgroup {
                    id,
                    root: mount.to_owned(),
                });
            }
        }
        Ok(())
    }

    fn outside(&self, path: &str) -> IdentityError {
        IdentityError::OutsideKubeletRoots {
            path: path.to_owned(),
            roots: self.describe_roots(),
        }
    }

    /// Parses a cgroup path (as `/proc/<pid>/cgroup` shows it) into pod and container.
    ///
    /// `Ok(None)`: no pod segment, a host process. A pod segment counts only directly under
    /// a kubelet root or under a QoS cgroup there; one anywhere else is an imitation and is
    /// refused (not treated as a host process: whoever made it meant to look like a pod).
    /// Other errors: a segment that looks like a pod or container but is malformed, two pod
    /// segments, two different container ids, or an unrecognised cgroup directly under the
    /// pod. A path that could name two workloads gets neither.
    pub fn parse(&self, path: &str) -> Result<Option<PodContainer>, IdentityError> {
        let segs: Vec<&str> = segments(path).collect();
        let Some(root_len) = self.root_len(&segs) else {
            // Outside every root: any pod-like segment is somebody else's imitation.
            for (index, segment) in segs.iter().enumerate() {
                let parents = &segs[..index];
                let pod_like = !matches!(systemd_pod(segment), Ok(None))
                    || !matches!(cgroupfs_pod(segment, parents), Ok(None));
                if pod_like {
                    return Err(self.outside(path));
                }
            }
            return Ok(None);
        };
        let found = parse_below(path, &segs, root_len)?;
        let Some(pc) = &found else {
            return Ok(None);
        };
        let at_root = pc.index == root_len;
        let under_qos = pc.index == root_len + 1 && is_qos(segs[root_len]);
        if !(at_root || under_qos) {
            return Err(IdentityError::BadCgroupPath {
                path: path.to_owned(),
                reason: format!(
                    "pod {} is not where the kubelet puts pods (directly under {} or its QoS cgroup)",
                    pc.pod.pod_uid,
                    self.describe_roots()
                ),
            });
        }
        Ok(found.map(|f| f.pod))
    }
}

/// A path's non-empty segments.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// The kubelet's QoS cgroups: `burstable`/`besteffort` (cgroupfs) or
/// `[<prefix>-]kubepods-burstable.slice`/`…-besteffort.slice` (systemd).
fn is_qos(segment: &str) -> bool {
    if matches!(segment, "burstable" | "besteffort") {
        return true;
    }
    let Some(stem) = segment.strip_suffix(".slice") else {
        return false;
    };
    ["kubepods-burstable", "kubepods-besteffort"]
        .iter()
        .any(|q| stem == *q || stem.strip_suffix(q).is_some_and(|p| p.ends_with('-')))
}

/// A pod found in a path, and the index of its segment.
struct Found {
    index: usize,
    pod: PodContainer,
}

/// The pod and container below the kubelet root (segments from `root_len` on); the root's
/// own segments (a test's prefix, a kind node's container) are not read.
fn parse_below(
    path: &str,
    segments: &[&str],
    root_len: usize,
) -> Result<Option<Found>, IdentityError> {
    let bad = |reason: String| IdentityError::BadCgroupPath {
        path: path.to_owned(),
        reason,
    };
    let mut found: Option<(usize, String, Option<String>)> = None;
    // From the leaf: the pod nearest to the process wins, and every other pod segment must
    // agree with it.
    for (index, segment) in segments.iter().enumerate().rev() {
        if index < root_len {
            break;
        }
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
    Ok(Some(Found {
        index: pod_index,
        pod: PodContainer {
            pod_uid,
            container_id,
            qos,
        },
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
mod tests;
