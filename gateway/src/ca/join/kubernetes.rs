//! `kubernetes` joins: the node agent's projected service-account token (a JWT the API
//! server signed, for an audience of ours, short-lived), verified against the cluster's
//! JWKS: from the issuer's OIDC discovery document (`<issuer>/.well-known/openid-configuration`
//! → `jwks_uri`, as EKS publishes it) or from a file. RS256 and ES256 only.
//!
//! What it proves: the API server vouches that the bearer runs as `<namespace>/<service
//! account>` in the pod the token names, on the node the token names (Kubernetes 1.30+
//! put `kubernetes.io.node` into pod-bound tokens). What it trusts: the issuer's keys, and
//! the allow rules (namespace/service account globs). The node name must be the token's;
//! a token without node claims is refused unless `--join-k8s-pod-lookup` lets the CA get
//! the pod (RBAC `pods/get`) and take its `spec.nodeName` (and the pod's uid must be the
//! token's).
//!
//! With `--join-k8s-token-review` the API server checks the token instead of the keys
//! (`kubernetes/review.rs`): it trusts the API server, and also sees tokens of deleted pods.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

use super::http::Outbound;
use super::{glob_match, kube_client};

mod review;

/// A fetched key set is used this long before it is fetched again.
const KEYS_MAX_AGE: Duration = Duration::from_secs(600);
/// An unknown `kid` refetches the keys (a key rotation), but not more often than this.
const REFETCH_EVERY: Duration = Duration::from_secs(30);
/// Clock-skew leeway on `exp`/`nbf`.
const LEEWAY_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum KubeJoinError {
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted (RS256, ES256)")]
    Algorithm(Algorithm),
    #[error("token is signed by key {0:?}, which is not in the cluster's key set")]
    UnknownKey(String),
    #[error("token signature does not verify against the cluster's key")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not for audience {0:?}")]
    Audience(String),
    #[error("token is not from issuer {0:?}")]
    Issuer(String),
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("service account {namespace}/{service_account} is not allowed to join")]
    NotAllowed {
        namespace: String,
        service_account: String,
    },
    #[error(
        "token has no node claims (kubernetes.io.node); the CA is not configured to look the pod up"
    )]
    NoNodeClaims,
    #[error("token is for node {token_for:?}, not {asked:?}")]
    OtherNode { token_for: String, asked: String },
    #[error("cannot get the cluster's keys: {0}")]
    Keys(String),
    #[error("pod lookup: {0}")]
    PodLookup(String),
    #[error("the API server rejected the token: {0}")]
    Rejected(String),
    #[error("token review failed: {0}")]
    Review(String),
}

/// `gateway ca serve`'s `kubernetes` join flags.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeJoinOptions {
    /// The service-account issuer (URL); its OIDC discovery document names the JWKS. Also
    /// the `iss` every token must carry.
    #[arg(long, env = "GATEWAY_JOIN_K8S_ISSUER")]
    pub join_k8s_issuer: Option<String>,
    /// A JWKS file instead of discovery (`kubectl get --raw /openid/v1/jwks`).
    #[arg(long, env = "GATEWAY_JOIN_K8S_JWKS")]
    pub join_k8s_jwks: Option<PathBuf>,
    /// The audience the agent's projected token is made for.
    #[arg(long, env = "GATEWAY_JOIN_K8S_AUDIENCE", default_value = "gateway-ca")]
    pub join_k8s_audience: String,
    /// `namespace/service-account` globs allowed to join (e.g. `db-gateway/node-agent`).
    #[arg(long, env = "GATEWAY_JOIN_K8S_ALLOW", value_delimiter = ',')]
    pub join_k8s_allow: Vec<String>,
    /// Tokens without node claims (clusters before 1.30): get the pod from the API
    /// (in-cluster credentials or `$KUBECONFIG`) and take its `spec.nodeName`.
    #[arg(long, env = "GATEWAY_JOIN_K8S_POD_LOOKUP")]
    pub join_k8s_pod_lookup: bool,
    /// Check tokens with a TokenReview on the API server (in-cluster credentials or
    /// `$KUBECONFIG`; RBAC `tokenreviews create`) instead of the cluster's keys: also refuses
    /// tokens of pods deleted since.
    #[arg(long, env = "GATEWAY_JOIN_K8S_TOKEN_REVIEW")]
    pub join_k8s_token_review: bool,
    /// Extra CA bundle for the issuer's HTTPS (besides the system's roots).
    #[arg(long, env = "GATEWAY_JOIN_K8S_ISSUER_CA")]
    pub join_k8s_issuer_ca: Option<PathBuf>,
}

impl KubeJoinOptions {
    pub fn build(&self) -> anyhow::Result<Option<KubeVerifier>> {
        if self.join_k8s_issuer.is_none()
            && self.join_k8s_jwks.is_none()
            && !self.join_k8s_token_review
        {
            return Ok(None);
        }
        anyhow::ensure!(
            !self.join_k8s_allow.is_empty(),
            "kubernetes joins need --join-k8s-allow (namespace/service-account globs)"
        );
        let extra = match &self.join_k8s_issuer_ca {
            Some(p) => crate::pki::load_certs(p)?,
            None => Vec::new(),
        };
        let keys = match (&self.join_k8s_jwks, &self.join_k8s_issuer) {
            _ if self.join_k8s_token_review => KeySource::TokenReview(kube_client()?),
            (Some(p), _) => KeySource::File(p.clone()),
            (None, Some(issuer)) => KeySource::Discovery(issuer.clone()),
            (None, None) => unreachable!("checked above"),
        };
        let pod_lookup = if self.join_k8s_pod_lookup {
            Some(kube_client()?)
        } else {
            None
        };
        Ok(Some(KubeVerifier::new(
            keys,
            self.join_k8s_issuer.clone(),
            self.join_k8s_audience.clone(),
            self.join_k8s_allow.clone(),
            pod_lookup,
            Outbound::new(&extra, Duration::from_secs(10)),
        )))
    }
}

/// Where a token's signature is checked.
pub enum KeySource {
    /// The issuer's OIDC discovery document names the key set.
    Discovery(String),
    /// A key set in a file.
    File(PathBuf),
    /// No keys: the API server reviews the token.
    TokenReview(kube::Client),
}

struct Cached {
    keys: JwkSet,
    fetched: Instant,
}

pub struct KubeVerifier {
    keys: KeySource,
    issuer: Option<String>,
    audience: String,
    allow: Vec<String>,
    pod_lookup: Option<kube::Client>,
    http: Outbound,
    cache: Mutex<Option<Cached>>,
}

/// The claims of a projected service-account token that matter here.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubeClaims>,
}

#[derive(Debug, Deserialize)]
struct KubeClaims {
    namespace: String,
    serviceaccount: Named,
    pod: Option<Named>,
    node: Option<Named>,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
    #[serde(default)]
    uid: Option<String>,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

impl KubeVerifier {
    pub fn new(
        keys: KeySource,
        issuer: Option<String>,
        audience: String,
        allow: Vec<String>,
        pod_lookup: Option<kube::Client>,
        http: Outbound,
    ) -> Self {
        Self {
            keys,
            issuer,
            audience,
            allow,
            pod_lookup,
            http,
            cache: Mutex::new(None),
        }
    }

    /// Verifies `token` and that it lets `node_name` join.
    pub async fn verify(&self, token: &str, node_name: &str) -> Result<(), KubeJoinError> {
        let k = match &self.keys {
            KeySource::TokenReview(client) => review::review(client, token, &self.audience).await?,
            _ => self.claims(token).await?,
        };
        let who = format!("{}/{}", k.namespace, k.serviceaccount.name);
        if !self.allow.iter().any(|g| glob_match(g, &who)) {
            return Err(KubeJoinError::NotAllowed {
                namespace: k.namespace,
                service_account: k.serviceaccount.name,
            });
        }
        let token_node = match (&k.node, &self.pod_lookup, &k.pod) {
            (Some(n), _, _) => n.name.clone(),
            (None, Some(client), Some(pod)) => node_of_pod(client, &k.namespace, pod).await?,
            _ => return Err(KubeJoinError::NoNodeClaims),
        };
        if token_node != node_name {
            return Err(KubeJoinError::OtherNode {
                token_for: token_node,
                asked: node_name.to_owned(),
            });
        }
        Ok(())
    }

    /// The token's claims, once its signature, expiry, audience and issuer check out
    /// against the cluster's keys.
    async fn claims(&self, token: &str) -> Result<KubeClaims, KubeJoinError> {
        let header = decode_header(token).map_err(|e| KubeJoinError::Malformed(e.to_string()))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(KubeJoinError::Algorithm(header.alg));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let jwk = self.key(&kid).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| KubeJoinError::Keys(e.to_string()))?;
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_SECS;
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "aud", "sub"]);
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
        }
        let claims = decode::<Claims>(token, &key, &v)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature => KubeJoinError::Signature,
                    K::ExpiredSignature => KubeJoinError::Expired,
                    K::InvalidAudience => KubeJoinError::Audience(self.audience.clone()),
                    K::InvalidIssuer => {
                        KubeJoinError::Issuer(self.issuer.clone().unwrap_or_default())
                    }
                    K::InvalidAlgorithm => KubeJoinError::Algorithm(header.alg),
                    _ => KubeJoinError::Invalid(e.to_string()),
                }
            })?
            .claims;
        claims
            .kubernetes
            .ok_or_else(|| KubeJoinError::Invalid("no kubernetes.io claims".into()))
    }

    /// The key `kid` from the cached set, fetching the set when it is old or lacks the key.
    async fn key(&self, kid: &str) -> Result<jsonwebtoken::jwk::Jwk, KubeJoinError> {
        let find = |set: &JwkSet| {
            if kid.is_empty() && set.keys.len() == 1 {
                return set.keys.first().cloned();
            }
            set.find(kid).cloned()
        };
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.as_ref() {
                let fresh = c.fetched.elapsed() < KEYS_MAX_AGE;
                match find(&c.keys) {
                    Some(k) if fresh => return Ok(k),
                    None if c.fetched.elapsed() < REFETCH_EVERY => {
                        return Err(KubeJoinError::UnknownKey(kid.to_owned()));
                    }
                    _ => {}
                }
            }
        }
        let keys = self.fetch().await?;
        let found = find(&keys);
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
            keys,
            fetched: Instant::now(),
        });
        found.ok_or_else(|| KubeJoinError::UnknownKey(kid.to_owned()))
    }

    async fn fetch(&self) -> Result<JwkSet, KubeJoinError> {
        let bad = |e: String| KubeJoinError::Keys(e);
        let bytes = match &self.keys {
            KeySource::TokenReview(_) => return Err(bad("no keys: tokens are reviewed".into())),
            KeySource::File(p) => std::fs::read(p)
                .map_err(|e| bad(format!("{}: {e}", p.display())))?
                .into(),
            KeySource::Discovery(issuer) => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let (status, body) = self.http.get(&url).await.map_err(|e| bad(e.to_string()))?;
                if status != 200 {
                    return Err(bad(format!("{url}: HTTP {status}")));
                }
                let d: Discovery =
                    serde_json::from_slice(&body).map_err(|e| bad(format!("{url}: {e}")))?;
                let (status, body) = self
                    .http
                    .get(&d.jwks_uri)
                    .await
                    .map_err(|e| bad(e.to_string()))?;
                if status != 200 {
                    return Err(bad(format!("{}: HTTP {status}", d.jwks_uri)));
                }
                body
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a JWKS: {e}")))
    }
}

/// The node the token's pod runs on, from the API; the pod must be the token's (same uid),
/// not a later pod of the same name.
async fn node_of_pod(
    client: &kube::Client,
    namespace: &str,
    pod: &Named,
) -> Result<String, KubeJoinError> {
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), namespace);
    let p = api
        .get(&pod.name)
        .await
        .map_err(|e| KubeJoinError::PodLookup(e.to_string()))?;
    if p.metadata.uid != pod.uid {
        return Err(KubeJoinError::PodLookup(format!(
            "pod {namespace}/{} is not the token's (uid changed)",
            pod.name
        )));
    }
    p.spec.and_then(|s| s.node_name).ok_or_else(|| {
        KubeJoinError::PodLookup(format!("pod {namespace}/{} is not scheduled", pod.name))
    })
}
