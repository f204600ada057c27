//! Who is connecting: from the cgroup id the eBPF hooks report to a workload identity.
//!
//! cgroup id → cgroup path ([`cgroup::CgroupPaths`]) → pod UID and container id, only under
//! the kubelet's cgroup roots and through root-owned directories
//! ([`pod_path::KubeletCgroups`]) → the pod from a [`PodDirectory`] (the static
//! [`inventory::Inventory`] or the Kubernetes watch [`kube::KubePods`]) → a [`Workload`] with
//! the SPIFFE ID `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Ground floor: imports only the pod vocabulary (`pod`), `config`'s YAML helpers,
//! `pki::SpiffeId` and the metric names of `telemetry` (and the `kube` crate, in
//! `identity::kube`).
//!
//! The data plane only reads caches ([`lookup::Lookups::resolve`]); a cgroup id not seen
//! before is looked up on a thread of its own (`lookup`), one lookup per id however many
//! connections wait for it, and tree walks at most once per `cgroup_walk_interval`.
//!
//! The cgroup id must equal the cgroup directory's inode number, which holds on 64-bit
//! kernels since 5.5 (kernfs node ids became 64-bit inode numbers then).

pub mod cgroup;
pub mod inventory;
pub mod kube;
pub mod lookup;
pub mod pod_path;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use crate::config::ConfigError;
use crate::pki::{PkiError, SpiffeId};
use crate::pod::{PodDirectory, PodMeta};

use cgroup::CgroupPaths;
use pod_path::{KubeletCgroups, PodContainer};

/// Parsed paths kept per cgroup id; past this the cache starts over (a node runs a few
/// hundred containers, so this is only a bound against churn).
const MAX_CACHED_CGROUPS: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("/proc/self/mountinfo line {line}: {reason}")]
    Mountinfo { line: usize, reason: String },
    #[error(
        "no cgroup2 filesystem is mounted (cgroup v2 is required; hybrid hosts mount it at e.g. /sys/fs/cgroup/unified)"
    )]
    NoCgroup2Mount,
    #[error("no cgroup v2 entry (0::) in /proc/self/cgroup")]
    NoCgroup2Entry,
    #[error(
        "cgroup2 is mounted only as a subtree (at {mount_point}); the hierarchy root must be mounted"
    )]
    NoCgroup2Root { mount_point: String },
    #[error(
        "this process's cgroup is in no cgroup.procs under {} (is the host's cgroup v2 root mounted there?)", root.display()
    )]
    OwnCgroupNotFound { root: PathBuf },
    #[error(
        "cgroup id {id} is unknown under {root} (the process's cgroup is already gone, or is not in this hierarchy)"
    )]
    UnknownCgroup { id: u64, root: PathBuf },
    #[error(
        "cgroup path {path} names a pod outside the kubelet's cgroup roots ({roots}); refusing it, since a delegated cgroup subtree can imitate any pod's path"
    )]
    OutsideKubeletRoots { path: String, roots: String },
    #[error(
        "cgroup {dir} (on the way to {path}) belongs to uid {uid}, not root: a delegated cgroup cannot carry a pod's identity"
    )]
    NotRootOwned {
        path: String,
        dir: PathBuf,
        uid: u32,
    },
    #[error("bad kubelet cgroup root: {0}")]
    KubeletRoot(String),
    #[error("the cgroup lookup thread is not running")]
    LookupGone,
    /// One lookup's failure, told to every connection that waited for it.
    #[error(transparent)]
    Shared(Arc<IdentityError>),
    #[error("malformed cgroup path {path}: {reason}")]
    BadCgroupPath { path: String, reason: String },
    #[error("ambiguous cgroup path {path}: {reason}; refusing to pick one")]
    ConflictingCgroupPath { path: String, reason: String },
    #[error(
        "process outside any pod (cgroup {path}); configure a host identity or run it in a pod"
    )]
    NoHostIdentity { path: String },
    #[error("pod {uid} is not known (yet)")]
    UnknownPod { uid: String },
    #[error(
        "pod {uid} ({namespace}/{name}) is scheduled on node {node}, not on this node ({this_node})"
    )]
    OtherNode {
        uid: String,
        namespace: String,
        name: String,
        node: String,
        this_node: String,
    },
    #[error("container {container} is not one listed for pod {uid} ({namespace}/{name})")]
    ContainerNotListed {
        uid: String,
        namespace: String,
        name: String,
        container: String,
    },
    #[error(
        "process is in pod {uid}'s own cgroup, outside its containers, and only listed containers may use the pod's identity"
    )]
    NotInContainer { uid: String },
    #[error(transparent)]
    Inventory(#[from] ConfigError),
    #[error("bad trust domain: {0}")]
    TrustDomain(#[from] PkiError),
}

/// A resolved workload: what the node puts in its certificate request and preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub spiffe_id: SpiffeId,
    pub pod: PodMeta,
    pub labels: BTreeMap<String, String>,
}

/// Resolves cgroup ids to workloads. The hit path ([`Resolver::resolve_cached`]) is two
/// read locks, for the data plane; a miss walks the cgroup tree and stats directories, which
/// only the lookup thread ([`lookup::Lookups`]) and tests do.
pub struct Resolver {
    cgroups: CgroupPaths,
    /// Where pods may be, and who must own the way there.
    kubelet: KubeletCgroups,
    /// The node's pods, and the identity of processes outside any pod.
    pods: Box<dyn PodDirectory>,
    trust_domain: String,
    node_name: String,
    /// Path and parse result per cgroup id. A cgroup id is never reused while the kernel
    /// runs (64-bit, increasing), so an entry never goes stale; pod metadata is not cached
    /// here, because pods change.
    parsed: RwLock<HashMap<u64, Arc<Parsed>>>,
}

#[derive(Debug)]
struct Parsed {
    path: String,
    pod: Option<PodContainer>,
}

impl Resolver {
    /// A resolver over the pods of `pods`; processes outside any pod get the directory's
    /// host identity, and are refused when it has none.
    pub fn from_directory(
        cgroups: CgroupPaths,
        kubelet: KubeletCgroups,
        pods: Box<dyn PodDirectory>,
        trust_domain: &str,
        node_name: &str,
    ) -> Result<Self, IdentityError> {
        // Checked once here so that every identity built later is valid.
        SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/x/sa/x"))?;
        Ok(Self {
            cgroups,
            kubelet,
            pods,
            trust_domain: trust_domain.to_owned(),
            node_name: node_name.to_owned(),
            parsed: RwLock::new(HashMap::new()),
        })
    }

    /// The workload whose process runs in cgroup `cgroup_id`, or why there is none; walks
    /// the tree on a miss (not for the data plane: see [`Resolver::resolve_cached`]).
    pub fn resolve(&self, cgroup_id: u64) -> Result<Workload, IdentityError> {
        let parsed = match self.cached(cgroup_id) {
            Some(p) => p,
            None => {
                self.cgroups.path_of(cgroup_id);
                self.load_known(cgroup_id)?
            }
        };
        self.workload(&parsed)
    }

    /// The data plane's resolution: `None` when the cgroup's path is not parsed yet (ask
    /// [`lookup::Lookups`]), else the workload or why there is none. Takes read locks only.
    pub fn resolve_cached(&self, cgroup_id: u64) -> Option<Result<Workload, IdentityError>> {
        self.cached(cgroup_id).map(|p| self.workload(&p))
    }

    /// Whether `cgroup_id` needs a tree walk: neither parsed nor seen by the last walk.
    fn needs_walk(&self, cgroup_id: u64) -> bool {
        self.cached(cgroup_id).is_none() && self.cgroups.known(cgroup_id).is_none()
    }

    fn workload(&self, parsed: &Parsed) -> Result<Workload, IdentityError> {
        let Some(pc) = &parsed.pod else {
            let host = self
                .pods
                .host()
                .ok_or_else(|| IdentityError::NoHostIdentity {
                    path: parsed.path.clone(),
                })?;
            return Ok(Workload {
                spiffe_id: SpiffeId::new(
                    &self.trust_domain,
                    &host.namespace,
                    &host.service_account,
                ),
                pod: host.meta(),
                labels: BTreeMap::new(),
            });
        };
        let mut info = self
            .pods
            .pod(&pc.pod_uid)
            .ok_or_else(|| IdentityError::UnknownPod {
                uid: pc.pod_uid.clone(),
            })?;
        if info.node != self.node_name {
            return Err(IdentityError::OtherNode {
                uid: info.uid,
                namespace: info.namespace,
                name: info.name,
                node: info.node,
                this_node: self.node_name.clone(),
            });
        }
        if let Some(listed) = &info.containers {
            match &pc.container_id {
                None => {
                    return Err(IdentityError::NotInContainer { uid: info.uid });
                }
                Some(id) if !listed.contains(id) => {
                    return Err(IdentityError::ContainerNotListed {
                        uid: info.uid,
                        namespace: info.namespace,
                        name: info.name,
                        container: id.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        let spiffe_id = SpiffeId::new(&self.trust_domain, &info.namespace, &info.service_account);
        let labels = std::mem::take(&mut info.labels);
        Ok(Workload {
            spiffe_id,
            pod: info.into_meta(pc.container_id.clone()),
            labels,
        })
    }

    fn cached(&self, cgroup_id: u64) -> Option<Arc<Parsed>> {
        self.parsed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&cgroup_id)
            .cloned()
    }

    /// Parses the path the last walk found for `cgroup_id` (no walk), checks the owners of
    /// a pod's directories, and caches the result. Errors are not cached: they are rare and
    /// cheap to repeat, and a cgroup that was missing may appear.
    fn load_known(&self, cgroup_id: u64) -> Result<Arc<Parsed>, IdentityError> {
        if let Some(hit) = self.cached(cgroup_id) {
            return Ok(hit);
        }
        let path = self
            .cgroups
            .known(cgroup_id)
            .ok_or_else(|| IdentityError::UnknownCgroup {
                id: cgroup_id,
                root: self.cgroups.root().to_owned(),
            })?;
        let path = path
            .to_str()
            .ok_or_else(|| IdentityError::BadCgroupPath {
                path: path.to_string_lossy().into_owned(),
                reason: "not UTF-8".to_owned(),
            })?
            .to_owned();
        let pod = self.kubelet.parse(&path)?;
        if pod.is_some() {
            self.kubelet
                .check_owners(self.cgroups.root(), &path, cgroup_id)?;
        }
        let parsed = Arc::new(Parsed { path, pod });
        let mut cache = self.parsed.write().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED_CGROUPS {
            cache.clear();
        }
        cache.insert(cgroup_id, Arc::clone(&parsed));
        Ok(parsed)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> Self {
            let nonce: u64 = rand::random();
            let dir = std::env::temp_dir()
                .join(format!("dbgw-{prefix}-{}-{nonce:016x}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
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
}
