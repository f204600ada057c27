//! `kubernetes` joins against a local OIDC issuer (discovery document and JWKS) with tokens
//! the test signs (RS256 and ES256) as the API server makes them, and a local API server
//! for the pod lookup.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

use super::super::client::Prover;
use super::super::http::Outbound;
use super::super::kubernetes::{KeySource, KubeVerifier};
use super::*;

/// A test-only RSA key (2048 bits), made for this test with `openssl genrsa`.
const RSA_KEY: &str = "
-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAyhz2HjWfPz9TN9EzcjW0ldx8yBt8OIopWegjaAdBh6u+JXE3
UiqUK8MBDA8oFmDqE8/kJNnT/sMw0GLwwdhMuEGxyF05O3jG9kNxue/DFiAtL0eU
FXGQc5YQ25yfI87LGmw0ecL04VRP0TABbVaHI98Tcb9Iq/2mJpCl8pylJT2LLdde
ZBLUPMuGznv4sHE+ovd9zjx2GLCuYzwjbVMLwNJEh3Tg6Wx7192QpIJYmPjXj19z
fYcTV4LMv36yxHZKCoD+gplzsuIokHp0EoxY+p727/f96ihPGAcJ5ShHSRQAHi0h
VWiBSEhog3WsCvrgDAwu+m9aAo+8TKwqHfwldQIDAQABAoIBACALBeklsrTmDwVB
LVEc2x/MSFs4YlIbc3Fd2KkwR08hZyDMCYuFFR84CCU3jPE5Vbsk4USHZXEVVJqh
KQ7ugkFPJwa/Yui/HfoimLf0H3+VQ9ykUkGxEsgEgXEz7FYSvcgXYh1wz36e7ZWa
cQt65auF/TDyNO0RpoMkOS8U7yjPR+R2Lppcj8WpMQoe1ZpJdfPS9QxAq2I351xg
jnMmXiOJQeufTxDQ3YoRvcCOc9gZBR+zTQZkJ8ezIzOQ0htkvajDeEP2+zJ93u0Y
gRoGUa7TCbfdNt7f7htbF2mO/HpXqeDgdMT1e6aDJCl3SrmUSeDCruPoamv/7roU
x57OoMkCgYEA+MTem0AJmZwxavGktrlm+bGpT9FVqn71MKg2CLaSADIok3QvtqrF
DLN0mrz4LsqYKbqfLDP9ZfoO+UgNt/vMxrgIrGK90kb7oplHt1VpRKs0cq1obnPG
UwUcKmvZhJfwExJkIAle8LE78xaFPCDkfnjhXldta64N9tw6PZa4op0CgYEAz/zq
9o9ppGtlZWHitxl6HBwPwUpBPvkVF9sXxj+CITw/63WI/Xk6Qij99DDfAJD2or0B
8mDY9z2u4w0zG67pm9Mz8S+aHOK2M/6EfTIJSKz/+pH8DmwenHaf4Q2dh2Kbm60r
23LAIh4KuTpervrSoe3r7X4JPyPnqg2gRSaeirkCgYA81B6+hY0TY47t4IJvL6yP
V7LX0o8I7pxTtn3n6YSPybQEQj+8gctHDMZxY82n22ATrA9pxpiqi9eHeufn2gk7
ehqc1FQoC7VSD/rqSFdCND7R37cOcv7GpBQ8Bz0b3+8TKscS0lfFsQDAsvwHNN/K
URKCeAxIbTn65+TR1H33PQKBgD0rysNHfK+h8ol116M4eASKcEvOFhB6W6zPgFeL
WC+EM9yBjg/Wtr68paxLL1tQR2mno0nxF/7ngmc++5gZwpVU8cLu2CnEuAfkxHy5
2acpUoQUqYhoXjxwWydqxLkL1G5d6Tc6sa2XHlpKA4z9MjPz8N7BoeCTI9CM/2U3
LYvpAoGAHmG4zMKSKQNx7BqabPdAmc39ptLcYHCjUnKlJqyW91fa+LGsA+cRMcMt
xwHpjyeq8jG6bcdboVzZpFw2f5tzAxDig5JlCpglHP3582pndduTmXtGKrJfKJ5i
8D9FLmYPr+vRQ8WePfUZuwpZzGSuRCkjZwbSNXqoCi8K2MPxN2U=
-----END RSA PRIVATE KEY-----
";

const HOUR: Duration = Duration::from_secs(3600);
const AUD: &str = "gateway-ca";
const POD_UID: &str = "7a0c2d1e-0000-4000-8000-000000000001";

struct Keys {
    rsa: EncodingKey,
    ec: EncodingKey,
    /// Another EC key: same `kid` as `ec`, not the cluster's.
    forger: EncodingKey,
    jwks: Value,
}

fn keys() -> Keys {
    let rsa_der = match PrivateKeyDer::from_pem_slice(RSA_KEY.trim().as_bytes()).unwrap() {
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der().to_vec(),
        _ => unreachable!("an RSA PRIVATE KEY is PKCS#1"),
    };
    let pair = ring::rsa::KeyPair::from_der(&rsa_der).unwrap();
    let (n, e) = rsa_public(pair.public().as_ref());
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = ec.public_key_raw().to_vec();
    let forger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    Keys {
        rsa: EncodingKey::from_rsa_der(&rsa_der),
        ec: EncodingKey::from_ec_der(&ec.serialize_der()),
        forger: EncodingKey::from_ec_der(&forger.serialize_der()),
        jwks: json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256", "n": b64url(&n), "e": b64url(&e)},
            {"kty": "EC", "kid": "ec-1", "use": "sig", "alg": "ES256", "crv": "P-256",
             "x": b64url(&point[1..33]), "y": b64url(&point[33..65])},
        ]}),
    }
}

/// `(n, e)` of a DER `RSAPublicKey` (SEQUENCE { INTEGER n, INTEGER e }), leading zeros off.
fn rsa_public(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn tlv(b: &[u8]) -> (&[u8], &[u8]) {
        let (len, head) = match b[1] {
            l if l < 0x80 => (l as usize, 2),
            l => {
                let k = (l & 0x7f) as usize;
                (
                    b[2..2 + k].iter().fold(0, |a, x| (a << 8) | *x as usize),
                    2 + k,
                )
            }
        };
        (&b[head..head + len], &b[head + len..])
    }
    let (seq, _) = tlv(der);
    let (n, rest) = tlv(seq);
    let (e, _) = tlv(rest);
    let strip = |v: &[u8]| v.iter().skip_while(|b| **b == 0).copied().collect();
    (strip(n), strip(e))
}

/// An OIDC issuer as EKS serves one, and an API server that knows one pod, on one port.
async fn issuer(jwks: Value) -> String {
    let base = Arc::new(std::sync::OnceLock::<String>::new());
    let b = base.clone();
    let url = http_server(Arc::new(move |s: &Seen| {
        let base = b.get().cloned().unwrap_or_default();
        match s.path.as_str() {
            "/.well-known/openid-configuration" => (
                200,
                json!({"issuer": base, "jwks_uri": format!("{base}/openid/v1/jwks"),
                       "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                       "id_token_signing_alg_values_supported": ["RS256", "ES256"]})
                .to_string(),
            ),
            "/openid/v1/jwks" => (200, jwks.to_string()),
            "/api/v1/namespaces/db-gateway/pods/agent-x" => (
                200,
                json!({"kind": "Pod", "apiVersion": "v1",
                       "metadata": {"name": "agent-x", "namespace": "db-gateway", "uid": POD_UID},
                       "spec": {"nodeName": "node-1", "serviceAccountName": "node-agent", "containers": []}})
                .to_string(),
            ),
            _ => (404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string()),
        }
    }))
    .await;
    base.set(url.clone()).unwrap();
    url
}

/// Claims as the API server writes them into a pod-bound projected token.
fn claims(iss: &str, aud: &str, ns: &str, sa: &str, node: Option<&str>, exp_in: i64) -> Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut k = json!({
        "namespace": ns,
        "pod": {"name": "agent-x", "uid": POD_UID},
        "serviceaccount": {"name": sa, "uid": "5b7e0c3a-0000-4000-8000-000000000002"},
    });
    if let Some(n) = node {
        k["node"] = json!({"name": n, "uid": "9d1f0b2c-0000-4000-8000-000000000003"});
    }
    json!({
        "aud": [aud], "iss": iss, "iat": now - 10, "nbf": now - 10, "exp": now + exp_in,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": k,
    })
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn verifier(iss: &str, pod_lookup: Option<::kube::Client>) -> KubeVerifier {
    KubeVerifier::new(
        KeySource::Discovery(iss.to_owned()),
        Some(iss.to_owned()),
        AUD.into(),
        vec!["db-gateway/node-agent".into()],
        pod_lookup,
        Outbound::new(&[], Duration::from_secs(5)),
    )
}

async fn try_join(r: &Running, d: &Dir, node: &str, token: &str) -> Result<String, String> {
    let p = d.0.join(format!("sa-token-{}", rand::random::<u32>()));
    std::fs::write(&p, token).unwrap();
    let c = client(r, node, Prover::Kubernetes(p));
    c.join().await.map(|j| node_of(&j)).map_err(refusal)
}

#[tokio::test]
async fn kubernetes_joins_take_the_node_from_verified_token_claims() {
    let d = dir("kube");
    let k = keys();
    let iss = issuer(k.jwks.clone()).await;
    let r = start(&d, HOUR, None, Some(verifier(&iss, None)), None).await;
    let good = claims(&iss, AUD, "db-gateway", "node-agent", Some("node-1"), 600);

    // RS256 and ES256 tokens of the cluster, for this node: a node certificate each.
    let rs = sign(Algorithm::RS256, "rsa-1", &k.rsa, &good);
    assert_eq!(try_join(&r, &d, "node-1", &rs).await.unwrap(), "node-1");
    let es = sign(Algorithm::ES256, "ec-1", &k.ec, &good);
    assert_eq!(try_join(&r, &d, "node-1", &es).await.unwrap(), "node-1");

    let refused = |e: Result<String, String>| e.unwrap_err();
    // The same token asking for another node.
    assert_eq!(
        refused(try_join(&r, &d, "node-2", &es).await),
        "kubernetes join refused: token is for node \"node-1\", not \"node-2\""
    );
    // Made for another audience (e.g. the API server's own).
    let other_aud = claims(
        &iss,
        "https://kubernetes.default.svc",
        "db-gateway",
        "node-agent",
        Some("node-1"),
        600,
    );
    assert_eq!(
        refused(
            try_join(
                &r,
                &d,
                "node-1",
                &sign(Algorithm::RS256, "rsa-1", &k.rsa, &other_aud)
            )
            .await
        ),
        "kubernetes join refused: token is not for audience \"gateway-ca\""
    );
    // Expired beyond the minute of leeway.
    let old = claims(&iss, AUD, "db-gateway", "node-agent", Some("node-1"), -120);
    assert_eq!(
        refused(
            try_join(
                &r,
                &d,
                "node-1",
                &sign(Algorithm::ES256, "ec-1", &k.ec, &old)
            )
            .await
        ),
        "kubernetes join refused: token has expired"
    );
    // Without node claims (clusters before 1.30), and no pod lookup configured.
    let no_node = claims(&iss, AUD, "db-gateway", "node-agent", None, 600);
    assert_eq!(
        refused(
            try_join(
                &r,
                &d,
                "node-1",
                &sign(Algorithm::RS256, "rsa-1", &k.rsa, &no_node)
            )
            .await
        ),
        "kubernetes join refused: token has no node claims (kubernetes.io.node); the CA is not configured to look the pod up"
    );
    // Signed by a key that is not the cluster's, under the cluster key's id.
    assert_eq!(
        refused(
            try_join(
                &r,
                &d,
                "node-1",
                &sign(Algorithm::ES256, "ec-1", &k.forger, &good)
            )
            .await
        ),
        "kubernetes join refused: token signature does not verify against the cluster's key"
    );
    // A service account outside the allow rules.
    let other_sa = claims(&iss, AUD, "default", "default", Some("node-1"), 600);
    assert_eq!(
        refused(
            try_join(
                &r,
                &d,
                "node-1",
                &sign(Algorithm::ES256, "ec-1", &k.ec, &other_sa)
            )
            .await
        ),
        "kubernetes join refused: service account default/default is not allowed to join"
    );
    // Another issuer's token.
    let foreign = claims(
        "https://elsewhere.example",
        AUD,
        "db-gateway",
        "node-agent",
        Some("node-1"),
        600,
    );
    assert!(
        refused(
            try_join(
                &r,
                &d,
                "node-1",
                &sign(Algorithm::ES256, "ec-1", &k.ec, &foreign)
            )
            .await
        )
        .contains("not from issuer")
    );
    // A key id the cluster never had.
    assert_eq!(
        refused(
            try_join(
                &r,
                &d,
                "node-1",
                &sign(Algorithm::ES256, "ec-9", &k.ec, &good)
            )
            .await
        ),
        "kubernetes join refused: token is signed by key \"ec-9\", which is not in the cluster's key set"
    );
}

#[tokio::test]
async fn a_token_without_node_claims_joins_through_the_pod_lookup_only_on_the_pods_node() {
    let d = dir("kube-pod");
    let k = keys();
    let iss = issuer(k.jwks.clone()).await;
    let api = ::kube::Client::try_from(::kube::Config::new(iss.parse().unwrap())).unwrap();
    let r = start(&d, HOUR, None, Some(verifier(&iss, Some(api))), None).await;
    let no_node = claims(&iss, AUD, "db-gateway", "node-agent", None, 600);
    let t = sign(Algorithm::RS256, "rsa-1", &k.rsa, &no_node);
    assert_eq!(try_join(&r, &d, "node-1", &t).await.unwrap(), "node-1");
    assert_eq!(
        try_join(&r, &d, "node-2", &t).await.unwrap_err(),
        "kubernetes join refused: token is for node \"node-1\", not \"node-2\""
    );
}

/// An API server's `TokenReview` endpoint, checking what the real one checks: the
/// signature against the cluster's keys, expiry, the issuer, the requested audiences, and
/// that the pod the token is bound to still exists (`deleted` turns that off).
async fn token_review_api(jwks: Value, iss: String, deleted: Arc<AtomicBool>) -> String {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
    let set: JwkSet = serde_json::from_value(jwks).unwrap();
    http_server(Arc::new(move |s: &Seen| {
        if s.method != "POST" || !s.path.starts_with("/apis/authentication.k8s.io/v1/tokenreviews")
        {
            return (404, json!({"kind": "Status", "code": 404}).to_string());
        }
        let asked: Value = serde_json::from_slice(&s.body).unwrap();
        let token = asked["spec"]["token"].as_str().unwrap_or_default();
        let audiences: Vec<String> =
            serde_json::from_value(asked["spec"]["audiences"].clone()).unwrap_or_default();
        let checked = (|| {
            let h = decode_header(token).map_err(|e| e.to_string())?;
            let jwk = set
                .find(h.kid.as_deref().unwrap_or_default())
                .ok_or("no such key")?;
            let mut v = Validation::new(h.alg);
            v.set_audience(&audiences);
            v.set_issuer(&[&iss]);
            let c = decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
                .map_err(|e| e.to_string())?
                .claims;
            if deleted.load(Ordering::SeqCst) {
                return Err("service account token has been invalidated".to_owned());
            }
            Ok::<_, String>(c)
        })();
        let status = match checked {
            Err(e) => json!({"user": {}, "error": format!("[invalid bearer token, {e}]")}),
            Ok(c) => {
                let k = &c["kubernetes.io"];
                let mut extra = json!({
                    "authentication.kubernetes.io/credential-id": ["JTI=0b9a1c2d"],
                    "authentication.kubernetes.io/pod-name": [k["pod"]["name"]],
                    "authentication.kubernetes.io/pod-uid": [k["pod"]["uid"]],
                });
                if !k["node"].is_null() {
                    extra["authentication.kubernetes.io/node-name"] = json!([k["node"]["name"]]);
                    extra["authentication.kubernetes.io/node-uid"] = json!([k["node"]["uid"]]);
                }
                json!({
                    "authenticated": true,
                    "user": {
                        "username": c["sub"],
                        "uid": k["serviceaccount"]["uid"],
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", k["namespace"].as_str().unwrap()), "system:authenticated"],
                        "extra": extra,
                    },
                    "audiences": audiences,
                })
            }
        };
        (
            201,
            json!({
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "spec": asked["spec"],
                "status": status,
            })
            .to_string(),
        )
    }))
    .await
}

/// `--join-k8s-token-review`: the API server vouches for the token; the node still comes
/// from the pod binding, and a token whose pod was deleted no longer joins.
#[tokio::test]
async fn token_review_joins_and_refuses_a_deleted_pods_token() {
    let d = dir("kube-review");
    let k = keys();
    let iss = issuer(k.jwks.clone()).await;
    let deleted = Arc::new(AtomicBool::new(false));
    let api = token_review_api(k.jwks.clone(), iss.clone(), deleted.clone()).await;
    let client = ::kube::Client::try_from(::kube::Config::new(api.parse().unwrap())).unwrap();
    let review = KubeVerifier::new(
        KeySource::TokenReview(client),
        None,
        AUD.into(),
        vec!["db-gateway/node-agent".into()],
        None,
        Outbound::new(&[], Duration::from_secs(5)),
    );
    let r = start(&d, HOUR, None, Some(review), None).await;
    let good = claims(&iss, AUD, "db-gateway", "node-agent", Some("node-1"), 600);
    let t = sign(Algorithm::ES256, "ec-1", &k.ec, &good);
    assert_eq!(try_join(&r, &d, "node-1", &t).await.unwrap(), "node-1");
    assert_eq!(
        try_join(&r, &d, "node-2", &t).await.unwrap_err(),
        "kubernetes join refused: token is for node \"node-1\", not \"node-2\""
    );
    let other_sa = claims(&iss, AUD, "default", "default", Some("node-1"), 600);
    assert_eq!(
        try_join(
            &r,
            &d,
            "node-1",
            &sign(Algorithm::ES256, "ec-1", &k.ec, &other_sa)
        )
        .await
        .unwrap_err(),
        "kubernetes join refused: service account default/default is not allowed to join"
    );
    let forged = sign(Algorithm::ES256, "ec-1", &k.forger, &good);
    let e = try_join(&r, &d, "node-1", &forged).await.unwrap_err();
    assert!(
        e.starts_with(
            "kubernetes join refused: the API server rejected the token: [invalid bearer token, "
        ),
        "{e}"
    );
    let other_aud = claims(
        &iss,
        "https://kubernetes.default.svc",
        "db-gateway",
        "node-agent",
        Some("node-1"),
        600,
    );
    let e = try_join(
        &r,
        &d,
        "node-1",
        &sign(Algorithm::RS256, "rsa-1", &k.rsa, &other_aud),
    )
    .await
    .unwrap_err();
    assert!(e.contains("the API server rejected the token"), "{e}");
    // The agent's pod is deleted: its token, still unexpired and well signed, is refused.
    deleted.store(true, Ordering::SeqCst);
    assert_eq!(
        try_join(&r, &d, "node-1", &t).await.unwrap_err(),
        "kubernetes join refused: the API server rejected the token: [invalid bearer token, service account token has been invalidated]"
    );
}
