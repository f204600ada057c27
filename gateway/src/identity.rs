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
mod tests;
