//! `aws-iam` joins: the node signs an STS `GetCallerIdentity` request with its own AWS
//! credentials (`aws-config`'s chain: the instance profile through IMDSv2 on an EC2 node)
//! and `aws-sigv4`, with a single-use challenge from this CA as a signed header; the CA
//! sends that request to STS itself. STS answers only if the signature is good, and then
//! with the caller's account and ARN. The challenge stops a captured request from being
//! replayed (the CA takes each challenge once; STS would accept a signed request for
//! 15 minutes).
//!
//! What it proves: the holder of the credentials of `<ARN>` in `<account>` asked, now.
//! What it trusts: STS (its endpoint, `--join-aws-sts-endpoint`), the allow rules (accounts,
//! ARN globs), and, for instance-profile ARNs (`assumed-role/<role>/i-…`), the Kubernetes
//! Node's `spec.providerID` to tie the instance to the node name asked for
//! (`--join-aws-node-check`). Without the node check any allowed ARN may join as any node
//! name: for bare hosts with one role per host only.

use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use super::glob_match;
use super::http::Outbound;

/// The only request the CA sends on: the `Query` protocol's `GetCallerIdentity`.
pub const GET_CALLER_IDENTITY_BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The signed header that carries the CA's challenge.
pub const CHALLENGE_HEADER: &str = "x-dbgw-join-challenge";
const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
/// Headers the CA forwards to STS; a request with any other is refused.
const FORWARDED: &[&str] = &[
    "host",
    "content-type",
    "x-amz-date",
    "x-amz-security-token",
    "authorization",
    CHALLENGE_HEADER,
];

#[derive(Debug, thiserror::Error)]
pub enum AwsJoinError {
    #[error("unknown, expired or already used challenge (ask /v1/join/challenge again)")]
    Challenge,
    #[error("the signed request is not the expected GetCallerIdentity: {0}")]
    BadRequest(String),
    #[error("STS refused the signed request: {0}")]
    Sts(String),
    #[error("cannot reach STS: {0}")]
    Unreachable(String),
    #[error("account {0} is not allowed to join")]
    Account(String),
    #[error("{0} matches no allowed ARN")]
    Arn(String),
    #[error("instance {instance} is not node {node}'s ({provider_id})")]
    Instance {
        instance: String,
        node: String,
        provider_id: String,
    },
    #[error(
        "{0} is not an instance-profile ARN (assumed-role/<role>/i-…); the node check needs one"
    )]
    NotAnInstance(String),
    #[error("node lookup: {0}")]
    NodeLookup(String),
}

/// The signed request as the node made it: its headers (name, value) and body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedRequest {
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// `gateway ca serve`'s `aws-iam` join flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AwsJoinOptions {
    /// STS endpoint the CA sends signed requests to (the node signs for its host), e.g.
    /// `https://sts.eu-west-1.amazonaws.com/`. Turns `aws-iam` joins on.
    #[arg(long, env = "GATEWAY_JOIN_AWS_STS_ENDPOINT")]
    pub join_aws_sts_endpoint: Option<String>,
    /// Accounts allowed to join.
    #[arg(long, env = "GATEWAY_JOIN_AWS_ALLOW_ACCOUNT", value_delimiter = ',')]
    pub join_aws_allow_account: Vec<String>,
    /// ARN globs allowed to join (e.g. `arn:aws:sts::123456789012:assumed-role/eks-node-*/*`).
    #[arg(long, env = "GATEWAY_JOIN_AWS_ALLOW_ARN", value_delimiter = ',')]
    pub join_aws_allow_arn: Vec<String>,
    /// Require an instance-profile ARN whose instance id is the asked node's
    /// `spec.providerID` (from the Kubernetes API: in-cluster credentials or `$KUBECONFIG`,
    /// RBAC `nodes/get`).
    #[arg(long, env = "GATEWAY_JOIN_AWS_NODE_CHECK")]
    pub join_aws_node_check: bool,
}

impl AwsJoinOptions {
    pub fn build(&self) -> anyhow::Result<Option<AwsVerifier>> {
        let Some(url) = &self.join_aws_sts_endpoint else {
            return Ok(None);
        };
        anyhow::ensure!(
            !self.join_aws_allow_account.is_empty() && !self.join_aws_allow_arn.is_empty(),
            "aws-iam joins need --join-aws-allow-account and --join-aws-allow-arn"
        );
        let nodes = if self.join_aws_node_check {
            Some(super::kube_client()?)
        } else {
            None
        };
        Ok(Some(AwsVerifier::new(
            url,
            self.join_aws_allow_account.clone(),
            self.join_aws_allow_arn.clone(),
            nodes,
            Outbound::new(&[], Duration::from_secs(10)),
        )?))
    }
}

pub struct AwsVerifier {
    sts_url: String,
    sts_host: String,
    accounts: Vec<String>,
    arns: Vec<String>,
    nodes: Option<kube::Client>,
    http: Outbound,
}

impl AwsVerifier {
    pub fn new(
        sts_url: &str,
        accounts: Vec<String>,
        arns: Vec<String>,
        nodes: Option<kube::Client>,
        http: Outbound,
    ) -> anyhow::Result<Self> {
        let uri: hyper::Uri = sts_url.parse()?;
        let sts_host = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("--join-aws-sts-endpoint {sts_url:?} has no host"))?
            .to_string();
        Ok(Self {
            sts_url: sts_url.to_owned(),
            sts_host,
            accounts,
            arns,
            nodes,
            http,
        })
    }

    /// Sends `req` to STS and checks the caller it names may join as `node_name`. The
    /// caller ([`super::Joins::join`]) has taken `challenge` out already.
    pub async fn verify(
        &self,
        challenge: &str,
        req: &SignedRequest,
        node_name: &str,
    ) -> Result<(), AwsJoinError> {
        let bad = |m: String| AwsJoinError::BadRequest(m);
        if req.body != GET_CALLER_IDENTITY_BODY {
            return Err(bad("the body is not GetCallerIdentity".into()));
        }
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        for (k, _) in &req.headers {
            if !FORWARDED.iter().any(|f| k.eq_ignore_ascii_case(f)) {
                return Err(bad(format!("header {k:?} is not accepted")));
            }
        }
        if header("host") != Some(self.sts_host.as_str()) {
            return Err(bad(format!(
                "signed for host {:?}, not this CA's STS {:?}",
                header("host").unwrap_or(""),
                self.sts_host
            )));
        }
        if header(CHALLENGE_HEADER) != Some(challenge) {
            return Err(bad("the challenge header is not the challenge".into()));
        }
        let signed = header("authorization")
            .and_then(|a| a.split("SignedHeaders=").nth(1))
            .and_then(|s| s.split(',').next())
            .unwrap_or("");
        for must in ["host", CHALLENGE_HEADER] {
            if !signed.split(';').any(|h| h == must) {
                return Err(bad(format!("{must} is not among the signed headers")));
            }
        }
        let (status, body) = self
            .http
            .request(
                Method::POST,
                &self.sts_url,
                &req.headers,
                Bytes::from(req.body.clone()),
            )
            .await
            .map_err(|e| AwsJoinError::Unreachable(e.to_string()))?;
        let text = String::from_utf8_lossy(&body);
        if status != 200 {
            let code = xml_text(&text, "Code").unwrap_or("");
            let message = xml_text(&text, "Message").unwrap_or("");
            return Err(AwsJoinError::Sts(format!(
                "HTTP {status} {code}: {message}"
            )));
        }
        let (Some(arn), Some(account)) = (xml_text(&text, "Arn"), xml_text(&text, "Account"))
        else {
            return Err(AwsJoinError::Sts("no Arn and Account in the answer".into()));
        };
        if !self.accounts.iter().any(|a| a == account) {
            return Err(AwsJoinError::Account(account.to_owned()));
        }
        if !self.arns.iter().any(|g| glob_match(g, arn)) {
            return Err(AwsJoinError::Arn(arn.to_owned()));
        }
        if let Some(client) = &self.nodes {
            let instance =
                instance_of(arn).ok_or_else(|| AwsJoinError::NotAnInstance(arn.to_owned()))?;
            let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
            let node = api
                .get(node_name)
                .await
                .map_err(|e| AwsJoinError::NodeLookup(format!("node {node_name}: {e}")))?;
            let provider_id = node.spec.and_then(|s| s.provider_id).unwrap_or_default();
            // `aws:///<zone>/<instance id>`
            if provider_id.rsplit('/').next() != Some(instance) {
                return Err(AwsJoinError::Instance {
                    instance: instance.to_owned(),
                    node: node_name.to_owned(),
                    provider_id,
                });
            }
        }
        Ok(())
    }
}

/// The instance id of an instance-profile session ARN
/// (`arn:aws:sts::<account>:assumed-role/<role>/i-<hex>`).
pub fn instance_of(arn: &str) -> Option<&str> {
    let rest = arn.split(":assumed-role/").nth(1)?;
    let (_, session) = rest.split_once('/')?;
    let hex = session.strip_prefix("i-")?;
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(session)
}

/// The text of the first `<tag>…</tag>` (the STS answers are flat enough for this).
fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(xml[start..end].trim())
}

/// The node's side: signs `GetCallerIdentity` for the CA's challenge.
pub struct Signer {
    /// The STS endpoint the CA forwards to (the signature covers its host).
    pub sts_url: String,
    pub region: String,
    pub credentials: aws_credential_types::provider::SharedCredentialsProvider,
}

impl Signer {
    /// With `aws-config`'s standard chain (environment, web identity, ECS, IMDSv2, profile).
    pub async fn from_chain(sts_url: String, region: String) -> Self {
        let r = aws_types::region::Region::new(region.clone());
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_config::provider_config::ProviderConfig::default()
            .with_http_client(http)
            .with_region(Some(r.clone()));
        let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
            .region(r)
            .configure(config)
            .build()
            .await;
        Self {
            sts_url,
            region,
            credentials: aws_credential_types::provider::SharedCredentialsProvider::new(chain),
        }
    }

    pub async fn sign(&self, challenge: &str) -> Result<SignedRequest, String> {
        use aws_credential_types::provider::ProvideCredentials;
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        let creds = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| format!("no AWS credentials: {e}"))?;
        let uri: hyper::Uri = self.sts_url.parse().map_err(|e| format!("{e}"))?;
        let host = uri
            .authority()
            .ok_or_else(|| format!("{} has no host", self.sts_url))?
            .to_string();
        let mut headers = vec![
            ("host".to_owned(), host),
            ("content-type".to_owned(), CONTENT_TYPE.to_owned()),
            (CHALLENGE_HEADER.to_owned(), challenge.to_owned()),
        ];
        let identity: aws_smithy_runtime_api::client::identity::Identity = creds.into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("sts")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let signable = SignableRequest::new(
            "POST",
            &self.sts_url,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(GET_CALLER_IDENTITY_BODY.as_bytes()),
        )
        .map_err(|e| e.to_string())?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| e.to_string())?
            .into_parts();
        let (signed_headers, _) = instructions.into_parts();
        for h in signed_headers {
            headers.push((h.name().to_owned(), h.value().to_owned()));
        }
        Ok(SignedRequest {
            headers,
            body: GET_CALLER_IDENTITY_BODY.to_owned(),
        })
    }
}
