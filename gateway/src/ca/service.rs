//! The CA's decision and its HTTP face: whether the asking node may have a certificate for
//! the pod it names ([`CaService::issue`]), and the mutual-TLS HTTP/1.1 server around it
//! ([`serve`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::net::TcpListener;

use super::rate_limit::NodeLimits;
use super::server_names::ServerNames;
use super::wire::{
    CertificateRequest, CertificateResponse, ErrorBody, SERVER_CERTIFICATES_PATH,
    ServerCertificateRequest, WORKLOAD_CERTIFICATES_PATH,
};
use crate::pki::{self, LeafSpec, SpiffeId};
use crate::pod::PodDirectory;
use crate::telemetry::ca::{CERTIFICATES_ISSUED, REFUSALS, SERVER_CERTIFICATES_ISSUED};

/// A CSR is well under 1 KiB; anything bigger is not one.
const MAX_REQUEST_BODY: usize = 16 * 1024;
/// A node that does not finish its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of descriptors, say) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// The CA service: its key, its trust domain, how long certificates live, and the pod
/// directory that says which node each pod runs on.
pub struct CaService {
    /// The signing root; a rotation's `activate` swaps it while requests go on.
    pub ca: super::reload::Signing,
    pub trust_domain: String,
    pub ttl: Duration,
    pub pods: Box<dyn PodDirectory>,
    /// What server certificates for nodes may name (deny by default).
    pub server_names: ServerNames,
    /// Requests per node (both kinds of certificate).
    pub limits: NodeLimits,
}

/// Why the CA refuses a request; the message goes back to the node and into the CA log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("client certificate is not a node identity: {0}")]
    NotANode(String),
    #[error("pod {0} is not known to the CA")]
    UnknownPod(String),
    #[error("no host identity is configured for processes outside pods")]
    NoHostIdentity,
    #[error("pod {pod} runs on node {actual}, not on {asking}")]
    WrongNode {
        pod: String,
        actual: String,
        asking: String,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0} is not in the CA's --server-names")]
    NameNotAllowed(String),
    #[error("node {node} asks too often; retry in {}", humantime::format_duration(*retry_after))]
    RateLimited { node: String, retry_after: Duration },
}

impl CaService {
    /// The asking node's name, from a certificate that is valid now.
    fn node_of(
        &self,
        node_cert: Option<&rustls_pki_types::CertificateDer<'_>>,
    ) -> Result<String, Refusal> {
        let node_cert = node_cert.ok_or_else(|| Refusal::NotANode("no certificate".into()))?;
        // Per request, not only per handshake: a resumed TLS session or a kept-alive
        // connection must not serve a node certificate past its `notAfter`.
        pki::check_validity(node_cert, std::time::SystemTime::now())
            .map_err(|e| Refusal::NotANode(e.to_string()))?;
        pki::node_name_of(node_cert, &self.trust_domain)
            .map_err(|e| Refusal::NotANode(e.to_string()))
    }

    /// Signs a server certificate for a node's client TLS: every name must be on the
    /// `--server-names` list, and only the CSR's public key is taken.
    pub fn issue_server(
        &self,
        node_cert: Option<&rustls_pki_types::CertificateDer<'_>>,
        req: &ServerCertificateRequest,
    ) -> Result<CertificateResponse, Refusal> {
        let node = self.limited_node(node_cert)?;
        if req.dns_names.is_empty() && req.ips.is_empty() {
            return Err(Refusal::BadRequest("no name asked for".into()));
        }
        if let Some(ip) = req.ips.iter().find(|ip| !self.server_names.allows_ip(**ip)) {
            return Err(Refusal::NameNotAllowed(ip.to_string()));
        }
        if let Some(n) = req
            .dns_names
            .iter()
            .find(|n| !self.server_names.allows_name(n))
        {
            return Err(Refusal::NameNotAllowed(format!("{n:?}")));
        }
        let certificate = self
            .ca
            .load()
            .issue_for_csr(
                &LeafSpec::server(req.dns_names.clone(), req.ips.clone()),
                &req.csr,
                self.ttl,
            )
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        metrics::counter!(SERVER_CERTIFICATES_ISSUED).increment(1);
        tracing::info!(%node, names = ?req.dns_names, ips = ?req.ips, "server certificate issued");
        Ok(CertificateResponse {
            certificate,
            spiffe_id: String::new(),
        })
    }

    /// The asking node, if it may ask now ([`NodeLimits`]).
    fn limited_node(
        &self,
        node_cert: Option<&rustls_pki_types::CertificateDer<'_>>,
    ) -> Result<String, Refusal> {
        let node = self.node_of(node_cert)?;
        self.limits
            .take(&node)
            .map_err(|retry_after| Refusal::RateLimited {
                node: node.clone(),
                retry_after: Duration::from_millis(retry_after.as_millis().max(1) as u64),
            })?;
        Ok(node)
    }

    /// Decides and signs one request from the node `node_cert` identifies.
    pub fn issue(
        &self,
        node_cert: Option<&rustls_pki_types::CertificateDer<'_>>,
        req: &CertificateRequest,
    ) -> Result<CertificateResponse, Refusal> {
        let node = self.limited_node(node_cert)?;
        let id = match &req.pod_uid {
            None => {
                let host = self.pods.host().ok_or(Refusal::NoHostIdentity)?;
                SpiffeId::new(&self.trust_domain, &host.namespace, &host.service_account)
            }
            Some(uid) => {
                let pod = self
                    .pods
                    .pod(uid)
                    .ok_or_else(|| Refusal::UnknownPod(uid.clone()))?;
                if pod.node != node {
                    return Err(Refusal::WrongNode {
                        pod: uid.clone(),
                        actual: pod.node,
                        asking: node,
                    });
                }
                SpiffeId::new(&self.trust_domain, &pod.namespace, &pod.service_account)
            }
        };
        let certificate = self
            .ca
            .load()
            .issue_for_csr(
                &LeafSpec::workload(&id).on_node(&self.trust_domain, &node),
                &req.csr,
                self.ttl,
            )
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        metrics::counter!(CERTIFICATES_ISSUED).increment(1);
        Ok(CertificateResponse {
            certificate,
            spiffe_id: id.to_string(),
        })
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(
    svc: Arc<CaService>,
    node_cert: Option<rustls_pki_types::CertificateDer<'static>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let server = req.uri().path() == SERVER_CERTIFICATES_PATH;
    if req.method() != Method::POST || !(server || req.uri().path() == WORKLOAD_CERTIFICATES_PATH) {
        return json(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: format!(
                    "only POST {WORKLOAD_CERTIFICATES_PATH} or {SERVER_CERTIFICATES_PATH}"
                ),
            },
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return json(
                StatusCode::BAD_REQUEST,
                &ErrorBody {
                    error: format!("request body: {e}"),
                },
            );
        }
    };
    let result = if server {
        serde_json::from_slice::<ServerCertificateRequest>(&body)
            .map_err(|e| Refusal::BadRequest(e.to_string()))
            .and_then(|r| svc.issue_server(node_cert.as_ref(), &r))
    } else {
        serde_json::from_slice::<CertificateRequest>(&body)
            .map_err(|e| Refusal::BadRequest(e.to_string()))
            .and_then(|r| svc.issue(node_cert.as_ref(), &r))
    };
    match result {
        Ok(resp) => json(StatusCode::OK, &resp),
        Err(refusal) => {
            tracing::warn!(%refusal, server, "certificate refused");
            metrics::counter!(REFUSALS).increment(1);
            let status = match refusal {
                Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
                Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::FORBIDDEN,
            };
            let mut resp = json(
                status,
                &ErrorBody {
                    error: refusal.to_string(),
                },
            );
            if let Refusal::RateLimited { retry_after, .. } = refusal {
                resp.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from(retry_after.as_secs_f64().ceil() as u64),
                );
            }
            resp
        }
    }
}

/// Serves until the listener fails; every connection must present a client certificate
/// from the workload CA (checked by rustls), and its node name is read per request.
pub async fn serve(svc: Arc<CaService>, listener: TcpListener, tls: super::reload::Tls) {
    serve_https("ca", listener, tls, move |node_cert, req| {
        handle(svc.clone(), node_cert, req)
    })
    .await
}

/// The accept loop of the CA's HTTPS listeners (certificates here, joins in `join`): a TLS
/// handshake bounded by [`HANDSHAKE_TIMEOUT`], then HTTP/1.1 on the connection, each request
/// answered by `handle` with the client certificate rustls verified (if the listener asks
/// for one). `what` names the listener in the log.
pub(super) async fn serve_https<H, Fut>(
    what: &'static str,
    listener: TcpListener,
    tls: super::reload::Tls,
    handle: H,
) where
    H: Fn(Option<CertificateDer<'static>>, Request<Incoming>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        // The settings of now: a reload (new bundle, new server certificate) applies from
        // the next connection.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let handle = handle.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, %e, "{what}: tls handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let peer_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let service = hyper::service::service_fn(move |req| {
                let answer = handle(peer_cert.clone(), req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::inventory::Inventory;
    use crate::pod::{HostIdentity, Pod};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use std::collections::HashMap;

    struct Pods(HashMap<String, Pod>);

    impl PodDirectory for Pods {
        fn pod(&self, uid: &str) -> Option<Pod> {
            self.0.get(uid).cloned()
        }
        fn host(&self) -> Option<&HostIdentity> {
            None
        }
    }

    fn service(dir: &std::path::Path) -> CaService {
        let pods = Pods(HashMap::from([(
            "uid-1".to_owned(),
            Pod {
                uid: "uid-1".into(),
                namespace: "team-a".into(),
                service_account: "api".into(),
                node: "node-1".into(),
                name: "api-0".into(),
                labels: Default::default(),
                host_network: false,
                containers: None,
            },
        )]));
        service_over(dir, Box::new(pods))
    }

    fn service_over(dir: &std::path::Path, pods: Box<dyn PodDirectory>) -> CaService {
        pki::init_ca(dir, "td").unwrap();
        let ca = crate::pki::CertificateAuthority::load(
            &dir.join(pki::WORKLOAD_CA_CERT),
            &dir.join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        CaService {
            ca: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(ca)),
            trust_domain: "td".into(),
            ttl: Duration::from_secs(3600),
            pods,
            server_names: ServerNames::parse("10.0.0.0/8,db.example.com").unwrap(),
            limits: NodeLimits::new(1000.0, 1000),
        }
    }

    fn node_cert(svc: &CaService, leaf: &LeafSpec) -> CertificateDer<'static> {
        let (pem, _) = svc.ca.load().issue(leaf, Duration::from_secs(60)).unwrap();
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // A greedy CSR asking for a SAN of its own: the CA must ignore it.
        let params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    /// A node past its burst is refused with 429's reason and when to retry; another node
    /// is not held up by it.
    #[test]
    fn a_node_asking_too_often_is_limited_alone() {
        let dir = std::env::temp_dir().join(format!("dbgw-ca-limit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut svc = service(&dir);
        svc.limits = NodeLimits::new(0.5, 2);
        let node1 = node_cert(&svc, &LeafSpec::node("td", "node-1"));
        let node2 = node_cert(&svc, &LeafSpec::node("td", "node-2"));
        let req = CertificateRequest {
            pod_uid: Some("uid-1".into()),
            csr: csr(),
        };
        svc.issue(Some(&node1), &req).unwrap();
        svc.issue(Some(&node1), &req).unwrap();
        let e = svc.issue(Some(&node1), &req).unwrap_err();
        assert!(
            matches!(&e, Refusal::RateLimited { node, retry_after } if node == "node-1" && *retry_after <= Duration::from_secs(2)),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("node node-1 asks too often; retry in "),
            "{e}"
        );
        // node-2's pod is on node-1: refused for that, not for node-1's rate.
        assert!(matches!(
            svc.issue(Some(&node2), &req).unwrap_err(),
            Refusal::WrongNode { .. }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn issues_only_for_pods_on_the_asking_node() {
        let dir = std::env::temp_dir().join(format!("dbgw-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let svc = service(&dir);
        let node1 = node_cert(&svc, &LeafSpec::node("td", "node-1"));
        let node2 = node_cert(&svc, &LeafSpec::node("td", "node-2"));
        let req = CertificateRequest {
            pod_uid: Some("uid-1".into()),
            csr: csr(),
        };
        let ok = svc.issue(Some(&node1), &req).unwrap();
        assert_eq!(ok.spiffe_id, "spiffe://td/ns/team-a/sa/api");
        let cert = CertificateDer::from_pem_slice(ok.certificate.as_bytes()).unwrap();
        assert_eq!(pki::spiffe_id_of(&cert).unwrap().to_string(), ok.spiffe_id);
        let (_, x509) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let sans = format!(
            "{:?}",
            x509.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            !sans.contains("evil.example"),
            "CSR names leaked into the certificate: {sans}"
        );

        assert_eq!(
            svc.issue(Some(&node2), &req).unwrap_err(),
            Refusal::WrongNode {
                pod: "uid-1".into(),
                actual: "node-1".into(),
                asking: "node-2".into()
            }
        );
        let unknown = CertificateRequest {
            pod_uid: Some("uid-9".into()),
            csr: csr(),
        };
        assert_eq!(
            svc.issue(Some(&node1), &unknown).unwrap_err(),
            Refusal::UnknownPod("uid-9".into())
        );
        // A workload certificate is not a node identity.
        let workload = node_cert(
            &svc,
            &LeafSpec::workload(&SpiffeId::new("td", "team-a", "api")),
        );
        assert!(matches!(
            svc.issue(Some(&workload), &req),
            Err(Refusal::NotANode(_))
        ));
        assert!(matches!(svc.issue(None, &req), Err(Refusal::NotANode(_))));
        let host = CertificateRequest {
            pod_uid: None,
            csr: csr(),
        };
        assert_eq!(
            svc.issue(Some(&node1), &host).unwrap_err(),
            Refusal::NoHostIdentity
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 20: server certificates only for names the CA's list allows, only to nodes,
    /// with the names the CA checked (not the CSR's) and server usage.
    #[test]
    fn issue_20_server_certificates_only_for_listed_names() {
        let dir = std::env::temp_dir().join(format!("dbgw-ca-server-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let svc = service(&dir);
        let node1 = node_cert(&svc, &LeafSpec::node("td", "node-1"));
        let req = |dns: &[&str], ips: &[&str]| ServerCertificateRequest {
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            csr: csr(),
        };
        let ok = svc
            .issue_server(Some(&node1), &req(&["db.example.com"], &["10.0.3.7"]))
            .unwrap();
        let cert = CertificateDer::from_pem_slice(ok.certificate.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let sans = format!(
            "{:?}",
            x509.subject_alternative_name().unwrap().unwrap().value
        );
        assert!(
            sans.contains("db.example.com") && !sans.contains("evil.example"),
            "{sans}"
        );
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert_eq!(
            svc.issue_server(Some(&node1), &req(&["other.example.com"], &["10.0.3.7"]))
                .unwrap_err(),
            Refusal::NameNotAllowed("\"other.example.com\"".into())
        );
        assert_eq!(
            svc.issue_server(Some(&node1), &req(&[], &["192.0.2.1"]))
                .unwrap_err(),
            Refusal::NameNotAllowed("192.0.2.1".into())
        );
        assert!(matches!(
            svc.issue_server(Some(&node1), &req(&[], &[])),
            Err(Refusal::BadRequest(_))
        ));
        let workload = node_cert(
            &svc,
            &LeafSpec::workload(&SpiffeId::new("td", "team-a", "api")),
        );
        assert!(matches!(
            svc.issue_server(Some(&workload), &req(&[], &["10.0.3.7"])),
            Err(Refusal::NotANode(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hardening_02_an_expired_node_certificate_gets_nothing() {
        let dir = std::env::temp_dir().join(format!("dbgw-ca-expired-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let svc = service(&dir);
        let now = std::time::SystemTime::now();
        let (pem, _) = svc
            .ca
            .load()
            .issue_between(
                &LeafSpec::node("td", "node-1"),
                now - Duration::from_secs(60),
                now - Duration::from_secs(1),
            )
            .unwrap();
        let expired = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let req = CertificateRequest {
            pod_uid: Some("uid-1".into()),
            csr: csr(),
        };
        let refused = svc.issue(Some(&expired), &req).unwrap_err();
        assert!(
            matches!(&refused, Refusal::NotANode(m) if m.contains("expired")),
            "{refused:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hardening_03_workload_certificates_name_the_node_they_were_issued_to() {
        let dir = std::env::temp_dir().join(format!("dbgw-ca-bound-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let svc = service(&dir);
        let node1 = node_cert(&svc, &LeafSpec::node("td", "node-1"));
        let req = CertificateRequest {
            pod_uid: Some("uid-1".into()),
            csr: csr(),
        };
        let ok = svc.issue(Some(&node1), &req).unwrap();
        let cert = CertificateDer::from_pem_slice(ok.certificate.as_bytes()).unwrap();
        assert_eq!(
            pki::issued_to_node_of(&cert, "td").as_deref(),
            Some("node-1")
        );
        assert_eq!(pki::issued_to_node_of(&cert, "other.td"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_inventory_directory_gives_host_processes_its_host_identity() {
        let dir = std::env::temp_dir().join(format!("dbgw-ca-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let inventory = Inventory::parse(
            std::path::Path::new("inventory.yaml"),
            "pods:
  - uid: 0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b
    namespace: team-a
    name: api-7d9f
    service_account: api
    node: node-1
host:
  namespace: host
  service_account: node-tools
",
        )
        .unwrap();
        let svc = service_over(&dir, Box::new(inventory));
        let node1 = node_cert(&svc, &LeafSpec::node("td", "node-1"));
        let node2 = node_cert(&svc, &LeafSpec::node("td", "node-2"));
        let host = CertificateRequest {
            pod_uid: None,
            csr: csr(),
        };
        let ok = svc.issue(Some(&node1), &host).unwrap();
        assert_eq!(ok.spiffe_id, "spiffe://td/ns/host/sa/node-tools");
        // The inventory's pods are decided on as any directory's.
        let pod = CertificateRequest {
            pod_uid: Some("0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
            csr: csr(),
        };
        assert_eq!(
            svc.issue(Some(&node1), &pod).unwrap().spiffe_id,
            "spiffe://td/ns/team-a/sa/api"
        );
        assert!(matches!(
            svc.issue(Some(&node2), &pod),
            Err(Refusal::WrongNode { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
