//! Joins over the real wire: the CA's join listener (HTTPS) on loopback, the node's
//! [`client::JoinClient`], and the workload endpoint that takes the joined certificate.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::client::{JoinClient, JoinClientError, NodeIdentity, Prover, Schedule};
use super::*;
use crate::pki::{CertificateAuthority, LeafSpec};

mod aws_join;
mod kube_join;

pub const TD: &str = "td";
const HOUR: Duration = Duration::from_secs(3600);

/// A CA directory of its own, removed on drop.
pub struct Dir(pub std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("dbgw-join-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    pki::init_ca(&d, TD).unwrap();
    Dir(d)
}

pub fn load_ca(d: &Dir) -> CertificateAuthority {
    CertificateAuthority::load(
        &d.0.join(pki::WORKLOAD_CA_CERT),
        &d.0.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap()
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A running join listener and what a node needs to reach it.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub roots: Vec<CertificateDer<'static>>,
    pub server: tokio::task::JoinHandle<()>,
    pub joins: Arc<Joins>,
}

/// Joins with `ttl` node certificates, the given methods, served on loopback.
pub async fn start(
    d: &Dir,
    ttl: Duration,
    tokens: Option<token::TokenStore>,
    kubernetes: Option<kubernetes::KubeVerifier>,
    aws: Option<aws_iam::AwsVerifier>,
) -> Running {
    let ca = load_ca(d);
    let roots = pem_certs(ca.cert_pem());
    let (server_pem, server_key) = ca
        .issue(&LeafSpec::server(vec!["gateway-ca".into()], vec![]), HOUR)
        .unwrap();
    let tls = crate::ca::reload::join_server_config(
        pem_certs(&server_pem),
        PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap(),
        &roots,
    )
    .unwrap();
    let joins = Arc::new(Joins {
        ca: Arc::new(arc_swap::ArcSwap::from_pointee(ca)),
        trust_domain: TD.into(),
        ttl,
        tokens,
        kubernetes,
        aws,
        challenges: Challenges::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(
        joins.clone(),
        listener,
        Arc::new(arc_swap::ArcSwap::from_pointee(tls)),
    ));
    Running {
        addr,
        roots,
        server,
        joins,
    }
}

pub fn client(r: &Running, node: &str, prover: Prover) -> JoinClient {
    let identity = Arc::new(NodeIdentity::default());
    JoinClient {
        addr: r.addr.to_string(),
        server_name: ServerName::try_from("gateway-ca").unwrap(),
        tls: Arc::new(
            client::client_config(
                Arc::new(crate::tunnel::ReloadableRoots::new(&r.roots).unwrap()),
                identity.clone(),
            )
            .unwrap(),
        ),
        identity,
        node_name: node.into(),
        prover,
        timeout: Duration::from_secs(10),
        schedule: Schedule::default(),
    }
}

/// The node name the CA put into a joined certificate.
pub fn node_of(j: &client::Joined) -> String {
    pki::node_name_of(&j.key.cert[0], TD).unwrap()
}

pub fn refusal(e: JoinClientError) -> String {
    match e {
        JoinClientError::Refused(m) => m,
        other => panic!("expected a refusal, got {other}"),
    }
}

fn token_file(d: &Dir, name: &str, token: &str) -> std::path::PathBuf {
    let p = d.0.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p
}

#[tokio::test]
async fn a_token_join_gets_a_node_certificate_the_workload_endpoint_accepts() {
    let d = dir("token");
    let tokens = d.0.join("tokens");
    let r = start(
        &d,
        HOUR,
        Some(token::TokenStore::new(tokens.clone())),
        None,
        None,
    )
    .await;

    let once = token::create(&tokens, "node-1", HOUR, true).unwrap();
    let node1 = client(&r, "node-1", Prover::Token(token_file(&d, "once", &once)));
    let joined = node1.join().await.unwrap();
    assert_eq!(node_of(&joined), "node-1");
    let life = joined.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        life <= HOUR && life > HOUR - Duration::from_secs(60),
        "{life:?}"
    );

    // The one-time token is used up: another process (no node certificate) is refused...
    let thief = client(&r, "node-1", Prover::Token(token_file(&d, "stolen", &once)));
    let e = refusal(thief.join().await.unwrap_err());
    assert_eq!(e, "token join refused: one-time join token already used");
    // ...while the node that used it renews with its certificate, and gets a new one.
    let renewed = node1.join().await.unwrap();
    assert_ne!(renewed.key.cert[0], joined.key.cert[0]);

    // Time-limited tokens: only for their node, only until they expire, never unknown ones.
    let t = token::create(&tokens, "node-2", HOUR, false).unwrap();
    let other = client(&r, "node-3", Prover::Token(token_file(&d, "t", &t)));
    assert_eq!(
        refusal(other.join().await.unwrap_err()),
        "token join refused: join token is for node \"node-2\", not \"node-3\""
    );
    let expired = token::create(&tokens, "node-2", Duration::ZERO, false).unwrap();
    let late = client(&r, "node-2", Prover::Token(token_file(&d, "e", &expired)));
    assert!(
        refusal(late.join().await.unwrap_err())
            .starts_with("token join refused: join token expired")
    );
    let unknown = client(
        &r,
        "node-2",
        Prover::Token(token_file(&d, "u", "dbgw-join-0000")),
    );
    assert_eq!(
        refusal(unknown.join().await.unwrap_err()),
        "token join refused: unknown join token (never created, or revoked)"
    );
    // A method the CA was not started with.
    let k = client(
        &r,
        "node-2",
        Prover::Kubernetes(token_file(&d, "k", "x.y.z")),
    );
    assert_eq!(
        refusal(k.join().await.unwrap_err()),
        "join method kubernetes is not enabled on this CA"
    );

    // The joined certificate is a node identity the workload endpoint serves.
    let ca = load_ca(&d);
    let svc = Arc::new(crate::ca::service::CaService {
        ca: Arc::new(arc_swap::ArcSwap::from_pointee(ca)),
        trust_domain: TD.into(),
        ttl: HOUR,
        pods: Box::new(OnePod),
        server_names: Default::default(),
        limits: crate::ca::rate_limit::NodeLimits::new(100.0, 100),
    });
    let (server_pem, server_key) = svc
        .ca
        .load()
        .issue(&LeafSpec::server(vec!["gateway-ca".into()], vec![]), HOUR)
        .unwrap();
    let tls = crate::tunnel::server_config(
        pem_certs(&server_pem),
        PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap(),
        &r.roots,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(crate::ca::service::serve(
        svc,
        listener,
        Arc::new(arc_swap::ArcSwap::from_pointee(tls)),
    ));
    let workload = crate::ca::client::CaClient {
        addr: addr.to_string(),
        server_name: ServerName::try_from("gateway-ca").unwrap(),
        tls: node1.tls.clone(),
    };
    let issued = workload.workload_certificate(Some("uid-1")).await.unwrap();
    assert_eq!(issued.spiffe_id.to_string(), "spiffe://td/ns/team-a/sa/api");
    // Without a node certificate, nothing.
    let bare = crate::ca::client::CaClient {
        addr: addr.to_string(),
        server_name: ServerName::try_from("gateway-ca").unwrap(),
        tls: thief.tls.clone(),
    };
    assert!(bare.workload_certificate(Some("uid-1")).await.is_err());
}

struct OnePod;

impl crate::pod::PodDirectory for OnePod {
    fn pod(&self, uid: &str) -> Option<crate::pod::Pod> {
        (uid == "uid-1").then(|| crate::pod::Pod {
            uid: uid.into(),
            namespace: "team-a".into(),
            service_account: "api".into(),
            name: "api-0".into(),
            node: "node-1".into(),
            labels: Default::default(),
            host_network: false,
            containers: None,
        })
    }
    fn host(&self) -> Option<&crate::pod::HostIdentity> {
        None
    }
}

#[tokio::test]
async fn node_certificates_renew_at_half_life_and_readiness_degrades_when_the_ca_is_gone() {
    let d = dir("renew");
    let tokens = d.0.join("tokens");
    let ttl = Duration::from_secs(4);
    let r = start(
        &d,
        ttl,
        Some(token::TokenStore::new(tokens.clone())),
        None,
        None,
    )
    .await;
    let t = token::create(&tokens, "node-1", HOUR, false).unwrap();
    let mut c = client(&r, "node-1", Prover::Token(token_file(&d, "t", &t)));
    c.schedule = Schedule {
        first_retry: Duration::from_millis(200),
        max_retry: Duration::from_millis(400),
        leeway: Duration::ZERO,
        degraded_after: 0.75,
    };
    let c = Arc::new(c);
    let first = c.join().await.unwrap();
    let first_cert = first.key.cert[0].clone();
    let readiness = crate::admin::Readiness::default();
    let renewing = tokio::spawn({
        let c = c.clone();
        let readiness = readiness.clone();
        async move { c.keep_renewed(first, readiness).await }
    });
    // Three renewals, each a new certificate, each before the last one ended.
    let mut seen = vec![first_cert];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while seen.len() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = SystemTime::now();
        let cur = c
            .identity
            .current(now)
            .expect("never without a valid certificate");
        if *seen.last().unwrap() != cur.cert[0] {
            seen.push(cur.cert[0].clone());
        }
        assert!(readiness.pending().is_empty(), "{:?}", readiness.pending());
    }
    assert_eq!(
        seen.len(),
        4,
        "three renewals within 12 s of 4 s certificates"
    );

    // The CA goes away: the cached certificate keeps serving, readiness degrades before it
    // ends, and after its end the node offers none.
    r.server.abort();
    let _ = r.server.await;
    let held = c.identity.current(SystemTime::now()).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&held.cert[0]).unwrap();
    let not_after =
        SystemTime::UNIX_EPOCH + Duration::from_secs(x509.validity().not_after.timestamp() as u64);
    let degraded_at = loop {
        if !readiness.pending().is_empty() {
            break SystemTime::now();
        }
        assert!(SystemTime::now() < not_after, "not degraded before expiry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(degraded_at < not_after);
    assert!(
        readiness.pending()[0].starts_with("degraded: node certificate not renewed"),
        "{:?}",
        readiness.pending()
    );
    assert!(c.identity.current(degraded_at).is_some());
    tokio::time::sleep(
        not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    assert!(c.identity.current(SystemTime::now()).is_none());
    renewing.abort();
}

#[test]
fn globs_match_whole_strings() {
    assert!(glob_match("db-gateway/*", "db-gateway/node-agent"));
    assert!(glob_match("*/node-agent", "kube-system/node-agent"));
    assert!(!glob_match(
        "db-gateway/node-agent",
        "db-gateway/node-agent2"
    ));
    assert!(glob_match(
        "arn:aws:sts::123456789012:assumed-role/eks-node-*/*",
        "arn:aws:sts::123456789012:assumed-role/eks-node-a/i-0abc"
    ));
    assert!(!glob_match(
        "arn:aws:sts::123456789012:assumed-role/eks-node-*/*",
        "arn:aws:sts::999999999999:assumed-role/eks-node-a/i-0abc"
    ));
    assert!(glob_match("a?c", "abc") && !glob_match("a?c", "ac"));
    assert!(valid_node_name("ip-10-0-1-2.eu-west-1.compute.internal"));
    assert!(!valid_node_name("Node/../x") && !valid_node_name("") && !valid_node_name("-a"));
}

/// One request as a local stand-in server sees it.
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub type Route = Arc<dyn Fn(&Seen) -> (u16, String) + Send + Sync>;

/// A local HTTP server answering every request with `route`; returns its base URL.
pub async fn http_server(route: Route) -> String {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let route = route.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let route = route.clone();
                    async move {
                        let method = req.method().to_string();
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default();
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                            .collect();
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        let (status, text) = route(&Seen {
                            method,
                            path,
                            headers,
                            body,
                        });
                        let mut resp = Response::new(Full::new(Bytes::from(text)));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// Base64url without padding (JWT and JWK encoding).
pub fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}
