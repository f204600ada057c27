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
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";
    const OTHER_UID: &str = "daa5c7ee-3484-4533-af39-3591564fd03e";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const OTHER_CID: &str = "aff34703e5e1f89443e9a1bffcc80f43f74d4808a2dd22c8f88c08547b323934";

    /// The default roots of both drivers, a test prefix and kind's layouts.
    fn kubelet() -> KubeletCgroups {
        KubeletCgroups::new(&[
            "/kubepods.slice".to_owned(),
            "/kubepods".to_owned(),
            "/dbgw-test-1234/kubepods.slice".to_owned(),
            "/kubelet.slice/kubelet-kubepods.slice".to_owned(),
            format!("/docker/{OTHER_CID}/kubepods"),
        ])
        .unwrap()
    }

    fn outside(path: &str) -> String {
        match kubelet().parse(path) {
            Err(e @ IdentityError::OutsideKubeletRoots { .. }) => e.to_string(),
            other => panic!("{path}: expected OutsideKubeletRoots, got {other:?}"),
        }
    }

    fn pod(path: &str) -> PodContainer {
        match kubelet().parse(path) {
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
        match kubelet().parse(path) {
            Err(e @ IdentityError::BadCgroupPath { .. }) => e.to_string(),
            other => panic!("{path}: expected BadCgroupPath, got {other:?}"),
        }
    }

    fn conflict(path: &str) -> String {
        match kubelet().parse(path) {
            Err(e @ IdentityError::ConflictingCgroupPath { .. }) => e.to_string(),
            other => panic!("{path}: expected ConflictingCgroupPath, got {other:?}"),
        }
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
        // A bare `pod<uid>` outside the kubelet's roots is an imitation, not a pod.
        outside(&format!("/dbgw-test-7/pod{UID}/{CID}"));
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
            assert_eq!(kubelet().parse(path).unwrap(), None, "{path}");
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
        // Outside the kubelet's roots, even a malformed pod segment is refused.
        outside("/dbgw-test-1/pod12ab");
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

    /// Issue 18 item 1: a user with a delegated cgroup subtree (`user@UID.service`, rootless
    /// containers) builds the victim's kubelet-shaped path; outside the kubelet's roots, or
    /// anywhere below them but where the kubelet puts pods, it names no pod.
    #[test]
    fn hardening_01_delegated_cgroup_cannot_take_pod_identity() {
        let user = "/user.slice/user-1000.slice/user@1000.service";
        let msg = outside(&format!(
            "{user}/app.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ));
        assert!(
            msg.contains("outside the kubelet's cgroup roots") && msg.contains("/kubepods.slice"),
            "{msg}"
        );
        // The whole kubelet layout rebuilt inside the delegated subtree, either driver.
        outside(&format!(
            "{user}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ));
        outside(&format!("{user}/kubepods/burstable/pod{UID}/{CID}"));
        // A rootless container runtime's own cgroups.
        outside(&format!(
            "/system.slice/podman-1234.scope/kubepods-pod{UID_}.slice/crio-{CID}.scope"
        ));
        // Below a root, a pod segment counts only directly under it or its QoS cgroup.
        let deep = bad(&format!(
            "/kubepods.slice/evil.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ));
        assert!(deep.contains("not where the kubelet puts pods"), "{deep}");
        bad(&format!(
            "/kubepods.slice/kubepods-burstable.slice/x.slice/kubepods-burstable-pod{UID_}.slice"
        ));
        bad(&format!("/kubepods/burstable/besteffort/pod{UID}/{CID}"));
        // Nested under another pod's container (a delegated container cgroup).
        conflict(&format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{OTHER_CID}.scope/kubepods-pod{UID_}.slice",
            OTHER_UID.replace('-', "_")
        ));
        // The real layouts still resolve.
        expect(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            UID,
            Some(CID),
            Some("burstable"),
        );
    }

    #[test]
    fn kubelet_roots_are_checked() {
        for bad_root in [
            "",
            "/",
            "kubepods.slice",
            "/a/../kubepods",
            "/a//b",
            "/./kubepods",
        ] {
            let r = KubeletCgroups::new(&[bad_root.to_owned()]);
            assert!(
                matches!(r, Err(IdentityError::KubeletRoot(_))),
                "{bad_root:?}: {r:?}"
            );
        }
        assert!(matches!(
            KubeletCgroups::new(&[]),
            Err(IdentityError::KubeletRoot(_))
        ));
    }
}
