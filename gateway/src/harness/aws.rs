//! Local AWS credential endpoints that speak the real wire formats, for the credential
//! provider chain of `aws-config` to fetch from: STS `AssumeRoleWithWebIdentity` (IRSA,
//! reached through `AWS_ENDPOINT_URL_STS`), the container credentials endpoint (EKS Pod
//! Identity and ECS, `AWS_CONTAINER_CREDENTIALS_FULL_URI`) and the EC2 instance metadata
//! service in its IMDSv2 form (`AWS_EC2_METADATA_SERVICE_ENDPOINT`). Each checks what the
//! real one checks of the caller (the projected service-account token; IMDSv2's session
//! token from `PUT /latest/api/token` on every read), hands out fresh temporary
//! credentials and records them in [`AwsKeys`], where [`super::rds`] verifies signatures.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use rand::Rng;

use super::rds::{AwsKey, AwsKeys};

/// The account the endpoints' credentials belong to.
pub const ACCOUNT_ID: &str = "123456789012";

/// One endpoint on `127.0.0.1:0`, served on a thread of its own.
pub struct CredentialEndpoint {
    pub addr: SocketAddr,
    /// Requests that got credentials.
    pub issued: Arc<AtomicUsize>,
    /// Requests refused (wrong token, `failing`).
    pub refused: Arc<AtomicUsize>,
    /// While set, every request fails with a 500, like an endpoint that is down.
    pub failing: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Issuer {
    keys: AwsKeys,
    /// What the caller must present: the projected token's contents.
    token: String,
    role_arn: String,
    lifetime: Duration,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
    /// IMDSv2 session tokens handed out by `PUT /latest/api/token`.
    imds_sessions: Arc<Mutex<HashSet<String>>>,
}

/// Which service an endpoint plays.
#[derive(Clone, Copy)]
enum Kind {
    Sts,
    Container,
    Imds,
}

/// The IMDSv2 header that asks for a session token (its value: the token's life in seconds).
const IMDS_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The IMDSv2 header every read must carry.
const IMDS_TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Where IMDS lists the instance profile's role, and serves its credentials below.
const IMDS_CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

impl Issuer {
    /// New temporary credentials, known to IAM from now on.
    fn issue(&self) -> (String, AwsKey) {
        let akid = format!("ASIA{}", random(16).to_uppercase());
        let key = AwsKey {
            secret: random(40),
            session_token: Some(format!("IQoJ{}/+=", random(60))),
            expires: Some(SystemTime::now() + self.lifetime),
        };
        self.keys.insert(&akid, key.clone());
        self.issued.fetch_add(1, Ordering::SeqCst);
        (akid, key)
    }

    fn refuse(&self, status: StatusCode, body: String) -> Response<Full<Bytes>> {
        self.refused.fetch_add(1, Ordering::SeqCst);
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    }

    /// STS `AssumeRoleWithWebIdentity` (Query protocol: a form POST, an XML answer).
    async fn sts(self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if self.failing.load(Ordering::SeqCst) {
            return self.refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                sts_error("InternalFailure", "down"),
            );
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return self.refuse(StatusCode::BAD_REQUEST, String::new()),
        };
        let form: Vec<(String, String)> = form_urlencoded(&body);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if get("Action") != Some("AssumeRoleWithWebIdentity")
            || get("Version") != Some("2011-06-15")
        {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                sts_error("InvalidAction", "unknown action"),
            );
        }
        if get("RoleArn") != Some(self.role_arn.as_str())
            || get("RoleSessionName").is_none_or(str::is_empty)
        {
            return self.refuse(
                StatusCode::FORBIDDEN,
                sts_error(
                    "AccessDenied",
                    "Not authorized to perform sts:AssumeRoleWithWebIdentity",
                ),
            );
        }
        if get("WebIdentityToken") != Some(self.token.as_str()) {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                sts_error("InvalidIdentityToken", "Couldn't verify the token"),
            );
        }
        let (akid, key) = self.issue();
        let session = get("RoleSessionName").unwrap_or_default();
        let xml = format!(
            r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:db-gateway:proxy</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::{ACCOUNT_ID}:assumed-role/db-gateway-proxy/{session}</Arn>
      <AssumedRoleId>AROA3XFRBF535PLBIFPI4:{session}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>{}</SessionToken>
      <SecretAccessKey>{}</SecretAccessKey>
      <Expiration>{}</Expiration>
      <AccessKeyId>{akid}</AccessKeyId>
    </Credentials>
    <SourceIdentity></SourceIdentity>
    <Provider>arn:aws:iam::{ACCOUNT_ID}:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/TEST</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#,
            key.session_token.unwrap_or_default(),
            key.secret,
            rfc3339(key.expires),
        );
        let mut r = Response::new(Full::new(Bytes::from(xml)));
        r.headers_mut()
            .insert("content-type", "text/xml".parse().expect("header"));
        r
    }

    /// The container credentials endpoint: `GET` with the token in `Authorization`.
    async fn container(self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if self.failing.load(Ordering::SeqCst) {
            return self.refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"Message":"down"}"#.into(),
            );
        }
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if req.method() != hyper::Method::GET || auth != Some(self.token.as_str()) {
            return self.refuse(
                StatusCode::UNAUTHORIZED,
                r#"{"Message":"invalid token"}"#.into(),
            );
        }
        let (akid, key) = self.issue();
        let json = serde_json::json!({
            "AccessKeyId": akid,
            "SecretAccessKey": key.secret,
            "Token": key.session_token,
            "AccountId": ACCOUNT_ID,
            "Expiration": rfc3339(key.expires),
        });
        Response::new(Full::new(Bytes::from(json.to_string())))
    }
}

impl Issuer {
    /// EC2's instance metadata service, IMDSv2 only: `PUT /latest/api/token` with a TTL
    /// header gives a session token; every `GET` must carry one (else 401, as IMDS with
    /// `HttpTokens: required`); the role name, then its credentials, under
    /// `/latest/meta-data/iam/security-credentials/`. `role_arn` holds the role's name.
    async fn imds(self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if self.failing.load(Ordering::SeqCst) {
            return self.refuse(StatusCode::INTERNAL_SERVER_ERROR, String::new());
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let path = req.uri().path().to_owned();
        if req.method() == hyper::Method::PUT && path == "/latest/api/token" {
            // IMDS refuses token requests that went through a proxy, and TTLs outside 1 s to 6 h.
            let ttl = header(IMDS_TTL_HEADER).and_then(|v| v.parse::<u64>().ok());
            let Some(ttl) = ttl.filter(|t| (1..=21_600).contains(t)) else {
                return self.refuse(StatusCode::BAD_REQUEST, String::new());
            };
            if header("x-forwarded-for").is_some() {
                return self.refuse(StatusCode::FORBIDDEN, String::new());
            }
            let token = random(56);
            self.imds_sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(token.clone());
            let mut r = Response::new(Full::new(Bytes::from(token)));
            r.headers_mut()
                .insert(IMDS_TTL_HEADER, ttl.to_string().parse().expect("header"));
            return r;
        }
        let known = header(IMDS_TOKEN_HEADER).is_some_and(|t| {
            self.imds_sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&t)
        });
        if req.method() != hyper::Method::GET || !known {
            return self.refuse(StatusCode::UNAUTHORIZED, String::new());
        }
        match path.strip_prefix(IMDS_CREDENTIALS_PATH) {
            Some("") => Response::new(Full::new(Bytes::from(self.role_arn.clone()))),
            Some(role) if role == self.role_arn => {
                let (akid, key) = self.issue();
                let json = serde_json::json!({
                    "Code": "Success",
                    "LastUpdated": rfc3339(None),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": akid,
                    "SecretAccessKey": key.secret,
                    "Token": key.session_token,
                    "Expiration": rfc3339(key.expires),
                });
                Response::new(Full::new(Bytes::from(json.to_string())))
            }
            _ => self.refuse(StatusCode::NOT_FOUND, String::new()),
        }
    }
}

impl CredentialEndpoint {
    /// STS for IRSA: `AssumeRoleWithWebIdentity` for `role_arn` with `jwt` as the web
    /// identity token. Point `AWS_ENDPOINT_URL_STS` at [`Self::url`].
    pub fn sts(keys: AwsKeys, role_arn: &str, jwt: &str, lifetime: Duration) -> Result<Self> {
        Self::start(keys, role_arn, jwt, lifetime, Kind::Sts)
    }

    /// EC2's instance metadata service (IMDSv2) with an instance profile whose role is
    /// `role_name`. Point `AWS_EC2_METADATA_SERVICE_ENDPOINT` at [`Self::url`] (`""`).
    pub fn imds(keys: AwsKeys, role_name: &str, lifetime: Duration) -> Result<Self> {
        Self::start(keys, role_name, "", lifetime, Kind::Imds)
    }

    /// The container credentials endpoint (EKS Pod Identity agent, ECS): `token` is what
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` holds.
    pub fn container(keys: AwsKeys, token: &str, lifetime: Duration) -> Result<Self> {
        Self::start(keys, "", token, lifetime, Kind::Container)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn start(
        keys: AwsKeys,
        role_arn: &str,
        token: &str,
        lifetime: Duration,
        kind: Kind,
    ) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let issuer = Issuer {
            keys,
            token: token.to_owned(),
            role_arn: role_arn.to_owned(),
            lifetime,
            issued: Arc::default(),
            refused: Arc::default(),
            failing: Arc::default(),
            imds_sessions: Arc::default(),
        };
        let endpoint = CredentialEndpoint {
            addr,
            issued: issuer.issued.clone(),
            refused: issuer.refused.clone(),
            failing: issuer.failing.clone(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("aws-endpoint".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    while let Ok((tcp, _)) = listener.accept().await {
                        let issuer = issuer.clone();
                        let service = hyper::service::service_fn(move |req| {
                            let issuer = issuer.clone();
                            async move {
                                Ok::<_, Infallible>(match kind {
                                    Kind::Container => issuer.container(req).await,
                                    Kind::Sts => issuer.sts(req).await,
                                    Kind::Imds => issuer.imds(req).await,
                                })
                            }
                        });
                        tokio::spawn(async move {
                            let io = hyper_util::rt::TokioIo::new(tcp);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        });
                    }
                })
            })?;
        Ok(endpoint)
    }
}

fn sts_error(code: &str, message: &str) -> String {
    format!(
        r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>0</RequestId></ErrorResponse>"#
    )
}

fn rfc3339(t: Option<SystemTime>) -> String {
    humantime::format_rfc3339_seconds(t.unwrap_or_else(SystemTime::now)).to_string()
}

fn random(n: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// `application/x-www-form-urlencoded` pairs (`+` is a space).
fn form_urlencoded(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    let dec = |s: &str| {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match (
                b[i],
                s.get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok()),
            ) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    text.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (dec(k), dec(v)))
        .collect()
}
