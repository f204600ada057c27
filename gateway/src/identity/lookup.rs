//! Cgroup ids the data plane has not seen yet, looked up off the data plane.
//!
//! A miss means walking the whole cgroup tree (the id is a directory's inode, and nothing
//! maps it back but a walk) and stat'ing the pod's directories. Done on an io_uring thread,
//! that would stall every connection of the thread, and a burst of connects from a new pod
//! would queue on the walk. So the data plane reads only the [`Resolver`]'s caches and sends
//! misses here, to one thread that:
//! - answers each cgroup id once per round however many connections ask for it (single
//!   flight: 200 connects of a new pod make one lookup);
//! - walks the tree only for ids the last walk did not see, and at most once per
//!   `min_walk_interval` (a flood of connects from short-lived cgroups costs one walk per
//!   interval, not one per connect); asks that arrive meanwhile join the next walk.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{IdentityError, Resolver, Workload};
use crate::telemetry::node as telemetry;

type Reply = oneshot::Sender<Result<(), Arc<IdentityError>>>;

/// One connection's ask: make `id`'s parse cached, or say why not.
struct Ask {
    id: u64,
    reply: Reply,
}

/// The data plane's handle: the resolver's caches, and the lookup thread for misses.
pub struct Lookups {
    resolver: Arc<Resolver>,
    asks: mpsc::Sender<Ask>,
}

impl Lookups {
    /// Starts the lookup thread over `resolver`; it ends when the last handle is dropped.
    pub fn spawn(resolver: Resolver, min_walk_interval: Duration) -> std::io::Result<Self> {
        let resolver = Arc::new(resolver);
        let (asks, rx) = mpsc::channel();
        let serving = resolver.clone();
        std::thread::Builder::new()
            .name("cgroup-lookup".into())
            .spawn(move || serve(&serving, &rx, min_walk_interval))?;
        Ok(Self { resolver, asks })
    }

    /// The workload of `cgroup_id`: from the caches (read locks only), or after the lookup
    /// thread has looked the id up. Never walks the tree or stats a file itself.
    pub async fn resolve(&self, cgroup_id: u64) -> Result<Workload, IdentityError> {
        if let Some(r) = self.resolver.resolve_cached(cgroup_id) {
            return r;
        }
        let (reply, answer) = oneshot::channel();
        self.asks
            .send(Ask {
                id: cgroup_id,
                reply,
            })
            .map_err(|_| IdentityError::LookupGone)?;
        answer
            .await
            .map_err(|_| IdentityError::LookupGone)?
            .map_err(IdentityError::Shared)?;
        // Cached now (unless the cache just started over, which only churn beyond
        // MAX_CACHED_CGROUPS does: then the id is looked up once more).
        match self.resolver.resolve_cached(cgroup_id) {
            Some(r) => r,
            None => Box::pin(self.resolve(cgroup_id)).await,
        }
    }

    /// The resolver, for callers that only read its caches.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }
}

/// The lookup thread: rounds of asks, at most one walk per round and per interval.
fn serve(resolver: &Resolver, rx: &mpsc::Receiver<Ask>, min_walk_interval: Duration) {
    let mut last_walk: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        let mut waiting: HashMap<u64, Vec<Reply>> = HashMap::new();
        add(&mut waiting, first);
        rx.try_iter().for_each(|a| add(&mut waiting, a));
        if waiting.keys().any(|id| resolver.needs_walk(*id)) {
            // Rate limit: wait out the interval since the last walk, gathering the asks
            // that come meanwhile into this round.
            if let Some(at) = last_walk {
                let next = at + min_walk_interval;
                loop {
                    let now = Instant::now();
                    if now >= next {
                        break;
                    }
                    match rx.recv_timeout(next - now) {
                        Ok(a) => add(&mut waiting, a),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            resolver.cgroups.rescan();
            last_walk = Some(Instant::now());
            metrics::counter!(telemetry::CGROUP_WALKS_TOTAL).increment(1);
        }
        for (id, replies) in waiting {
            let r = resolver.load_known(id).map(drop).map_err(Arc::new);
            for reply in replies {
                // The connection may have gone meanwhile.
                let _ = reply.send(r.clone());
            }
        }
    }
}

fn add(waiting: &mut HashMap<u64, Vec<Reply>>, a: Ask) {
    waiting.entry(a.id).or_default().push(a.reply);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::identity::cgroup::{CgroupPaths, id_of};
    use crate::identity::inventory::Inventory;
    use crate::identity::pod_path::KubeletCgroups;
    use crate::identity::testing::TempDir;

    const UID: &str = "0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    const UID_: &str = "0f9c1a2b_3c4d_4e5f_8a9b_0c1d2e3f4a5b";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn lookups(tmp: &TempDir, interval: Duration) -> Lookups {
        let inv = format!(
            "pods:\n  - {{uid: {UID}, namespace: a, name: p, service_account: s, node: n}}\n"
        );
        let resolver = Resolver::from_directory(
            CgroupPaths::new(tmp.path()),
            KubeletCgroups::new(&["/kubepods.slice".into()])
                .unwrap()
                // SAFETY: geteuid has no preconditions.
                .with_owner(unsafe { libc::geteuid() }),
            Box::new(Inventory::parse(Path::new("i.yaml"), &inv).unwrap()),
            "td",
            "n",
        )
        .unwrap();
        Lookups::spawn(resolver, interval).unwrap()
    }

    fn mkdir(tmp: &TempDir, rel: &str) -> u64 {
        let dir = tmp.path().join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        id_of(&dir).unwrap()
    }

    /// Issue 18 item 9: a burst of connects from a new pod makes one lookup and one walk,
    /// and unknown ids walk at most once per interval; the data plane never walks.
    #[test]
    fn hardening_09_lookups_are_single_flight_and_walks_rate_limited() {
        let tmp = TempDir::new("lookup");
        let l = lookups(&tmp, Duration::from_millis(300));
        let pod = mkdir(
            &tmp,
            &format!("kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let burst = (0..200).map(|_| l.resolve(pod));
            for r in futures_util::future::join_all(burst).await {
                assert_eq!(r.unwrap().pod.uid.as_deref(), Some(UID));
            }
            assert_eq!(l.resolver.cgroups.walks(), 1, "one walk for the burst");
            // Cached from now on: no walk, no ask.
            l.resolve(pod).await.unwrap();
            assert_eq!(l.resolver.cgroups.walks(), 1);
            // Ids that exist nowhere: each round may walk, but not more than once per
            // interval.
            let t0 = Instant::now();
            for id in [u64::MAX, u64::MAX - 1, u64::MAX - 2] {
                let e = l.resolve(id).await.unwrap_err();
                assert!(e.to_string().contains("is unknown under"), "{e}");
            }
            assert_eq!(l.resolver.cgroups.walks(), 4);
            assert!(
                t0.elapsed() >= Duration::from_millis(600),
                "walks not rate-limited: {:?}",
                t0.elapsed()
            );
        });
    }
}
