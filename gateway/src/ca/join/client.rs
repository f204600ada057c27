//! The node's side of joins: a fresh key pair per join (kept in this process's memory only),
//! a CSR and the method's proof sent to the CA, and the node certificate it answers put
//! where every TLS connection to the CA finds it ([`NodeIdentity`], a rustls client
//! certificate resolver). [`JoinClient::keep_renewed`] then renews at about half-life with
//! jitter, retries with backoff (capped at 150 s), and marks the node's readiness degraded
//! when the certificate nears its end without a renewal.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use super::{CHALLENGE_PATH, ChallengeResponse, JOIN_PATH, JoinRequest, JoinResponse, Proof};
use crate::admin::{BlockReady, Readiness};
use crate::ca::wire::ErrorBody;
use crate::pki::PkiError;

const MAX_RESPONSE_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JoinClientError {
    #[error("cannot reach the CA's join endpoint at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("join request failed: {0}")]
    Http(String),
    #[error("the CA refused the join: {0}")]
    Refused(String),
    #[error("cannot read the join proof {path}: {source}")]
    Proof {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("aws-iam: {0}")]
    Aws(String),
    #[error("the CA answered no usable node certificate: {0}")]
    BadCertificate(String),
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The node's current node certificate and key, for every TLS client that talks to the CA.
/// Past its `notAfter` it is no longer offered (the CA would refuse it anyway).
#[derive(Debug, Default)]
pub struct NodeIdentity {
    current: RwLock<Option<(Arc<CertifiedKey>, SystemTime)>>,
}

impl NodeIdentity {
    pub fn set(&self, key: Arc<CertifiedKey>, not_after: SystemTime) {
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(crate::telemetry::node::NODE_CERTIFICATE_EXPIRY).set(secs);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some((key, not_after));
    }

    /// Takes a node certificate and key from files (`gateway ca issue-node`), for nodes that
    /// do not join; called again when the files change.
    pub fn set_from_files(
        &self,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<SystemTime, PkiError> {
        let chain = crate::pki::load_certs(cert)?;
        let not_after = crate::pki::not_after(&chain[0])?;
        let signing = crate::tunnel::crypto_provider()
            .key_provider
            .load_private_key(crate::pki::load_key(key)?)
            .map_err(|e| PkiError::BadKey {
                path: key.to_owned(),
                reason: e.to_string(),
            })?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| PkiError::BadKey {
            path: key.to_owned(),
            reason: format!("not the key of {}: {e}", cert.display()),
        })?;
        self.set(Arc::new(certified), not_after);
        Ok(not_after)
    }

    /// The certificate if it is still valid at `now`.
    pub fn current(&self, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        c.as_ref()
            .filter(|(_, not_after)| now < *not_after)
            .map(|(k, _)| k.clone())
    }
}

impl rustls::client::ResolvesClientCert for NodeIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current(SystemTime::now())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS 1.3 to the CA (its join listener and its workload endpoint), the CA verified against
/// whatever `roots` holds at handshake time (a rotation's bundle is taken without a new
/// config), the client certificate whatever `identity` holds then.
pub fn client_config(
    roots: Arc<crate::tunnel::ReloadableRoots>,
    identity: Arc<NodeIdentity>,
) -> Result<rustls::ClientConfig, JoinClientError> {
    let bad = |e: String| JoinClientError::BadCertificate(e);
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::tunnel::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(roots)
        .with_client_cert_resolver(identity);
    cfg.alpn_protocols = vec![crate::tunnel::ALPN.to_vec()];
    // A resumed session would present the identity of the session it resumes (none, on
    // the first join), not the certificate `identity` holds now.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// How the node proves itself.
pub enum Prover {
    /// A `gateway ca token create` token, read from this file at every join.
    Token(PathBuf),
    /// A projected service-account token, read at every join (the kubelet refreshes it).
    Kubernetes(PathBuf),
    /// An STS `GetCallerIdentity` request signed with the node's AWS credentials.
    AwsIam(super::aws_iam::Signer),
}

/// Renewal timing (DESIGN.md: half-life with jitter, one minute of clock-skew leeway,
/// backoff capped at 150 s). Tests shorten it.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub first_retry: Duration,
    pub max_retry: Duration,
    /// The certificate counts as ending this much before its `notAfter` (the CA's clock
    /// may be ahead of ours).
    pub leeway: Duration,
    /// Readiness turns degraded once this fraction of the lifetime has passed without a
    /// renewal.
    pub degraded_after: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_secs(5),
            max_retry: Duration::from_secs(150),
            leeway: Duration::from_secs(60),
            degraded_after: 0.75,
        }
    }
}

pub struct JoinClient {
    /// `host:port`; a name is looked up at every connection.
    pub addr: String,
    pub server_name: ServerName<'static>,
    /// From [`client_config`], with the same [`NodeIdentity`] as `identity`.
    pub tls: Arc<rustls::ClientConfig>,
    pub identity: Arc<NodeIdentity>,
    pub node_name: String,
    pub prover: Prover,
    /// Bound of one join (connect, TLS, proof, answer).
    pub timeout: Duration,
    pub schedule: Schedule,
}

/// A node certificate the CA issued.
#[derive(Debug)]
pub struct Joined {
    pub key: Arc<CertifiedKey>,
    pub received: SystemTime,
    pub not_after: SystemTime,
}

impl JoinClient {
    /// One join: a fresh key, the proof, the CA's answer checked to be a node certificate
    /// for this node's name and this key. Installs it in [`NodeIdentity`].
    pub async fn join(&self) -> Result<Joined, JoinClientError> {
        tokio::time::timeout(self.timeout, self.try_join())
            .await
            .unwrap_or(Err(JoinClientError::Timeout(self.timeout)))
    }

    async fn try_join(&self) -> Result<Joined, JoinClientError> {
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(PkiError::from)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(PkiError::from)?;
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .map_err(|source| JoinClientError::Proof {
                    path: p.clone(),
                    source,
                })
        };
        // Challenge and join on one connection: behind a Service, the CA replica that
        // issued the challenge is the one that checks it (challenges are not shared).
        let mut ca = self.connect().await?;
        let proof = match &self.prover {
            Prover::Token(p) => Proof::Token { token: read(p)? },
            Prover::Kubernetes(p) => Proof::Kubernetes { token: read(p)? },
            Prover::AwsIam(signer) => {
                let (status, body) = post(&mut ca, CHALLENGE_PATH, Vec::new()).await?;
                let c: ChallengeResponse = answer(status, &body)?;
                let request = signer
                    .sign(&c.challenge)
                    .await
                    .map_err(|e| JoinClientError::Aws(e.to_string()))?;
                Proof::AwsIam {
                    challenge: c.challenge,
                    request,
                }
            }
        };
        let body = serde_json::to_vec(&JoinRequest {
            node_name: self.node_name.clone(),
            csr,
            proof,
        })
        .map_err(|e| JoinClientError::Http(e.to_string()))?;
        let received = SystemTime::now();
        let (status, bytes) = post(&mut ca, JOIN_PATH, body).await?;
        let r: JoinResponse = answer(status, &bytes)?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(r.certificate.as_bytes())
                .filter_map(Result::ok)
                .collect();
        let first = chain
            .first()
            .ok_or_else(|| JoinClientError::BadCertificate("no certificate".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(first)
            .map_err(|e| JoinClientError::BadCertificate(e.to_string()))?;
        let cn = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok());
        if cn != Some(self.node_name.as_str()) {
            return Err(JoinClientError::BadCertificate(format!(
                "issued to {cn:?}, not {:?}",
                self.node_name
            )));
        }
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(JoinClientError::BadCertificate(
                "the certificate is not for the key this node sent".into(),
            ));
        }
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = crate::tunnel::crypto_provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| JoinClientError::BadCertificate(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        self.identity.set(certified.clone(), not_after);
        Ok(Joined {
            key: certified,
            received,
            not_after,
        })
    }

    /// An HTTP/1.1 connection to the CA's join listener, kept alive for several requests.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, JoinClientError> {
        let connect = |e: String| JoinClientError::Connect {
            addr: self.addr.clone(),
            reason: e,
        };
        let tcp = TcpStream::connect(self.addr.as_str())
            .await
            .map_err(|e| connect(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| connect(e.to_string()))?;
        let http = |e: hyper::Error| JoinClientError::Http(e.to_string());
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(http)?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Renews `joined` at about half-life (±10 % jitter) for as long as the process runs.
    /// A failed renewal is retried with doubling backoff up to `max_retry` (but never waiting
    /// past half the time the certificate has left); past
    /// `degraded_after` of the lifetime without a renewal, `readiness` says degraded (the
    /// cached certificate still serves until its `notAfter`). Never returns.
    pub async fn keep_renewed(&self, mut joined: Joined, readiness: Readiness) {
        let mut degraded: Option<BlockReady> = None;
        loop {
            let total = joined
                .not_after
                .duration_since(joined.received)
                .unwrap_or_default();
            // A minute of leeway on an hour; a quarter of the life on certificates shorter
            // than four minutes (else a short TTL would renew without pause).
            let life = total.saturating_sub(self.schedule.leeway.min(total / 4));
            let jitter = 0.9 + rand::random::<f64>() * 0.2;
            let renew_at = joined.received + life.mul_f64(0.5 * jitter);
            let degraded_at = joined.received + life.mul_f64(self.schedule.degraded_after);
            sleep_until(renew_at).await;
            let mut retry = self.schedule.first_retry;
            loop {
                match self.join().await {
                    Ok(next) => {
                        tracing::info!(node = %self.node_name, not_after = %humantime::format_rfc3339_seconds(next.not_after), "node certificate renewed");
                        joined = next;
                        degraded = None;
                        break;
                    }
                    Err(e) => {
                        let now = SystemTime::now();
                        if degraded.is_none() && now >= degraded_at {
                            degraded = Some(readiness.block(&format!(
                                "degraded: node certificate not renewed, expires {}",
                                humantime::format_rfc3339_seconds(joined.not_after)
                            )));
                            tracing::error!(node = %self.node_name, "node certificate not renewed: readiness degraded");
                        }
                        // Backoff, but never past half the time left (a CA back before the
                        // end is used), and awake in time to say "degraded".
                        let left = joined.not_after.duration_since(now).unwrap_or_default();
                        let mut wait = retry.min(left / 2);
                        if degraded.is_none() {
                            wait = wait.min(degraded_at.duration_since(now).unwrap_or_default());
                        }
                        let wait = wait.max(Duration::from_millis(100));
                        tracing::warn!(node = %self.node_name, %e, retry_in = ?wait, "node certificate renewal failed");
                        tokio::time::sleep(wait).await;
                        retry = (retry * 2).min(self.schedule.max_retry);
                    }
                }
            }
        }
    }
}

/// One request on `ca`'s connection.
async fn post(
    ca: &mut SendRequest<Full<Bytes>>,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Bytes), JoinClientError> {
    let http = |e: hyper::Error| JoinClientError::Http(e.to_string());
    ca.ready().await.map_err(http)?;
    let req = Request::post(path)
        .header(hyper::header::HOST, "gateway-ca")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| JoinClientError::Http(e.to_string()))?;
    let resp = ca.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
        .collect()
        .await
        .map_err(|e| JoinClientError::Http(e.to_string()))?
        .to_bytes();
    Ok((status, bytes))
}

async fn sleep_until(t: SystemTime) {
    tokio::time::sleep(t.duration_since(SystemTime::now()).unwrap_or_default()).await;
}

/// The JSON answer of a `2xx`, or the CA's refusal.
fn answer<T: serde::de::DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, JoinClientError> {
    if !(200..300).contains(&status) {
        let msg = serde_json::from_slice::<ErrorBody>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return Err(JoinClientError::Refused(msg));
    }
    serde_json::from_slice(body).map_err(|e| JoinClientError::Http(e.to_string()))
}
