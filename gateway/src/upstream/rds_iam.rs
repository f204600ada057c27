//! Amazon RDS IAM authentication tokens (`auth: rds-iam`): what the AWS SDKs'
//! `generate_db_auth_token` makes, byte for byte — a SigV4 query-string presigned
//! `GET https://<host>:<port>/?Action=connect&DBUser=<user>` for the service `rds-db`, valid
//! 15 minutes, without the scheme. RDS takes it as the cleartext password of the login.
//!
//! Why the SDK's own parts: the signature is checked by RDS, so the canonical request must
//! be exactly the SDK's (`aws-sigv4`), and credentials come from the standard provider chain
//! of `aws-config` (environment, web identity / IRSA, EKS Pod Identity and ECS container
//! credentials, IMDSv2, shared profile), never from a provider of our own.
//!
//! The chain runs on a thread of its own with its own runtime: its HTTP client keeps
//! connections per runtime, and the proxy's runtimes are one per core.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_types::region::Region;

use crate::config::{
    AWS_CREDENTIALS_RETRY_AFTER, AWS_CREDENTIALS_TIMEOUT, RDS_TOKEN_LIFETIME,
    RDS_TOKEN_REFRESH_BEFORE,
};
use crate::telemetry::proxy::{AWS_CREDENTIAL_FAILURES_TOTAL, RDS_TOKENS_SIGNED_TOTAL};

/// The SigV4 service name of RDS IAM authentication.
pub const SERVICE: &str = "rds-db";

#[derive(Debug, Clone, thiserror::Error)]
pub enum RdsIamError {
    /// The provider chain gave no credentials (none configured, STS or the container
    /// endpoint refused or unreachable). The text is the SDK's and holds no secret.
    #[error("no AWS credentials: {0}")]
    Credentials(String),
    #[error("cannot sign an RDS IAM token: {0}")]
    Sign(String),
}

/// What one token is for: RDS checks every part of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub region: String,
}

/// The token `generate_db_auth_token` makes for `key` with `creds` at `at`.
///
/// The user name is percent-encoded as botocore does (everything but `A-Z a-z 0-9 - _ . ~`);
/// `aws-sigv4` then adds the `X-Amz-*` parameters in the SDKs' order and the signature.
pub fn sign_token(
    key: &TokenKey,
    creds: &Credentials,
    at: SystemTime,
) -> Result<String, RdsIamError> {
    const SCHEME: &str = "https://";
    let url = format!(
        "{SCHEME}{}:{}/?Action=connect&DBUser={}",
        key.host,
        key.port,
        percent_encode(&key.user)
    );
    let identity: Identity = creds.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(RDS_TOKEN_LIFETIME);
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&key.region)
        .name(SERVICE)
        .time(at)
        .settings(settings)
        .build()
        .map_err(|e| RdsIamError::Sign(e.to_string()))?
        .into();
    let signable = SignableRequest::new("GET", &url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| RdsIamError::Sign(e.to_string()))?;
    let (_headers, query) = sign(signable, &params)
        .map_err(|e| RdsIamError::Sign(e.to_string()))?
        .into_parts()
        .0
        .into_parts();
    // botocore writes the signature last, after the session token; aws-sigv4 hands the
    // session token after the signature. The signed bytes are the same either way, the
    // order is botocore's.
    let (signature, rest): (Vec<_>, Vec<_>) = query
        .into_iter()
        .partition(|(name, _)| *name == "X-Amz-Signature");
    let mut token = url
        .strip_prefix(SCHEME)
        .ok_or_else(|| RdsIamError::Sign(format!("URL without {SCHEME}")))?
        .to_owned();
    for (name, value) in rest.into_iter().chain(signature) {
        token.push('&');
        token.push_str(name);
        token.push('=');
        token.push_str(&percent_encode(&value));
    }
    Ok(token)
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, as botocore's
/// `percent_encode` (and SigV4's canonical query string) does.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// When something valid from `from` until `expires` is replaced: [`RDS_TOKEN_REFRESH_BEFORE`]
/// before it expires, or halfway when its whole life is shorter than twice that.
fn renew_at(from: SystemTime, expires: SystemTime) -> SystemTime {
    let life = expires.duration_since(from).unwrap_or(Duration::ZERO);
    expires - RDS_TOKEN_REFRESH_BEFORE.min(life / 2)
}

struct CachedToken {
    token: Arc<str>,
    renew_at: SystemTime,
}

#[derive(Default)]
struct CredentialState {
    last: Option<CachedCredentials>,
    /// The last failure and when: within [`AWS_CREDENTIALS_RETRY_AFTER`] it is the answer,
    /// so an STS outage does not hold every new session for the chain's retries.
    failed: Option<(Instant, RdsIamError)>,
}

struct CachedCredentials {
    creds: Credentials,
    renew_at: Option<SystemTime>,
}

/// The proxy's tokens: the provider chain on its own thread, the last credentials, and one
/// token per [`TokenKey`], each replaced well before it (or its credentials) expires.
pub struct RdsTokens {
    provider: SharedCredentialsProvider,
    runtime: tokio::runtime::Handle,
    credentials: tokio::sync::Mutex<CredentialState>,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
}

impl RdsTokens {
    /// Starts the standard credential provider chain on a thread of its own. `region` is
    /// where STS is asked for web identity credentials when `AWS_REGION` does not say.
    pub fn start(region: &str) -> Result<Self, RdsIamError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RdsIamError::Credentials(format!("cannot start a runtime: {e}")))?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("aws-credentials".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .map_err(|e| RdsIamError::Credentials(format!("cannot start a thread: {e}")))?;
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|_| region.to_owned());
        // Built on its own runtime (it may read profile files there); waited for here, once,
        // at start-up.
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let _ = tx.send(default_chain(Region::new(region)).await);
        });
        let provider = rx
            .recv()
            .map_err(|_| RdsIamError::Credentials("the provider chain did not start".into()))?;
        Ok(Self {
            provider,
            runtime: handle,
            credentials: tokio::sync::Mutex::new(CredentialState::default()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// A token for `key`: the cached one while it is fresh, else a new one signed now.
    pub async fn token(&self, key: &TokenKey) -> Result<Arc<str>, RdsIamError> {
        let now = SystemTime::now();
        if let Some(t) = self.lock_tokens().get(key)
            && now < t.renew_at
        {
            return Ok(t.token.clone());
        }
        let creds = self.credentials().await?;
        let token: Arc<str> = sign_token(key, &creds, now)?.into();
        let mut expires = now + RDS_TOKEN_LIFETIME;
        if let Some(e) = creds.expiry() {
            expires = expires.min(e);
        }
        metrics::counter!(RDS_TOKENS_SIGNED_TOTAL).increment(1);
        tracing::debug!(host = %key.host, port = key.port, user = %key.user, region = %key.region, access_key_id = %creds.access_key_id(), "signed an RDS IAM token");
        self.lock_tokens().insert(
            key.clone(),
            CachedToken {
                token: token.clone(),
                renew_at: renew_at(now, expires),
            },
        );
        Ok(token)
    }

    /// The current credentials, asking the chain (one caller at a time) when the last
    /// ones are due for renewal. A failure is logged and counted; for
    /// [`AWS_CREDENTIALS_RETRY_AFTER`] it stands without asking again, and the last
    /// credentials serve as long as they have not expired.
    pub async fn credentials(&self) -> Result<Credentials, RdsIamError> {
        let mut state = self.credentials.lock().await;
        let now = SystemTime::now();
        // Credentials that have not expired yet still sign valid tokens.
        let usable = |state: &CredentialState| {
            state
                .last
                .as_ref()
                .filter(|c| c.creds.expiry().is_none_or(|x| now < x))
                .map(|c| c.creds.clone())
        };
        if let Some(c) = state.last.as_ref()
            && c.renew_at.is_none_or(|r| now < r)
        {
            return Ok(c.creds.clone());
        }
        if let Some((at, e)) = &state.failed
            && at.elapsed() < AWS_CREDENTIALS_RETRY_AFTER
        {
            return usable(&state).ok_or_else(|| e.clone());
        }
        let provider = self.provider.clone();
        let ask = self
            .runtime
            .spawn(async move { provider.provide_credentials().await });
        let result = match tokio::time::timeout(AWS_CREDENTIALS_TIMEOUT, ask).await {
            Ok(Ok(Ok(creds))) => Ok(creds),
            Ok(Ok(Err(e))) => Err(RdsIamError::Credentials(error_chain(&e))),
            Ok(Err(e)) => Err(RdsIamError::Credentials(e.to_string())),
            Err(_) => Err(RdsIamError::Credentials(format!(
                "the provider chain did not answer within {AWS_CREDENTIALS_TIMEOUT:?}"
            ))),
        };
        match result {
            Ok(creds) => {
                tracing::info!(access_key_id = %creds.access_key_id(), expires = ?creds.expiry().map(humantime::format_rfc3339_seconds), "got AWS credentials");
                state.last = Some(CachedCredentials {
                    renew_at: creds.expiry().map(|e| renew_at(now, e)),
                    creds: creds.clone(),
                });
                state.failed = None;
                Ok(creds)
            }
            Err(e) => {
                metrics::counter!(AWS_CREDENTIAL_FAILURES_TOTAL).increment(1);
                tracing::warn!(error = %e, "AWS credential refresh failed");
                state.failed = Some((Instant::now(), e.clone()));
                usable(&state).ok_or(e)
            }
        }
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<TokenKey, CachedToken>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The SDK's error with its sources, which is where the reason is (e.g. "STS returned
/// AccessDenied"), on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The standard chain of `aws-config`, with the SDK's HTTPS client on rustls and ring.
async fn default_chain(region: Region) -> SharedCredentialsProvider {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_config::provider_config::ProviderConfig::default()
        .with_http_client(http)
        .with_region(Some(region.clone()));
    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(region)
        .configure(config)
        .build()
        .await;
    SharedCredentialsProvider::new(chain)
}

/// `gateway aws rds-token`: the proxy's signing, once, with credentials from the same chain.
pub fn cli_token(key: &TokenKey, at: Option<SystemTime>) -> Result<String, RdsIamError> {
    let tokens = RdsTokens::start(&key.region)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RdsIamError::Credentials(format!("cannot start a runtime: {e}")))?;
    match at {
        None => rt.block_on(tokens.token(key)).map(|t| t.to_string()),
        Some(at) => {
            let creds = rt.block_on(tokens.credentials())?;
            sign_token(key, &creds, at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_encoded_like_botocore() {
        assert_eq!(percent_encode("app"), "app");
        assert_eq!(
            percent_encode("a b+c/d=é&x?y~z_-."),
            "a%20b%2Bc%2Fd%3D%C3%A9%26x%3Fy~z_-."
        );
        assert_eq!(percent_encode("gavin@x.com"), "gavin%40x.com");
    }

    #[test]
    fn tokens_renew_well_before_expiry() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // A full token: replaced with 5 minutes left.
        assert_eq!(
            renew_at(t0, t0 + RDS_TOKEN_LIFETIME),
            t0 + Duration::from_secs(600)
        );
        // Credentials with 40 s left: replaced halfway.
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(40)),
            t0 + Duration::from_secs(20)
        );
        // Already expired: at once.
        assert_eq!(
            renew_at(t0, t0 - Duration::from_secs(1)),
            t0 - Duration::from_secs(1)
        );
    }

    #[test]
    fn signs_the_documented_shape() {
        let key = TokenKey {
            host: "db.example.com".into(),
            port: 5432,
            user: "app".into(),
            region: "us-east-1".into(),
        };
        let creds = Credentials::new("AKID", "secret", None, None, "test");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045);
        let t = sign_token(&key, &creds, at).unwrap();
        assert!(
            t.starts_with("db.example.com:5432/?Action=connect&DBUser=app&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20260102%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20260102T030405Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature="),
            "{t}"
        );
        assert!(!t.contains("secret"), "{t}");
    }
}
