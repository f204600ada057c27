//! Node joins: how a node agent gets its own certificate (`spiffe://<td>/node/<name>`)
//! without anyone making it by hand. The node makes a key pair, sends a CSR (only the public
//! key leaves the node) with a proof of who it is, and gets a short-lived node certificate,
//! which it renews the same way at about half-life.
//!
//! Methods (each off unless `gateway ca serve` is given its flags):
//! - `token` (`join/token.rs`): a secret made by `gateway ca token create` for one node
//!   name, stored hashed; one-time or time-limited;
//! - `kubernetes` (`join/kubernetes.rs`): the agent's projected service-account token,
//!   verified against the cluster's JWKS; the node name comes from the token's own claims;
//! - `aws-iam` (`join/aws_iam.rs`): an STS `GetCallerIdentity` request signed by the node
//!   with a CA-issued single-use challenge, sent on to STS by the CA.
//!
//! Wire: HTTPS (TLS 1.3) on its own listener (`--join-listen`), where a client certificate
//! is optional: a joining node has none yet; a renewing one presents its current node
//! certificate (a used one-time token renews only with it). `POST /v1/join/challenge` →
//! `{"challenge": "..."}`; `POST /v1/join` with [`JoinRequest`] → [`JoinResponse`] or
//! `403`/`400` `{"error": "..."}`.
//!
//! The proofs are checked here and in the method files; the certificate's names come from
//! what was verified, never from the CSR.

pub mod aws_iam;
pub mod client;
pub mod http;
pub mod kubernetes;
pub mod token;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use super::wire::ErrorBody;
use crate::pki::{self, LeafSpec};
use crate::telemetry::ca::{JOIN_REFUSALS_TOTAL, JOINS_TOTAL};

pub const JOIN_PATH: &str = "/v1/join";
pub const CHALLENGE_PATH: &str = "/v1/join/challenge";

/// A join request is a CSR, a proof (a JWT, or a signed STS request) and a name: a few KiB.
const MAX_REQUEST_BODY: usize = 64 * 1024;
/// How long an `aws-iam` challenge may wait for its join.
const CHALLENGE_TTL: Duration = Duration::from_secs(300);
/// Challenges outstanding at once; past it the oldest are dropped (a flood of challenge
/// requests cannot grow the CA's memory).
const MAX_CHALLENGES: usize = 10_000;

/// The proof a node offers, by method.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum Proof {
    Token {
        token: String,
    },
    Kubernetes {
        token: String,
    },
    AwsIam {
        challenge: String,
        request: aws_iam::SignedRequest,
    },
}

impl Proof {
    pub fn method(&self) -> &'static str {
        match self {
            Proof::Token { .. } => "token",
            Proof::Kubernetes { .. } => "kubernetes",
            Proof::AwsIam { .. } => "aws-iam",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The node's name as the node asks for it; the method must prove it.
    pub node_name: String,
    pub csr: String,
    #[serde(flatten)]
    pub proof: Proof,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The node certificate (PEM).
    pub certificate: String,
    /// The workload CA (PEM): what the node trusts the CA service and the proxy by.
    pub ca: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ChallengeResponse {
    pub challenge: String,
}

/// Why a join is refused; the message goes back to the node and into the CA's log.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("join method {0} is not enabled on this CA")]
    MethodOff(&'static str),
    #[error("node name {0:?} is not a valid node name (lower-case letters, digits, '-', '.')")]
    BadNodeName(String),
    #[error("token join refused: {0}")]
    Token(#[from] token::TokenError),
    #[error("kubernetes join refused: {0}")]
    Kubernetes(#[from] kubernetes::KubeJoinError),
    #[error("aws-iam join refused: {0}")]
    Aws(#[from] aws_iam::AwsJoinError),
    #[error("bad request: {0}")]
    BadRequest(String),
}

/// The join side of `gateway ca serve`.
pub struct Joins {
    pub ca: super::reload::Signing,
    pub trust_domain: String,
    /// Lifetime of node certificates.
    pub ttl: Duration,
    pub tokens: Option<token::TokenStore>,
    pub kubernetes: Option<kubernetes::KubeVerifier>,
    pub aws: Option<aws_iam::AwsVerifier>,
    pub challenges: Challenges,
}

/// Single-use challenges handed out for `aws-iam` joins.
#[derive(Default)]
pub struct Challenges(Mutex<HashMap<String, Instant>>);

impl Challenges {
    pub fn issue(&self) -> String {
        let c = hex(&rand::random::<[u8; 24]>());
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, at| now.duration_since(*at) < CHALLENGE_TTL);
        if map.len() >= MAX_CHALLENGES
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(c.clone(), now);
        c
    }

    /// Takes `c` out: true once for a challenge this CA issued less than
    /// [`CHALLENGE_TTL`] ago, false for any other and for every second use.
    pub fn consume(&self, c: &str) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(c).is_some_and(|at| at.elapsed() < CHALLENGE_TTL)
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `*` (any run of characters, `/` included) and `?` (one character) globs, for allow rules.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A node name goes into a SPIFFE URI and a DNS-like namespace: RFC 1123 labels only.
pub fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !n.starts_with(['-', '.'])
        && !n.ends_with(['-', '.'])
}

impl Joins {
    /// Checks the proof of `req` for its node name and signs the CSR's key into a node
    /// certificate. `peer_node` is the node name of a valid node certificate the request
    /// came with (a renewal), if any.
    pub async fn join(
        &self,
        req: &JoinRequest,
        peer_node: Option<&str>,
    ) -> Result<JoinResponse, JoinError> {
        let method = req.proof.method();
        let r = self.decide(req, peer_node).await;
        let name = if r.is_ok() {
            JOINS_TOTAL
        } else {
            JOIN_REFUSALS_TOTAL
        };
        metrics::counter!(name, "method" => method).increment(1);
        r
    }

    async fn decide(
        &self,
        req: &JoinRequest,
        peer_node: Option<&str>,
    ) -> Result<JoinResponse, JoinError> {
        if !valid_node_name(&req.node_name) {
            return Err(JoinError::BadNodeName(req.node_name.clone()));
        }
        let now = SystemTime::now();
        match &req.proof {
            Proof::Token { token } => {
                let store = self.tokens.as_ref().ok_or(JoinError::MethodOff("token"))?;
                store.check(token, &req.node_name, peer_node, now)?;
            }
            Proof::Kubernetes { token } => {
                let k = self
                    .kubernetes
                    .as_ref()
                    .ok_or(JoinError::MethodOff("kubernetes"))?;
                k.verify(token, &req.node_name).await?;
            }
            Proof::AwsIam { challenge, request } => {
                let a = self.aws.as_ref().ok_or(JoinError::MethodOff("aws-iam"))?;
                if !self.challenges.consume(challenge) {
                    return Err(aws_iam::AwsJoinError::Challenge.into());
                }
                a.verify(challenge, request, &req.node_name).await?;
            }
        }
        let ca = self.ca.load();
        let certificate = ca
            .issue_for_csr(
                &LeafSpec::node(&self.trust_domain, &req.node_name),
                &req.csr,
                self.ttl,
            )
            .map_err(|e| JoinError::BadRequest(e.to_string()))?;
        tracing::info!(node = %req.node_name, method = req.proof.method(), renewal = peer_node.is_some(), "node joined");
        Ok(JoinResponse {
            certificate,
            ca: ca.cert_pem().to_owned(),
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

fn error(status: StatusCode, error: String) -> Response<Full<Bytes>> {
    json(status, &ErrorBody { error })
}

async fn handle(
    joins: Arc<Joins>,
    peer_node: Option<String>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return error(
            StatusCode::NOT_FOUND,
            format!("only POST {JOIN_PATH} and {CHALLENGE_PATH}"),
        );
    }
    match req.uri().path() {
        CHALLENGE_PATH => {
            if joins.aws.is_none() {
                return error(
                    StatusCode::FORBIDDEN,
                    JoinError::MethodOff("aws-iam").to_string(),
                );
            }
            return json(
                StatusCode::OK,
                &ChallengeResponse {
                    challenge: joins.challenges.issue(),
                },
            );
        }
        JOIN_PATH => {}
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("only POST {JOIN_PATH} and {CHALLENGE_PATH}"),
            );
        }
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    let req = match serde_json::from_slice::<JoinRequest>(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
    };
    match joins.join(&req, peer_node.as_deref()).await {
        Ok(resp) => json(StatusCode::OK, &resp),
        Err(e) => {
            tracing::warn!(node = %req.node_name, method = req.proof.method(), refusal = %e, "join refused");
            let status = match e {
                JoinError::BadRequest(_) | JoinError::BadNodeName(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::FORBIDDEN,
            };
            error(status, e.to_string())
        }
    }
}

/// Serves joins until the listener fails. A client certificate is optional here; one that
/// rustls verified against the workload CA is still checked for its validity and its node
/// name per request (a kept-alive connection outlives it).
pub async fn serve(joins: Arc<Joins>, listener: TcpListener, tls: super::reload::Tls) {
    super::service::serve_https("join", listener, tls, move |peer_cert, req| {
        let peer_node = peer_cert.as_ref().and_then(|c| {
            pki::check_validity(c, SystemTime::now()).ok()?;
            pki::node_name_of(c, &joins.trust_domain).ok()
        });
        handle(joins.clone(), peer_node, req)
    })
    .await
}

/// `gateway ca serve`'s join flags.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinOptions {
    /// Serve node joins (HTTPS, client certificate optional) on this address; off when
    /// not given.
    #[arg(long, env = "GATEWAY_JOIN_LISTEN")]
    pub join_listen: Option<SocketAddr>,
    /// Lifetime of node certificates from joins (nodes renew at about half-life).
    #[arg(long, env = "GATEWAY_NODE_CERT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub node_cert_ttl: Duration,
    /// `token` joins: the directory `gateway ca token create` writes (hashed tokens).
    #[arg(long, env = "GATEWAY_JOIN_TOKENS")]
    pub join_tokens: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub kubernetes: kubernetes::KubeJoinOptions,
    #[command(flatten)]
    pub aws: aws_iam::AwsJoinOptions,
}

impl JoinOptions {
    /// The join service these flags describe, or `None` without `--join-listen`.
    pub fn build(
        &self,
        ca: &super::reload::Signing,
        trust_domain: &str,
    ) -> anyhow::Result<Option<Arc<Joins>>> {
        if self.join_listen.is_none() {
            return Ok(None);
        }
        let joins = Joins {
            ca: ca.clone(),
            trust_domain: trust_domain.to_owned(),
            ttl: self.node_cert_ttl,
            tokens: self.join_tokens.clone().map(token::TokenStore::new),
            kubernetes: self.kubernetes.build()?,
            aws: self.aws.build()?,
            challenges: Challenges::default(),
        };
        anyhow::ensure!(
            joins.tokens.is_some() || joins.kubernetes.is_some() || joins.aws.is_some(),
            "--join-listen needs at least one join method (--join-tokens, --join-k8s-*, --join-aws-*)"
        );
        Ok(Some(Arc::new(joins)))
    }
}

/// Starts the join listener on the current runtime (`gateway ca serve`'s hook).
pub async fn spawn(
    joins: Arc<Joins>,
    addr: SocketAddr,
    tls: super::reload::Tls,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to bind join listen address {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(joins, listener, tls));
    Ok(local)
}

/// The client of the API server the CA runs against (in-cluster or `$KUBECONFIG`), for the
/// join methods that ask it; made on a thread of its own, since the join options are built
/// before the CA's runtime exists.
fn kube_client() -> anyhow::Result<kube::Client> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(kube::Client::try_default())
                .map_err(anyhow::Error::from)
        })
        .join()
        .expect("client thread")
    })
}

#[cfg(test)]
mod tests;
