use std::path::Path;
use std::sync::Mutex;

use super::cgroup::id_of;
use super::inventory::Inventory;
use super::testing::TempDir;
use super::*;
use crate::pod::{HostIdentity, Pod};

const UID: &str = "0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
const UID_: &str = "0f9c1a2b_3c4d_4e5f_8a9b_0c1d2e3f4a5b";
const STRANGER: &str = "11111111-2222-3333-4444-555555555555";
const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
const OTHER_CID: &str = "aff34703e5e1f89443e9a1bffcc80f43f74d4808a2dd22c8f88c08547b323934";

/// A temporary cgroup root with a prefix, the way tests and the demo attach.
struct Tree {
    tmp: TempDir,
}

impl Tree {
    fn new() -> Self {
        Self {
            tmp: TempDir::new("identity"),
        }
    }

    /// Creates the cgroup directory and returns its id.
    fn cgroup(&self, rel: &str) -> u64 {
        let dir = self.tmp.path().join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        id_of(&dir).unwrap()
    }

    fn remove(&self, rel: &str) {
        std::fs::remove_dir(self.tmp.path().join(rel.trim_start_matches('/'))).unwrap();
    }

    fn resolver(&self, inventory: &str) -> Resolver {
        let inv = Inventory::parse(Path::new("inventory.yaml"), inventory).unwrap();
        Resolver::from_directory(
            CgroupPaths::new(self.tmp.path()),
            kubelet(),
            Box::new(inv),
            "example.org",
            "node-1",
        )
        .unwrap()
    }
}

/// The test prefix's kubelet root and cgroupfs's; directories must be ours (the test
/// makes them as whoever runs it).
fn kubelet() -> KubeletCgroups {
    KubeletCgroups::new(&["/dbgw-test-1234/kubepods.slice".into(), "/kubepods".into()])
        .unwrap()
        // SAFETY: geteuid has no preconditions.
        .with_owner(unsafe { libc::geteuid() })
}

fn pod_slice(uid_: &str) -> String {
    format!(
        "/dbgw-test-1234/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"
    )
}

fn inventory(node: &str, containers: &str, host: bool) -> String {
    let mut text = format!(
        "pods:
  - uid: {UID}
    namespace: team-a
    name: api-7d9f
    service_account: api
    node: {node}
    labels: {{ app: api }}
{containers}"
    );
    if host {
        text.push_str("host:\n  namespace: host\n  service_account: node-tools\n");
    }
    text
}

fn unwrap_err(r: Result<Workload, IdentityError>) -> IdentityError {
    match r {
        Ok(w) => panic!("resolved to {w:?}"),
        Err(e) => e,
    }
}

#[test]
fn container_in_a_known_pod_resolves() {
    let tree = Tree::new();
    let id = tree.cgroup(&format!("{}/cri-containerd-{CID}.scope", pod_slice(UID_)));
    let resolver = tree.resolver(&inventory("node-1", "", false));
    let w = resolver.resolve(id).unwrap();
    assert_eq!(
        w.spiffe_id.to_string(),
        "spiffe://example.org/ns/team-a/sa/api"
    );
    assert_eq!(
        w.pod,
        PodMeta {
            namespace: Some("team-a".into()),
            name: Some("api-7d9f".into()),
            uid: Some(UID.into()),
            container_id: Some(CID.into()),
            service_account: Some("api".into()),
        }
    );
    assert_eq!(w.labels.get("app").map(String::as_str), Some("api"));
}

#[test]
fn listed_container_and_unrestricted_pod_level_cgroup_resolve() {
    let tree = Tree::new();
    let container = tree.cgroup(&format!("{}/crio-{CID}.scope", pod_slice(UID_)));
    let pod_level = tree.cgroup(&pod_slice(UID_));
    let listed = format!("    containers: [\"{CID}\"]\n");
    let restricted = tree.resolver(&inventory("node-1", &listed, false));
    assert_eq!(
        restricted
            .resolve(container)
            .unwrap()
            .pod
            .container_id
            .as_deref(),
        Some(CID)
    );
    let open = tree.resolver(&inventory("node-1", "", false));
    let w = open.resolve(pod_level).unwrap();
    assert_eq!(w.pod.uid.as_deref(), Some(UID));
    assert_eq!(w.pod.container_id, None);
}

#[test]
fn unknown_cgroup_id_is_an_error() {
    let tree = Tree::new();
    tree.cgroup("/system.slice");
    let resolver = tree.resolver(&inventory("node-1", "", true));
    let err = unwrap_err(resolver.resolve(u64::MAX));
    assert!(
        matches!(err, IdentityError::UnknownCgroup { id: u64::MAX, .. }),
        "{err}"
    );
}

#[test]
fn host_process_is_refused_without_a_host_identity() {
    let tree = Tree::new();
    let id = tree.cgroup("/system.slice/sshd.service");
    let resolver = tree.resolver(&inventory("node-1", "", false));
    let err = unwrap_err(resolver.resolve(id));
    assert!(matches!(err, IdentityError::NoHostIdentity { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("process outside any pod")
            && msg.contains("/system.slice/sshd.service")
            && msg.contains("configure a host identity or run it in a pod"),
        "{msg}"
    );
}

#[test]
fn host_process_gets_the_configured_host_identity() {
    let tree = Tree::new();
    let id = tree.cgroup("/system.slice/sshd.service");
    let resolver = tree.resolver(&inventory("node-1", "", true));
    let w = resolver.resolve(id).unwrap();
    assert_eq!(
        w.spiffe_id.to_string(),
        "spiffe://example.org/ns/host/sa/node-tools"
    );
    assert_eq!(
        w.pod,
        PodMeta {
            namespace: Some("host".into()),
            service_account: Some("node-tools".into()),
            ..PodMeta::default()
        }
    );
    assert!(w.labels.is_empty());
}

#[test]
fn pod_missing_from_the_inventory_is_not_known_yet() {
    let tree = Tree::new();
    let stranger_ = STRANGER.replace('-', "_");
    let id = tree.cgroup(&format!(
        "{}/cri-containerd-{CID}.scope",
        pod_slice(&stranger_)
    ));
    let resolver = tree.resolver(&inventory("node-1", "", true));
    let err = unwrap_err(resolver.resolve(id));
    assert_eq!(
        err.to_string(),
        format!("pod {STRANGER} is not known (yet)")
    );
}

#[test]
fn pod_source_changes_show_through_the_cache() {
    /// A source that learns pods while running, like a Kubernetes watch.
    struct Late(Arc<Mutex<Option<Pod>>>);
    impl PodDirectory for Late {
        fn pod(&self, uid: &str) -> Option<Pod> {
            let pod = self.0.lock().unwrap().clone();
            pod.filter(|p| p.uid == uid)
        }
        fn host(&self) -> Option<&HostIdentity> {
            None
        }
    }
    let tree = Tree::new();
    let id = tree.cgroup(&format!("{}/docker-{CID}.scope", pod_slice(UID_)));
    let slot = Arc::new(Mutex::new(None));
    let resolver = Resolver::from_directory(
        CgroupPaths::new(tree.tmp.path()),
        kubelet(),
        Box::new(Late(Arc::clone(&slot))),
        "example.org",
        "node-1",
    )
    .unwrap();
    assert!(matches!(
        resolver.resolve(id),
        Err(IdentityError::UnknownPod { .. })
    ));
    let inv = Inventory::parse(Path::new("i.yaml"), &inventory("node-1", "", false)).unwrap();
    *slot.lock().unwrap() = inv.lookup(UID).cloned();
    assert_eq!(resolver.resolve(id).unwrap().pod.uid.as_deref(), Some(UID));
}

#[test]
fn pod_on_another_node_is_refused() {
    let tree = Tree::new();
    let id = tree.cgroup(&format!("{}/cri-containerd-{CID}.scope", pod_slice(UID_)));
    let resolver = tree.resolver(&inventory("node-2", "", false));
    let err = unwrap_err(resolver.resolve(id));
    assert!(matches!(err, IdentityError::OtherNode { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("node-2") && msg.contains("node-1"), "{msg}");
}

#[test]
fn unlisted_container_and_pod_level_cgroup_are_refused_when_containers_are_listed() {
    let tree = Tree::new();
    let other = tree.cgroup(&format!(
        "{}/cri-containerd-{OTHER_CID}.scope",
        pod_slice(UID_)
    ));
    let pod_level = tree.cgroup(&pod_slice(UID_));
    let listed = format!("    containers: [\"{CID}\"]\n");
    let resolver = tree.resolver(&inventory("node-1", &listed, false));
    let err = unwrap_err(resolver.resolve(other));
    assert!(
        matches!(&err, IdentityError::ContainerNotListed { container, .. } if container == OTHER_CID),
        "{err}"
    );
    let err = unwrap_err(resolver.resolve(pod_level));
    assert!(matches!(err, IdentityError::NotInContainer { .. }), "{err}");
}

#[test]
fn conflicting_and_malformed_paths_are_refused() {
    let tree = Tree::new();
    let nested = tree.cgroup(&format!(
        "/kubepods/pod{STRANGER}/{OTHER_CID}/kubepods/pod{UID}/{CID}"
    ));
    let malformed = tree.cgroup(&format!(
        "{}/cri-containerd-{}.scope",
        pod_slice(UID_),
        &CID[..12]
    ));
    let resolver = tree.resolver(&inventory("node-1", "", true));
    let err = unwrap_err(resolver.resolve(nested));
    assert!(
        matches!(err, IdentityError::ConflictingCgroupPath { .. }),
        "{err}"
    );
    // With a host identity configured, a broken pod path still must not become "host".
    let err = unwrap_err(resolver.resolve(malformed));
    assert!(matches!(err, IdentityError::BadCgroupPath { .. }), "{err}");
}

#[test]
fn parsed_paths_are_cached_per_cgroup_id() {
    let tree = Tree::new();
    let rel = format!("{}/cri-containerd-{CID}.scope", pod_slice(UID_));
    let id = tree.cgroup(&rel);
    let resolver = tree.resolver(&inventory("node-1", "", false));
    let first = resolver.resolve(id).unwrap();
    // The directory is gone, and a rescan would forget it; the cached parse answers.
    tree.remove(&rel);
    resolver.cgroups.rescan();
    assert_eq!(resolver.resolve(id).unwrap(), first);
}

#[test]
fn bad_trust_domain_is_refused_up_front() {
    let result = Resolver::from_directory(
        CgroupPaths::new("/nonexistent"),
        kubelet(),
        Box::new(Inventory::default()),
        "Example Org",
        "node-1",
    );
    assert!(matches!(result, Err(IdentityError::TrustDomain(_))));
}

/// Issue 18 item 1: below the kubelet root, a directory given to another user (a
/// delegated container cgroup, a chown by mistake) takes the path out of the kubelet's
/// hands: nothing under it is a pod's. (Needs root to give a directory away.)
#[test]
fn hardening_01_pod_path_through_a_directory_not_owned_by_root_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root to chown a directory");
        return;
    }
    let tree = Tree::new();
    let rel = format!("{}/cri-containerd-{CID}.scope", pod_slice(UID_));
    let id = tree.cgroup(&rel);
    let resolver = tree.resolver(&inventory("node-1", "", false));
    let qos = tree
        .tmp
        .path()
        .join("dbgw-test-1234/kubepods.slice/kubepods-burstable.slice");
    std::os::unix::fs::chown(&qos, Some(1000), Some(1000)).unwrap();
    let err = unwrap_err(resolver.resolve(id));
    assert!(
        matches!(&err, IdentityError::NotRootOwned { dir, uid: 1000, .. } if *dir == qos),
        "{err}"
    );
    assert!(err.to_string().contains("belongs to uid 1000"), "{err}");
    // Given back, the same cgroup is the pod's again.
    std::os::unix::fs::chown(&qos, Some(0), Some(0)).unwrap();
    assert_eq!(resolver.resolve(id).unwrap().pod.uid.as_deref(), Some(UID));
}

/// A cgroup outside the kubelet's roots that imitates a pod is refused even with a
/// host identity configured: it is not a host process to be given that either.
#[test]
fn hardening_01_imitation_outside_the_roots_is_refused_not_host() {
    let tree = Tree::new();
    let id = tree.cgroup(&format!(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ));
    let resolver = tree.resolver(&inventory("node-1", "", true));
    let err = unwrap_err(resolver.resolve(id));
    assert!(
        matches!(err, IdentityError::OutsideKubeletRoots { .. }),
        "{err}"
    );
}
