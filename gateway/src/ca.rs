//! `gateway ca serve`: the workload CA as a service. A node agent authenticates with its
//! own certificate (`spiffe://<td>/node/<name>`), names a pod by UID and sends a CSR; the CA
//! signs a workload certificate for that pod's namespace and service account only if its
//! pod directory places the pod on that very node. A compromised node can therefore mint
//! identities only for pods that run on it.
//!
//! Wire: HTTP/1.1 over mutual TLS 1.3, `POST /v1/workload-certificates` with JSON
//! `{"pod_uid": "...", "csr": "<PEM>"}` → `200 {"certificate": "<PEM>", "spiffe_id": "..."}`
//! or `403`/`400` `{"error": "..."}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use crate::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};

pub const WORKLOAD_CERTIFICATES_PATH: &str = "/v1/workload-certificates";
/// A CSR is well under 1 KiB; anything bigger is not one.
const MAX_REQUEST_BODY: usize = 16 * 1024;

/// Where a pod runs and as whom, as the CA's directory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub service_account: String,
    pub node: String,
}

/// The CA's source of truth about pods (a static inventory or a Kubernetes watch).
pub trait PodDirectory: Send + Sync {
    fn pod(&self, uid: &str) -> Option<PodRecord>;
    /// (namespace, service account) for processes outside any pod, if allowed at all.
    fn host_identity(&self) -> Option<(String, String)>;
}

/// Only as complete as its watch: one scoped to a node vouches for that node's pods alone,
/// which suits a CA per node; a central CA needs a watch of every node's pods.
impl PodDirectory for crate::identity::kube::KubePods {
    fn pod(&self, uid: &str) -> Option<PodRecord> {
        crate::identity::PodSource::pod(self, uid).map(|p| PodRecord {
            namespace: p.namespace,
            service_account: p.service_account,
            node: p.node,
        })
    }

    fn host_identity(&self) -> Option<(String, String)> {
        self.host()
            .map(|h| (h.namespace.clone(), h.service_account.clone()))
    }
}

/// A shared directory (a Kubernetes watch also read by `/readyz`) serves as one too.
impl<T: PodDirectory + ?Sized> PodDirectory for Arc<T> {
    fn pod(&self, uid: &str) -> Option<PodRecord> {
        (**self).pod(uid)
    }

    fn host_identity(&self) -> Option<(String, String)> {
        (**self).host_identity()
    }
}

impl PodDirectory for crate::identity::inventory::Inventory {
    fn pod(&self, uid: &str) -> Option<PodRecord> {
        self.lookup(uid).map(|p| PodRecord {
            namespace: p.namespace.clone(),
            service_account: p.service_account.clone(),
            node: p.node.clone(),
        })
    }

    fn host_identity(&self) -> Option<(String, String)> {
        self.host()
            .map(|h| (h.namespace.clone(), h.service_account.clone()))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The pod, or `None` for the node's host identity (processes outside any pod).
    pub pod_uid: Option<String>,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    pub certificate: String,
    pub spiffe_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

pub struct CaService {
    pub ca: CertificateAuthority,
    pub trust_domain: String,
    pub ttl: Duration,
    pub pods: Box<dyn PodDirectory>,
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
}

impl CaService {
    /// Decides and signs one request from the node `node_cert` identifies.
    pub fn issue(
        &self,
        node_cert: Option<&rustls_pki_types::CertificateDer<'_>>,
        req: &CertificateRequest,
    ) -> Result<CertificateResponse, Refusal> {
        let node_cert = node_cert.ok_or_else(|| Refusal::NotANode("no certificate".into()))?;
        let node = pki::node_name_of(node_cert, &self.trust_domain)
            .map_err(|e| Refusal::NotANode(e.to_string()))?;
        let id = match &req.pod_uid {
            None => {
                let (ns, sa) = self.pods.host_identity().ok_or(Refusal::NoHostIdentity)?;
                SpiffeId::new(&self.trust_domain, &ns, &sa)
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
            .issue_for_csr(&LeafSpec::workload(&id), &req.csr, self.ttl)
            .map_err(|e| Refusal::BadRequest(e.to_string()))?;
        metrics::counter!("gateway_ca_certificates_issued_total").increment(1);
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
    if req.method() != Method::POST || req.uri().path() != WORKLOAD_CERTIFICATES_PATH {
        return json(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: format!("only POST {WORKLOAD_CERTIFICATES_PATH}"),
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
    let result = serde_json::from_slice::<CertificateRequest>(&body)
        .map_err(|e| Refusal::BadRequest(e.to_string()))
        .and_then(|r| svc.issue(node_cert.as_ref(), &r));
    match result {
        Ok(resp) => json(StatusCode::OK, &resp),
        Err(refusal) => {
            tracing::warn!(%refusal, "workload certificate refused");
            metrics::counter!("gateway_ca_refusals_total").increment(1);
            let status = match refusal {
                Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::FORBIDDEN,
            };
            json(
                status,
                &ErrorBody {
                    error: refusal.to_string(),
                },
            )
        }
    }
}

/// Serves until the listener fails; every connection must present a client certificate
/// from the workload CA (checked by rustls), and its node name is read per request.
pub async fn serve(svc: Arc<CaService>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let svc = svc.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, %e, "ca: tls handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
            let node_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            let service = hyper::service::service_fn(move |req| {
                let svc = svc.clone();
                let node_cert = node_cert.clone();
                async move { Ok::<_, Infallible>(handle(svc, node_cert, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the CA at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("CA request failed: {0}")]
    Http(String),
    #[error("CA refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
}

/// A workload certificate with its private key, which never leaves this process.
pub struct IssuedCertificate {
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub key: rustls_pki_types::PrivateKeyDer<'static>,
    pub spiffe_id: SpiffeId,
}

/// The node's side: asks the CA for a pod's workload certificate.
pub struct CaClient {
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    /// TLS with the node's own certificate.
    pub tls: Arc<ClientConfig>,
}

impl CaClient {
    pub async fn workload_certificate(
        &self,
        pod_uid: Option<&str>,
    ) -> Result<IssuedCertificate, ClientError> {
        use rustls_pki_types::pem::PemObject;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(pki::PkiError::from)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(pki::PkiError::from)?;
        let body = serde_json::to_vec(&CertificateRequest {
            pod_uid: pod_uid.map(str::to_owned),
            csr,
        })
        .map_err(|e| ClientError::Http(e.to_string()))?;

        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::post(WORKLOAD_CERTIFICATES_PATH)
            .header(hyper::header::HOST, "gateway-ca")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            return Err(ClientError::Refused(msg));
        }
        let r: CertificateResponse =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Http(e.to_string()))?;
        let chain: Vec<_> =
            rustls_pki_types::CertificateDer::pem_slice_iter(r.certificate.as_bytes())
                .filter_map(Result::ok)
                .collect();
        let first = chain
            .first()
            .ok_or_else(|| ClientError::Http("no certificate in answer".into()))?;
        let spiffe_id = pki::spiffe_id_of(first)?;
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(IssuedCertificate {
            chain,
            key,
            spiffe_id,
        })
    }
}

/// What `gateway ca serve` needs.
pub struct ServeOptions {
    pub dir: std::path::PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The CA service's own server certificate (`gateway ca issue-server`).
    pub tls_cert: std::path::PathBuf,
    pub tls_key: std::path::PathBuf,
    pub inventory: std::path::PathBuf,
    pub ttl: Duration,
}

/// `gateway ca serve`: runs until SIGTERM/SIGINT.
pub fn run(opts: ServeOptions) -> anyhow::Result<()> {
    use anyhow::Context;
    let metrics = crate::admin::install_metrics()?;
    let readiness = crate::admin::Readiness::default();
    let admin_addr = crate::admin::spawn(opts.admin_listen, metrics, readiness)?;
    let trust_domain = std::fs::read_to_string(opts.dir.join("trust-domain"))
        .with_context(|| format!("{} holds no CA (run `gateway ca init`)", opts.dir.display()))?
        .trim()
        .to_owned();
    let ca = CertificateAuthority::load(
        &opts.dir.join(pki::WORKLOAD_CA_CERT),
        &opts.dir.join(pki::WORKLOAD_CA_KEY),
    )?;
    let inventory = crate::identity::inventory::Inventory::load(&opts.inventory)?;
    let client_ca = pki::load_certs(&opts.dir.join(pki::WORKLOAD_CA_CERT))?;
    let tls = crate::tunnel::server_config(
        pki::load_certs(&opts.tls_cert)?,
        pki::load_key(&opts.tls_key)?,
        &client_ca,
    )?;
    let svc = Arc::new(CaService {
        ca,
        trust_domain,
        ttl: opts.ttl,
        pods: Box::new(inventory),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("failed to bind CA listen address {}", opts.listen))?;
        let local = listener.local_addr()?;
        tracing::info!(listen = %local, admin = %admin_addr, "CA service ready");
        println!("ADMIN {admin_addr}");
        println!("LISTENING {local}");
        tokio::select! {
            _ = serve(svc, listener, Arc::new(tls)) => {}
            _ = crate::admin::shutdown_signal() => tracing::info!("shutdown signal: CA service exiting"),
        }
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use std::collections::HashMap;

    struct Pods(HashMap<String, PodRecord>);

    impl PodDirectory for Pods {
        fn pod(&self, uid: &str) -> Option<PodRecord> {
            self.0.get(uid).cloned()
        }
        fn host_identity(&self) -> Option<(String, String)> {
            None
        }
    }

    fn service(dir: &std::path::Path) -> CaService {
        pki::init_ca(dir, "td").unwrap();
        let ca = CertificateAuthority::load(
            &dir.join(pki::WORKLOAD_CA_CERT),
            &dir.join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        let pods = Pods(HashMap::from([(
            "uid-1".to_owned(),
            PodRecord {
                namespace: "team-a".into(),
                service_account: "api".into(),
                node: "node-1".into(),
            },
        )]));
        CaService {
            ca,
            trust_domain: "td".into(),
            ttl: Duration::from_secs(3600),
            pods: Box::new(pods),
        }
    }

    fn node_cert(svc: &CaService, leaf: &LeafSpec) -> CertificateDer<'static> {
        let (pem, _) = svc.ca.issue(leaf, Duration::from_secs(60)).unwrap();
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // A greedy CSR asking for a SAN of its own: the CA must ignore it.
        let params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
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
}
