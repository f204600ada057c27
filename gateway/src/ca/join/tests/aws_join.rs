//! `aws-iam` joins against a local STS that verifies the SigV4 signature of
//! `GetCallerIdentity` with the test's secrets (as STS does) and answers STS's XML, and a
//! local API server with the Nodes' `spec.providerID`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::super::aws_iam::{AwsVerifier, Signer};
use super::super::client::Prover;
use super::super::http::Outbound;
use super::*;

const HOUR: Duration = Duration::from_secs(3600);
const ACCOUNT: &str = "123456789012";
const REGION: &str = "eu-west-1";

/// Access key id → (secret, ARN, account), as STS knows them.
type Principals = HashMap<&'static str, (&'static str, &'static str, &'static str)>;

fn principals() -> Principals {
    HashMap::from([
        (
            "AKIDNODE1",
            (
                "secret-node-1",
                "arn:aws:sts::123456789012:assumed-role/eks-node/i-0aaa1111",
                ACCOUNT,
            ),
        ),
        (
            "AKIDOTHER",
            (
                "secret-other",
                "arn:aws:sts::999999999999:assumed-role/eks-node/i-0ccc3333",
                "999999999999",
            ),
        ),
        (
            "AKIDALICE",
            (
                "secret-alice",
                "arn:aws:iam::123456789012:user/alice",
                ACCOUNT,
            ),
        ),
    ])
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, data.as_bytes()).as_ref().to_vec()
}

/// STS's check of a header-signed SigV4 request: recomputes the signature from the
/// request as it arrived with the secret of the access key it names, and the time.
fn verify_sigv4(s: &Seen, principals: &Principals) -> Result<&'static str, (&'static str, String)> {
    let h = |n: &str| {
        s.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    let auth =
        h("authorization").ok_or(("MissingAuthenticationToken", "no Authorization".into()))?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or(("IncompleteSignature", "not AWS4-HMAC-SHA256".into()))?;
    let field = |name: &str| {
        rest.split(", ")
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap_or("")
    };
    let (credential, signed, signature) = (
        field("Credential"),
        field("SignedHeaders"),
        field("Signature"),
    );
    let mut scope = credential.splitn(2, '/');
    let (akid, scope) = (scope.next().unwrap_or(""), scope.next().unwrap_or(""));
    let (secret, arn, _) = principals.get(akid).ok_or((
        "InvalidClientTokenId",
        "The security token included in the request is invalid.".into(),
    ))?;
    let date = h("x-amz-date").unwrap_or("");
    let at = time::PrimitiveDateTime::parse(
        date,
        time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
    )
    .map_err(|_| ("IncompleteSignature", "bad X-Amz-Date".to_owned()))?
    .assume_utc();
    let skew = (time::OffsetDateTime::now_utc() - at).abs();
    if skew > time::Duration::minutes(15) {
        return Err(("SignatureDoesNotMatch", "Signature expired".into()));
    }
    let mut canonical = format!("{}\n/\n\n", s.method);
    for name in signed.split(';') {
        canonical.push_str(&format!("{name}:{}\n", h(name).unwrap_or("").trim()));
    }
    canonical.push_str(&format!(
        "\n{signed}\n{}",
        crate::ca::join::hex(&Sha256::digest(&s.body))
    ));
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        crate::ca::join::hex(&Sha256::digest(canonical.as_bytes()))
    );
    let parts: Vec<&str> = scope.split('/').collect();
    let [day, region, service, "aws4_request"] = parts[..] else {
        return Err(("IncompleteSignature", format!("bad scope {scope}")));
    };
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), day);
    for p in [region, service, "aws4_request"] {
        key = hmac(&key, p);
    }
    if crate::ca::join::hex(&hmac(&key, &to_sign)) != signature {
        return Err((
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.".into(),
        ));
    }
    Ok(arn)
}

/// The local STS: `GetCallerIdentity` only, answered as STS answers it.
async fn sts() -> String {
    let principals = principals();
    http_server(Arc::new(move |s: &Seen| {
        if s.method != "POST" || s.body != b"Action=GetCallerIdentity&Version=2011-06-15" {
            return (400, error_xml("InvalidAction", "Could not find operation"));
        }
        match verify_sigv4(s, &principals) {
            Err((code, message)) => (403, error_xml(code, &message)),
            Ok(arn) => {
                let account = arn.split(':').nth(4).unwrap_or("");
                let session = arn.rsplit('/').next().unwrap_or("");
                (
                    200,
                    format!(
                        "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <GetCallerIdentityResult>\n    <Arn>{arn}</Arn>\n    <UserId>AROAEXAMPLE:{session}</UserId>\n    <Account>{account}</Account>\n  </GetCallerIdentityResult>\n  <ResponseMetadata>\n    <RequestId>01234567-89ab-cdef-0123-456789abcdef</RequestId>\n  </ResponseMetadata>\n</GetCallerIdentityResponse>\n"
                    ),
                )
            }
        }
    }))
    .await
}

fn error_xml(code: &str, message: &str) -> String {
    format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n  <Error>\n    <Type>Sender</Type>\n    <Code>{code}</Code>\n    <Message>{message}</Message>\n  </Error>\n  <RequestId>01234567-89ab-cdef-0123-456789abcdef</RequestId>\n</ErrorResponse>\n"
    )
}

/// The API server's Nodes: node-1 is instance i-0aaa1111, node-2 i-0bbb2222.
async fn nodes_api() -> ::kube::Client {
    let url = http_server(Arc::new(|s: &Seen| {
        let node = |name: &str, instance: &str| {
            json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
                   "spec": {"providerID": format!("aws:///eu-west-1a/{instance}")}})
            .to_string()
        };
        match s.path.as_str() {
            "/api/v1/nodes/node-1" => (200, node("node-1", "i-0aaa1111")),
            "/api/v1/nodes/node-2" => (200, node("node-2", "i-0bbb2222")),
            _ => (404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}).to_string()),
        }
    }))
    .await;
    ::kube::Client::try_from(::kube::Config::new(url.parse().unwrap())).unwrap()
}

fn signer(sts_url: &str, akid: &str, secret: &str) -> Signer {
    Signer {
        sts_url: sts_url.to_owned(),
        region: REGION.into(),
        credentials: SharedCredentialsProvider::new(Credentials::new(
            akid, secret, None, None, "test",
        )),
    }
}

#[tokio::test]
async fn aws_iam_joins_are_checked_by_sts_the_allow_rules_and_the_nodes_instance() {
    let d = dir("aws");
    let sts_url = format!("{}/", sts().await);
    let verifier = AwsVerifier::new(
        &sts_url,
        vec![ACCOUNT.into()],
        vec!["arn:aws:sts::123456789012:assumed-role/eks-node/*".into()],
        Some(nodes_api().await),
        Outbound::new(&[], Duration::from_secs(5)),
    )
    .unwrap();
    let r = start(&d, HOUR, None, None, Some(verifier)).await;
    let join = |node: &str, akid: &str, secret: &str| {
        client(&r, node, Prover::AwsIam(signer(&sts_url, akid, secret)))
    };

    // The instance of node-1, with its own credentials.
    let ok = join("node-1", "AKIDNODE1", "secret-node-1")
        .join()
        .await
        .unwrap();
    assert_eq!(node_of(&ok), "node-1");

    let refused = |e| refusal(e);
    // Its credentials asking for another node's name.
    assert_eq!(
        refused(
            join("node-2", "AKIDNODE1", "secret-node-1")
                .join()
                .await
                .unwrap_err()
        ),
        "aws-iam join refused: instance i-0aaa1111 is not node node-2's (aws:///eu-west-1a/i-0bbb2222)"
    );
    // Another account.
    assert_eq!(
        refused(
            join("node-1", "AKIDOTHER", "secret-other")
                .join()
                .await
                .unwrap_err()
        ),
        "aws-iam join refused: account 999999999999 is not allowed to join"
    );
    // An ARN outside the globs.
    assert_eq!(
        refused(
            join("node-1", "AKIDALICE", "secret-alice")
                .join()
                .await
                .unwrap_err()
        ),
        "aws-iam join refused: arn:aws:iam::123456789012:user/alice matches no allowed ARN"
    );
    // Signed with a secret that is not the key's: STS refuses, and so does the CA.
    assert_eq!(
        refused(
            join("node-1", "AKIDNODE1", "guessed")
                .join()
                .await
                .unwrap_err()
        ),
        "aws-iam join refused: STS refused the signed request: HTTP 403 SignatureDoesNotMatch: The request signature we calculated does not match the signature you provided."
    );

    // A captured join replayed: its challenge was taken by the first use.
    let challenge = r.joins.challenges.issue();
    let request = signer(&sts_url, "AKIDNODE1", "secret-node-1")
        .sign(&challenge)
        .await
        .unwrap();
    let csr = || {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    };
    let captured = |csr: String| JoinRequest {
        node_name: "node-1".into(),
        csr,
        proof: Proof::AwsIam {
            challenge: challenge.clone(),
            request: request.clone(),
        },
    };
    r.joins.join(&captured(csr()), None).await.unwrap();
    let replay = r.joins.join(&captured(csr()), None).await.unwrap_err();
    assert_eq!(
        replay.to_string(),
        "aws-iam join refused: unknown, expired or already used challenge (ask /v1/join/challenge again)"
    );
    // A challenge of its own making, or one signed into another request, is no better.
    let other = r.joins.challenges.issue();
    let swapped = JoinRequest {
        node_name: "node-1".into(),
        csr: csr(),
        proof: Proof::AwsIam {
            challenge: other,
            request: request.clone(),
        },
    };
    assert!(
        r.joins
            .join(&swapped, None)
            .await
            .unwrap_err()
            .to_string()
            .contains("the challenge header is not the challenge")
    );
}

/// A Service in front of CA replicas: each connection to the next replica, round robin.
async fn round_robin(replicas: [std::net::SocketAddr; 2]) -> std::net::SocketAddr {
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = service.local_addr().unwrap();
    tokio::spawn(async move {
        for i in 0usize.. {
            let (mut client, _) = service.accept().await.unwrap();
            let replica = replicas[i % replicas.len()];
            tokio::spawn(async move {
                let mut ca = tokio::net::TcpStream::connect(replica).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut ca).await;
            });
        }
    });
    addr
}

/// Two CA replicas behind a Service, each with challenges of its own (nothing shared):
/// every join succeeds, because a node asks for its challenge and joins on one
/// connection, so the replica that issued the challenge is the one that checks it.
#[tokio::test]
async fn aws_iam_joins_through_two_replicas_behind_a_service() {
    let d = dir("aws-replicas");
    let sts_url = format!("{}/", sts().await);
    let verifier = || {
        AwsVerifier::new(
            &sts_url,
            vec![ACCOUNT.into()],
            vec!["arn:aws:sts::123456789012:assumed-role/eks-node/*".into()],
            None,
            Outbound::new(&[], Duration::from_secs(5)),
        )
        .unwrap()
    };
    let r0 = start(&d, HOUR, None, None, Some(verifier())).await;
    let r1 = start(&d, HOUR, None, None, Some(verifier())).await;
    let service = round_robin([r0.addr, r1.addr]).await;
    for _ in 0..4 {
        let mut node = client(
            &r0,
            "node-1",
            Prover::AwsIam(signer(&sts_url, "AKIDNODE1", "secret-node-1")),
        );
        node.addr = service.to_string();
        assert_eq!(node_of(&node.join().await.unwrap()), "node-1");
    }
}
