//! `gateway ca serve --kubernetes-pods` through the real binary, against a local API server
//! that speaks the Kubernetes list/watch wire format (JSON `PodList`, a chunked watch of
//! `{"type", "object"}` lines), reached through a kubeconfig as in a cluster: the CA is not
//! ready until its first pod list is in; a node gets workload certificates only for pods
//! the API server places on it: a pod scheduled later is served, a pod deleted or moved to
//! another node is refused from then on.

mod common;

use std::convert::Infallible;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{gateway_bin, run_gateway, start_printing_addresses};
use gateway::ca::client::CaClient;
use gateway::pki::{self, CertificateAuthority, LeafSpec};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const ON_NODE_1: &str = "0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
const ON_NODE_2: &str = "11111111-2222-3333-4444-555555555555";

fn pod(uid: &str, name: &str, node: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team-a", "uid": uid, "resourceVersion": rv},
        "spec": {"nodeName": node, "serviceAccountName": "api", "containers": [{"name": "c", "image": "app:1"}]},
        "status": {"phase": "Running"},
    })
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the API server holds: whether lists succeed yet, the pods, and the open watches.
#[derive(Default)]
struct Api {
    listing: bool,
    pods: Vec<Value>,
    watches: Vec<mpsc::UnboundedSender<Bytes>>,
    requests: Vec<String>,
}

/// Serves `GET /api/v1/pods` (list, then `watch=true`); a list fails with a 500 Status
/// until `listing` is set.
async fn api_server(api: Arc<Mutex<Api>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let api = api.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let api = api.clone();
                    async move { Ok::<_, Infallible>(answer(&api, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

fn answer<B>(api: &Mutex<Api>, req: &hyper::Request<B>) -> hyper::Response<Body> {
    let pq = req.uri().path_and_query().unwrap().as_str().to_owned();
    let mut api = api.lock().unwrap();
    api.requests.push(pq.clone());
    let json = |code: u16, v: Value| {
        hyper::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
            .unwrap()
    };
    if req.uri().path() != "/api/v1/pods" {
        return json(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
        );
    }
    if pq.contains("watch=true") {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        api.watches.push(tx);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let line = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(line)), rx))
        });
        return hyper::Response::builder()
            .header("content-type", "application/json")
            .body(StreamBody::new(frames).boxed_unsync())
            .unwrap();
    }
    if !api.listing {
        return json(
            500,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "message": "etcd is starting", "code": 500}),
        );
    }
    json(
        200,
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": api.pods}),
    )
}

impl Api {
    /// Sends a watch event to every open watch.
    fn event(&mut self, kind: &str, object: Value) {
        let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": object})));
        self.watches.retain(|w| w.send(line.clone()).is_ok());
    }
}

fn readyz(admin: std::net::SocketAddr) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    (code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_for_pods_the_api_server_places_on_the_asking_node() {
    let dir = std::env::temp_dir().join(format!("dbgw-ca-kube-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    run_gateway(&["ca", "init", "--dir", &p("ca"), "--trust-domain", "td"]);
    run_gateway(&[
        "ca",
        "issue-server",
        "--dir",
        &p("ca"),
        "--dns",
        "gateway-ca",
        "--out",
        &p("server"),
    ]);
    let api = Arc::new(Mutex::new(Api {
        pods: vec![
            pod(ON_NODE_1, "api-0", "node-1", "8"),
            pod(ON_NODE_2, "api-1", "node-2", "9"),
        ],
        ..Api::default()
    }));
    let addr = api_server(api.clone()).await;
    std::fs::write(
        p("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://{addr}'}}}}]\nusers: [{{name: u, user: {{token: ca-token}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();

    let mut serve = Command::new(gateway_bin());
    serve
        .args([
            "ca",
            "serve",
            "--dir",
            &p("ca"),
            "--tls-cert",
            &p("server.crt"),
            "--tls-key",
            &p("server.key"),
            "--kubernetes-pods",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", p("kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST");
    let (_ca, printed) = start_printing_addresses(serve);
    let (admin, listen) = (printed["ADMIN"], printed["LISTENING"]);

    // The API server fails its lists: the CA is up but not ready, and says why.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, body) = readyz(admin);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("pod list from the Kubernetes API"), "{body}");
    api.lock().unwrap().listing = true;
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz(admin).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready: {:?}",
            readyz(admin)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // node-1's certificate, made by the CA's key (as a join would).
    let ca = CertificateAuthority::load(
        &dir.join("ca").join(pki::WORKLOAD_CA_CERT),
        &dir.join("ca").join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap();
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let (cert, key) = ca
        .issue(&LeafSpec::node("td", "node-1"), Duration::from_secs(600))
        .unwrap();
    let node1 = CaClient {
        addr: listen.to_string(),
        server_name: ServerName::try_from("gateway-ca").unwrap(),
        tls: Arc::new(
            gateway::tunnel::client_config(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                &roots,
            )
            .unwrap(),
        ),
    };
    let issued = node1.workload_certificate(Some(ON_NODE_1)).await.unwrap();
    assert_eq!(issued.spiffe_id.to_string(), "spiffe://td/ns/team-a/sa/api");
    let e = match node1.workload_certificate(Some(ON_NODE_2)).await {
        Ok(_) => panic!("issued for a pod on another node"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        e,
        format!("CA refused: pod {ON_NODE_2} runs on node node-2, not on node-1")
    );

    // A pod scheduled later, through the watch; then the first pod is deleted.
    const LATER: &str = "33333333-4444-5555-6666-777777777777";
    let later = pod(LATER, "api-2", "node-1", "11");
    api.lock().unwrap().event("ADDED", later);
    let mut deleted = pod(ON_NODE_1, "api-0", "node-1", "12");
    deleted["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
    api.lock().unwrap().event("DELETED", deleted);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gone = node1.workload_certificate(Some(ON_NODE_1)).await;
        let added = node1.workload_certificate(Some(LATER)).await;
        if let (true, Err(e)) = (added.is_ok(), &gone) {
            assert_eq!(
                e.to_string(),
                format!("CA refused: pod {ON_NODE_1} is not known to the CA")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watch's events never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The later pod moves to node-2 (a MODIFIED event with another spec.nodeName): node-1
    // may no longer get its certificate.
    let moved = pod(LATER, "api-2", "node-2", "13");
    api.lock().unwrap().event("MODIFIED", moved);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match node1.workload_certificate(Some(LATER)).await {
            Err(e) => {
                assert_eq!(
                    e.to_string(),
                    format!("CA refused: pod {LATER} runs on node node-2, not on node-1")
                );
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "the move never applied");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Every request was the cluster-wide pod list or watch, as the CA's RBAC allows.
    for r in &api.lock().unwrap().requests {
        assert!(r.starts_with("/api/v1/pods?"), "{r}");
        assert!(!r.contains("fieldSelector"), "{r}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
