//! Pod metadata from the Kubernetes API: a list+watch of the pods scheduled on this node,
//! kept in memory so that identity lookups on the data path never wait for the network.
//!
//! A node agent requests only pods with `spec.nodeName=<node>`: it has no business knowing
//! other nodes' pods, and the field selector keeps both the API server's work and its
//! memory proportional to one node (a few hundred pods), not the cluster. The CA watches
//! every pod ([`KubePods::spawn_cluster`]): it is the one that decides which node a pod is
//! on, from `spec.nodeName` as the API server has it.
//!
//! The list, the watch, resuming a broken watch from the last `resourceVersion` (and
//! re-listing when the server answers 410 Gone) are `kube::runtime::watcher`'s; this module
//! turns its events into a map UID → [`Pod`] and says when the first list is in.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod as KubePod};
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::pod::{HostIdentity, Pod, PodDirectory};
use crate::telemetry::identity::KUBE_WATCH_ERRORS;

/// The service account Kubernetes runs a pod as when its spec names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Pods of one node, kept current by a watch on the API server.
///
/// Lookups read an in-memory map under a read lock, so they are cheap enough for the
/// data-plane threads. A pod created a moment ago may not be in it yet: callers treat
/// `None` as "not known yet", not as "no such pod".
pub struct KubePods {
    state: Arc<State>,
    host: Option<HostIdentity>,
    /// The watch task, stopped when the last handle goes: it only serves this map.
    task: tokio::task::AbortHandle,
}

/// What the watch task and the readers share.
#[derive(Default)]
struct State {
    pods: RwLock<HashMap<String, Pod>>,
    /// Set once the first complete list has been applied, never cleared: after that the
    /// map is at worst stale while the watch recovers, which is better than refusing all.
    ready: Mutex<bool>,
    ready_changed: Condvar,
}

impl KubePods {
    /// Starts watching the pods of `node` on `handle`'s runtime; processes outside any pod
    /// get no identity from this directory.
    pub fn spawn(client: kube::Client, node: &str, handle: &tokio::runtime::Handle) -> Arc<Self> {
        Self::spawn_with_host(client, node, None, handle)
    }

    /// Like [`KubePods::spawn`], with the identity for processes outside any pod (the
    /// Kubernetes API has no notion of one, so it comes from our own configuration).
    pub fn spawn_with_host(
        client: kube::Client,
        node: &str,
        host: Option<HostIdentity>,
        handle: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        Self::start(client, Some(node.to_owned()), host, handle)
    }

    /// Watches every pod of the cluster (the CA's directory: each pod carries the node the
    /// API server placed it on, and the CA signs only for the node that asks for it).
    pub fn spawn_cluster(client: kube::Client, handle: &tokio::runtime::Handle) -> Arc<Self> {
        Self::start(client, None, None, handle)
    }

    fn start(
        client: kube::Client,
        node: Option<String>,
        host: Option<HostIdentity>,
        handle: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        let state = Arc::new(State::default());
        let task = handle
            .spawn(watch(client, node, Arc::clone(&state)))
            .abort_handle();
        Arc::new(Self { state, host, task })
    }

    /// Blocks until the first complete list of this node's pods is in, or `timeout` has
    /// passed; returns whether it is in. Before that every pod is unknown, so the agent
    /// should not report ready. Blocking: call it from start-up code or `spawn_blocking`,
    /// not from an async task.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut ready = self
            .state
            .ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !*ready {
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                // A timeout too large to add to now: wait in day-long slices.
                None => Duration::from_secs(86_400),
            };
            if left.is_zero() {
                return false;
            }
            ready = self
                .state
                .ready_changed
                .wait_timeout(ready, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Whether the first complete list is in (non-blocking, for `/readyz` polling).
    pub fn is_ready(&self) -> bool {
        *self
            .state
            .ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// How many pods the map holds now.
    pub fn len(&self) -> usize {
        self.state.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KubePods {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodDirectory for KubePods {
    fn pod(&self, uid: &str) -> Option<Pod> {
        self.state.read().get(uid).cloned()
    }

    /// The identity configured for processes outside any pod (the API has no notion of one).
    fn host(&self) -> Option<&HostIdentity> {
        self.host.as_ref()
    }
}

impl State {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Pod>> {
        self.pods.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Pod>> {
        self.pods.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_ready(&self) {
        let mut ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
        if !*ready {
            *ready = true;
            self.ready_changed.notify_all();
        }
    }
}

/// Runs the watch for good. Errors (API server down, 403, a broken stream) are logged and
/// retried after the runtime's default backoff (0.8 s doubling to 30 s, with jitter, the
/// client-go reflector's numbers), so a flapping API server is not hammered.
async fn watch(client: kube::Client, node: Option<String>, state: Arc<State>) {
    let api: Api<KubePod> = Api::all(client);
    let mut config = watcher::Config::default();
    if let Some(node) = &node {
        config = config.fields(&format!("spec.nodeName={node}"));
    }
    // For the logs: this node's pods, or the cluster's.
    let node = node.unwrap_or_else(|| "*".into());
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    // Pods of a list in progress. The map is replaced only when the list is complete, so
    // a re-list (after 410 Gone) neither empties the map meanwhile nor keeps pods that
    // were deleted while the watch was down.
    let mut listing: Option<HashMap<String, Pod>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing = Some(HashMap::new()),
            Ok(Event::InitApply(pod)) => {
                if let Some(info) = pod_info(&pod) {
                    listing
                        .get_or_insert_default()
                        .insert(info.uid.clone(), info);
                }
            }
            Ok(Event::InitDone) => {
                let pods = listing.take().unwrap_or_default();
                tracing::info!(node = %node, pods = pods.len(), "pod list in");
                *state.write() = pods;
                state.set_ready();
            }
            Ok(Event::Apply(pod)) => {
                if let Some(info) = pod_info(&pod) {
                    tracing::debug!(
                        uid = %info.uid,
                        namespace = %info.namespace,
                        name = %info.name,
                        "pod applied"
                    );
                    state.write().insert(info.uid.clone(), info);
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    tracing::debug!(uid = %uid, "pod deleted");
                    state.write().remove(&uid.to_ascii_lowercase());
                }
            }
            Err(e) => {
                metrics::counter!(KUBE_WATCH_ERRORS).increment(1);
                tracing::warn!(node = %node, error = %e, "pod watch failed; backing off");
            }
        }
    }
    // The watcher retries forever and the backoff never gives up, so this is a bug.
    tracing::error!(node = %node, "pod watch ended; pod metadata is no longer updated");
}

/// What the gateway needs of a pod; `None` (logged) for a pod without UID or namespace,
/// which the API server never sends, since such a pod could not be looked up or named.
fn pod_info(pod: &KubePod) -> Option<Pod> {
    let meta = &pod.metadata;
    let (Some(uid), Some(namespace)) = (meta.uid.as_deref(), meta.namespace.as_deref()) else {
        tracing::warn!(name = ?meta.name, "pod without uid or namespace ignored");
        return None;
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let statuses = status
        .into_iter()
        .flat_map(|s| [&s.container_statuses, &s.init_container_statuses])
        .flatten()
        .flatten();
    let containers: Vec<String> = statuses.filter_map(container_id).collect();
    Some(Pod {
        // The API server writes UIDs in lower case; the cgroup side normalises to that too.
        uid: uid.to_ascii_lowercase(),
        namespace: namespace.to_owned(),
        name: meta.name.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|sa| !sa.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned()),
        // A pod on another node never matches the field selector; an empty node makes the
        // resolver refuse it should one slip through anyway.
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        // Only the containers the kubelet reports as created get the pod's identity; before
        // any is, the pod is unrestricted (its cgroup is all there is). Ephemeral (debug)
        // containers are left out on purpose: they are an operator's, not the workload's.
        containers: (!containers.is_empty()).then_some(containers),
    })
}

/// A container's runtime id without its scheme (`containerd://<id>`, `cri-o://<id>`,
/// `docker://<id>`): the bare id is what appears in the cgroup path.
fn container_id(status: &ContainerStatus) -> Option<String> {
    let id = status.container_id.as_deref()?;
    let bare = id.split_once("://").map_or(id, |(_, bare)| bare);
    (!bare.is_empty()).then(|| bare.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    //! Against a local HTTP server that speaks the API server's JSON: the real client and
    //! watcher, only the cluster is fake.

    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::{Bytes, Frame, Incoming};
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use serde_json::{Value, json};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    const NODE: &str = "node-1";
    const SELECTOR: &str = "fieldSelector=spec.nodeName%3Dnode-1";
    const UID_A: &str = "0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    const UID_B: &str = "11111111-2222-3333-4444-555555555555";
    const CID_1: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
    const CID_2: &str = "aff34703e5e1f89443e9a1bffcc80f43f74d4808a2dd22c8f88c08547b323934";
    const WAIT: Duration = Duration::from_secs(10);

    type Body = UnsyncBoxBody<Bytes, Infallible>;

    /// One watch request the server has accepted: its query, and the sending end of its
    /// response body (dropping it ends the watch, as the API server does on timeout).
    struct WatchConn {
        query: String,
        events: mpsc::UnboundedSender<Bytes>,
    }

    impl WatchConn {
        fn send(&self, kind: &str, object: Value) {
            let line = format!("{}\n", json!({ "type": kind, "object": object }));
            self.events.send(Bytes::from(line)).unwrap();
        }

        fn resource_version(&self) -> Option<&str> {
            param(&self.query, "resourceVersion")
        }
    }

    struct Shared {
        /// The field selector every request must carry (a node agent's), or `None` for
        /// the CA's watch, which must carry none.
        selector: Option<&'static str>,
        /// Every request's `path?query`, in order.
        requests: Mutex<Vec<String>>,
        /// List answers, consumed one per list request; 500 when none is left.
        lists: Mutex<VecDeque<(StatusCode, Value)>>,
        watches: mpsc::UnboundedSender<WatchConn>,
    }

    struct FakeApiServer {
        addr: SocketAddr,
        shared: Arc<Shared>,
        watches: mpsc::UnboundedReceiver<WatchConn>,
    }

    impl FakeApiServer {
        async fn start() -> Self {
            Self::serving(Some(SELECTOR)).await
        }

        /// A server for the CA's cluster-wide watch.
        async fn start_cluster() -> Self {
            Self::serving(None).await
        }

        async fn serving(selector: Option<&'static str>) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, watches) = mpsc::unbounded_channel();
            let shared = Arc::new(Shared {
                selector,
                requests: Mutex::new(Vec::new()),
                lists: Mutex::new(VecDeque::new()),
                watches: tx,
            });
            let server = Arc::clone(&shared);
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let shared = Arc::clone(&server);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, Infallible>(answer(&shared, &req)) }
                        });
                        // Errors here are the client going away mid-watch; not our concern.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Self {
                addr,
                shared,
                watches,
            }
        }

        fn push_list(&self, resource_version: &str, items: Vec<Value>) {
            let list = json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": { "resourceVersion": resource_version },
                "items": items,
            });
            self.shared
                .lists
                .lock()
                .unwrap()
                .push_back((StatusCode::OK, list));
        }

        fn push_list_error(&self, code: StatusCode) {
            self.shared
                .lists
                .lock()
                .unwrap()
                .push_back((code, status(code.as_u16(), "InternalError")));
        }

        fn client(&self) -> kube::Client {
            let url = format!("http://{}", self.addr).parse().unwrap();
            kube::Client::try_from(kube::Config::new(url)).unwrap()
        }

        async fn next_watch(&mut self) -> WatchConn {
            tokio::time::timeout(WAIT, self.watches.recv())
                .await
                .expect("a watch request in time")
                .unwrap()
        }

        fn requests(&self) -> Vec<String> {
            self.shared.requests.lock().unwrap().clone()
        }

        fn lists_requested(&self) -> usize {
            self.requests()
                .iter()
                .filter(|r| param(r, "watch").is_none())
                .count()
        }

        /// Every request was for this node's pods only: cluster-wide path with our field
        /// selector. Other nodes' pods are never asked for.
        fn assert_only_this_node_requested(&self) {
            let requests = self.requests();
            assert!(!requests.is_empty());
            for r in &requests {
                assert!(r.starts_with("/api/v1/pods?"), "{r}");
                assert!(r.split(['?', '&']).any(|kv| kv == SELECTOR), "{r}");
            }
        }
    }

    fn param<'a>(path_query: &'a str, name: &str) -> Option<&'a str> {
        let (_, query) = path_query.split_once('?')?;
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": reason, "reason": reason, "code": code,
        })
    }

    fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
            .unwrap()
    }

    /// The API server's side: lists from the queue, watches handed to the test. Refuses
    /// (400, recorded) anything that is not this node's pods, so a wrong request fails
    /// both here and in [`FakeApiServer::assert_only_this_node_requested`].
    fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
        let path_query = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_default();
        shared.requests.lock().unwrap().push(path_query.clone());
        let selected = match shared.selector {
            Some(selector) => path_query.split(['?', '&']).any(|kv| kv == selector),
            None => param(&path_query, "fieldSelector").is_none(),
        };
        if req.uri().path() != "/api/v1/pods" || !selected {
            return json_response(StatusCode::BAD_REQUEST, &status(400, "BadRequest"));
        }
        if param(&path_query, "watch") == Some("true") {
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            shared
                .watches
                .send(WatchConn {
                    query: path_query,
                    events: tx,
                })
                .unwrap();
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                let line = rx.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(line)), rx))
            });
            return Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(frames).boxed_unsync())
                .unwrap();
        }
        let (code, body) = shared.lists.lock().unwrap().pop_front().unwrap_or_else(|| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                status(500, "no list scripted"),
            )
        });
        json_response(code, &body)
    }

    /// A pod as the API server serialises it; `containers` are full `scheme://id` strings.
    fn pod(uid: &str, name: &str, rv: &str, labels: Value, containers: &[&str]) -> Value {
        let statuses: Vec<Value> = containers
            .iter()
            .enumerate()
            .map(|(i, id)| {
                json!({
                    "name": format!("c{i}"), "containerID": id, "image": "app:1",
                    "imageID": "", "ready": true, "restartCount": 0,
                })
            })
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name, "namespace": "team-a", "uid": uid,
                "resourceVersion": rv, "labels": labels,
            },
            "spec": {
                "nodeName": NODE,
                "serviceAccountName": "api",
                "containers": [{ "name": "c0", "image": "app:1" }],
            },
            "status": { "phase": "Running", "containerStatuses": statuses },
        })
    }

    async fn wait_ready(pods: &Arc<KubePods>) -> bool {
        let pods = Arc::clone(pods);
        tokio::task::spawn_blocking(move || pods.wait_ready(WAIT))
            .await
            .unwrap()
    }

    /// Polls until `check` holds for the pod (or its absence); the watch applies events on
    /// its own task.
    async fn eventually(pods: &KubePods, uid: &str, check: impl Fn(Option<&Pod>) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let pod = PodDirectory::pod(pods, uid);
            if check(pod.as_ref()) {
                return;
            }
            assert!(Instant::now() < deadline, "pod {uid} is still {pod:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn initial_list_is_visible_once_ready() {
        let mut server = FakeApiServer::start().await;
        let mut host_net = pod(UID_B, "db-0", "9", json!({}), &[]);
        host_net["spec"]["hostNetwork"] = json!(true);
        host_net["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        host_net["status"]["initContainerStatuses"] = json!([{
            "name": "init", "containerID": format!("cri-o://{CID_2}"), "image": "init:1",
            "imageID": "", "ready": false, "restartCount": 0,
        }]);
        server.push_list(
            "10",
            vec![
                pod(
                    UID_A,
                    "api-7d9f",
                    "8",
                    json!({ "app": "api" }),
                    &[&format!("containerd://{CID_1}")],
                ),
                host_net,
            ],
        );
        let pods = KubePods::spawn(server.client(), NODE, &tokio::runtime::Handle::current());
        assert!(wait_ready(&pods).await);
        assert!(pods.is_ready());
        assert_eq!(pods.len(), 2);

        let a = PodDirectory::pod(&*pods, UID_A).expect("listed pod");
        assert_eq!(
            a,
            Pod {
                uid: UID_A.into(),
                namespace: "team-a".into(),
                name: "api-7d9f".into(),
                service_account: "api".into(),
                node: NODE.into(),
                labels: [("app".to_owned(), "api".to_owned())].into(),
                host_network: false,
                containers: Some(vec![CID_1.into()]),
            }
        );
        let b = PodDirectory::pod(&*pods, UID_B).expect("listed pod");
        assert_eq!(b.service_account, "default");
        assert!(b.host_network);
        assert_eq!(
            b.containers,
            Some(vec![CID_2.into()]),
            "init containers count"
        );
        // What the CA decides on: namespace, service account and node.
        assert_eq!(
            PodDirectory::pod(&*pods, UID_A).map(|p| (p.namespace, p.service_account, p.node)),
            Some(("team-a".into(), "api".into(), NODE.into()))
        );
        assert_eq!(pods.host(), None);

        // The watch that follows the list starts at the list's resourceVersion.
        let watch = server.next_watch().await;
        assert_eq!(watch.resource_version(), Some("10"));
        assert_eq!(param(&watch.query, "watch"), Some("true"));
        server.assert_only_this_node_requested();
    }

    /// The CA's directory: every pod of the cluster, each with the node the API server
    /// placed it on (none yet for an unscheduled pod), from requests without a selector.
    #[tokio::test]
    async fn the_cluster_watch_holds_every_node_s_pods() {
        let mut server = FakeApiServer::start_cluster().await;
        let mut elsewhere = pod(UID_B, "db-0", "8", json!({}), &[]);
        elsewhere["spec"]["nodeName"] = json!("node-2");
        server.push_list(
            "10",
            vec![pod(UID_A, "api-7d9f", "9", json!({}), &[]), elsewhere],
        );
        let pods = KubePods::spawn_cluster(server.client(), &tokio::runtime::Handle::current());
        assert!(wait_ready(&pods).await);
        let node = |uid: &str| PodDirectory::pod(&*pods, uid).map(|p| p.node);
        assert_eq!(node(UID_A).as_deref(), Some(NODE));
        assert_eq!(node(UID_B).as_deref(), Some("node-2"));
        assert_eq!(pods.host(), None);

        const UID_C: &str = "33333333-4444-5555-6666-777777777777";
        let mut pending = pod(UID_C, "job-x", "11", json!({}), &[]);
        pending["spec"].as_object_mut().unwrap().remove("nodeName");
        let watch = server.next_watch().await;
        watch.send("ADDED", pending);
        eventually(&pods, UID_C, |p| p.is_some()).await;
        assert_eq!(node(UID_C).as_deref(), Some(""), "not scheduled: no node");
        let requests = server.requests();
        assert!(requests.len() >= 2, "{requests:?}");
        for r in &requests {
            assert!(r.starts_with("/api/v1/pods?"), "{r}");
            assert_eq!(param(r, "fieldSelector"), None, "{r}");
        }
    }

    #[tokio::test]
    async fn watch_adds_modifies_and_deletes() {
        let mut server = FakeApiServer::start().await;
        server.push_list("10", vec![]);
        let pods = KubePods::spawn(server.client(), NODE, &tokio::runtime::Handle::current());
        assert!(wait_ready(&pods).await);
        assert!(pods.is_empty());
        let watch = server.next_watch().await;

        watch.send(
            "ADDED",
            pod(UID_A, "api-7d9f", "11", json!({ "app": "api" }), &[]),
        );
        eventually(&pods, UID_A, |p| p.is_some()).await;
        let added = PodDirectory::pod(&*pods, UID_A).unwrap();
        assert_eq!(added.containers, None, "no container created yet");

        let modified = pod(
            UID_A,
            "api-7d9f",
            "12",
            json!({ "app": "api", "tier": "gold" }),
            &[&format!("containerd://{CID_1}"), "docker://"],
        );
        watch.send("MODIFIED", modified.clone());
        eventually(&pods, UID_A, |p| {
            p.is_some_and(|p| p.labels.get("tier").map(String::as_str) == Some("gold"))
        })
        .await;
        let updated = PodDirectory::pod(&*pods, UID_A).unwrap();
        assert_eq!(
            updated.containers,
            Some(vec![CID_1.into()]),
            "scheme stripped, empty id skipped"
        );

        watch.send(
            "BOOKMARK",
            json!({ "kind": "Pod", "apiVersion": "v1", "metadata": { "resourceVersion": "13" } }),
        );
        let mut deleted = modified;
        deleted["metadata"]["resourceVersion"] = json!("14");
        watch.send("DELETED", deleted);
        eventually(&pods, UID_A, |p| p.is_none()).await;
        assert_eq!(server.lists_requested(), 1, "no re-list along the way");
        server.assert_only_this_node_requested();
    }

    #[tokio::test]
    async fn a_closed_watch_resumes_from_the_last_resource_version() {
        let mut server = FakeApiServer::start().await;
        server.push_list("10", vec![pod(UID_A, "api-7d9f", "9", json!({}), &[])]);
        let pods = KubePods::spawn(server.client(), NODE, &tokio::runtime::Handle::current());
        assert!(wait_ready(&pods).await);

        let first = server.next_watch().await;
        assert_eq!(first.resource_version(), Some("10"));
        first.send("ADDED", pod(UID_B, "db-0", "17", json!({}), &[]));
        eventually(&pods, UID_B, |p| p.is_some()).await;
        // The server ends the watch (its timeoutSeconds, a load balancer, a restart).
        drop(first);

        let second = server.next_watch().await;
        assert_eq!(
            second.resource_version(),
            Some("17"),
            "re-watched from the last event seen: {}",
            second.query
        );
        assert_eq!(server.lists_requested(), 1, "resumed without a re-list");
        second.send("DELETED", pod(UID_A, "api-7d9f", "18", json!({}), &[]));
        eventually(&pods, UID_A, |p| p.is_none()).await;
        assert!(
            PodDirectory::pod(&*pods, UID_B).is_some(),
            "kept across the restart"
        );

        // A bookmark moves the resume point too, without any pod changing.
        second.send(
            "BOOKMARK",
            json!({ "kind": "Pod", "apiVersion": "v1", "metadata": { "resourceVersion": "25" } }),
        );
        // Give the watcher a moment to read it before the connection goes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(second);
        let third = server.next_watch().await;
        assert_eq!(third.resource_version(), Some("25"), "{}", third.query);
        server.assert_only_this_node_requested();
    }

    #[tokio::test]
    async fn gone_relists_and_replaces_the_map() {
        let mut server = FakeApiServer::start().await;
        server.push_list(
            "10",
            vec![
                pod(UID_A, "api-7d9f", "9", json!({}), &[]),
                pod(UID_B, "db-0", "9", json!({}), &[]),
            ],
        );
        let pods = KubePods::spawn(server.client(), NODE, &tokio::runtime::Handle::current());
        assert!(wait_ready(&pods).await);
        assert_eq!(pods.len(), 2);

        // The resume point is too old for the server: it says 410 Gone, and the watcher
        // must list again. UID_B was deleted meanwhile; the new list is the truth.
        server.push_list(
            "30",
            vec![pod(UID_A, "api-7d9f", "29", json!({ "v": "2" }), &[])],
        );
        let watch = server.next_watch().await;
        watch.send("ERROR", status(410, "Expired"));
        eventually(&pods, UID_B, |p| p.is_none()).await;
        let a = PodDirectory::pod(&*pods, UID_A).unwrap();
        assert_eq!(a.labels.get("v").map(String::as_str), Some("2"));
        let next = server.next_watch().await;
        assert_eq!(next.resource_version(), Some("30"));
        assert_eq!(server.lists_requested(), 2);
        server.assert_only_this_node_requested();
    }

    #[tokio::test]
    async fn a_failing_list_is_retried_and_not_ready_meanwhile() {
        let mut server = FakeApiServer::start().await;
        server.push_list_error(StatusCode::INTERNAL_SERVER_ERROR);
        server.push_list("10", vec![pod(UID_A, "api-7d9f", "9", json!({}), &[])]);
        let pods = KubePods::spawn(server.client(), NODE, &tokio::runtime::Handle::current());
        let probe = Arc::clone(&pods);
        let early =
            tokio::task::spawn_blocking(move || probe.wait_ready(Duration::from_millis(200)))
                .await
                .unwrap();
        assert!(!early, "not ready before a list succeeded");
        assert!(wait_ready(&pods).await, "ready after the retry");
        assert!(PodDirectory::pod(&*pods, UID_A).is_some());
        assert_eq!(server.lists_requested(), 2);
        let _watch = server.next_watch().await;
        server.assert_only_this_node_requested();
    }

    #[tokio::test]
    async fn host_identity_only_when_configured() {
        let server = FakeApiServer::start().await;
        let host = HostIdentity {
            namespace: "host".into(),
            service_account: "node-tools".into(),
        };
        let pods = KubePods::spawn_with_host(
            server.client(),
            NODE,
            Some(host),
            &tokio::runtime::Handle::current(),
        );
        assert_eq!(
            pods.host(),
            Some(&HostIdentity {
                namespace: "host".into(),
                service_account: "node-tools".into(),
            })
        );
        // Shared handles plug into the resolver and the CA as they are.
        let directory: Box<dyn PodDirectory> = Box::new(Arc::clone(&pods));
        assert!(directory.host().is_some());
        let source: Box<dyn PodDirectory> = Box::new(pods);
        assert!(source.pod(UID_A).is_none());
    }

    #[test]
    fn container_ids_lose_their_scheme() {
        let status = |id: Option<&str>| ContainerStatus {
            container_id: id.map(str::to_owned),
            ..ContainerStatus::default()
        };
        assert_eq!(
            container_id(&status(Some(&format!("containerd://{CID_1}")))).as_deref(),
            Some(CID_1)
        );
        assert_eq!(
            container_id(&status(Some(&format!("cri-o://{CID_1}")))).as_deref(),
            Some(CID_1)
        );
        assert_eq!(
            container_id(&status(Some(&format!("docker://{CID_1}")))).as_deref(),
            Some(CID_1)
        );
        assert_eq!(container_id(&status(Some(CID_1))).as_deref(), Some(CID_1));
        assert_eq!(container_id(&status(Some("containerd://"))), None);
        assert_eq!(container_id(&status(None)), None);
    }

    #[test]
    fn a_pod_without_uid_or_namespace_is_ignored() {
        let mut p: KubePod = serde_json::from_value(pod(UID_A, "x", "1", json!({}), &[])).unwrap();
        assert!(pod_info(&p).is_some());
        p.metadata.namespace = None;
        assert!(pod_info(&p).is_none());
        p.metadata.namespace = Some("team-a".into());
        p.metadata.uid = None;
        assert!(pod_info(&p).is_none());
    }
}
