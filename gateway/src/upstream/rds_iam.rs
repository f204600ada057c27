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
    signed_at: SystemTime,
    renew_at: SystemTime,
    /// The last login that took it: only recently used keys are refreshed ahead of time.
    last_used: Instant,
}

/// The background refresh of tokens: keys a login used recently get their next token
/// signed before the cached one is due, so a session does not wait for the signing (nor,
/// when the credentials are due too, for STS or the container endpoint).
#[derive(Debug, Clone, Copy)]
pub struct Refresh {
    /// How often the cache is looked through.
    pub tick: Duration,
    /// A token is replaced this long before its renewal time (at most half the time from
    /// its signing to its renewal, so short-lived credentials do not cause a re-signing
    /// at every tick).
    pub ahead: Duration,
    /// Keys no login used within this long are left to expire, then forgotten.
    pub recent: Duration,
}

/// The proxy's refresh: every 5 s, a minute ahead, for keys used within a token's life.
pub const REFRESH: Refresh = Refresh {
    tick: Duration::from_secs(5),
    ahead: Duration::from_secs(60),
    recent: RDS_TOKEN_LIFETIME,
};

/// The keys due for a background refresh at `now`, each with how far ahead of its renewal
/// it is refreshed (credentials due within that are renewed too), and the keys to forget
/// (not used recently and past their renewal).
fn due(
    tokens: &HashMap<TokenKey, CachedToken>,
    now: SystemTime,
    now_mono: Instant,
    r: &Refresh,
) -> (Vec<(TokenKey, Duration)>, Vec<TokenKey>) {
    let (mut refresh, mut forget) = (Vec::new(), Vec::new());
    for (key, t) in tokens {
        if now_mono.saturating_duration_since(t.last_used) > r.recent {
            if now >= t.renew_at {
                forget.push(key.clone());
            }
            continue;
        }
        let span = t.renew_at.duration_since(t.signed_at).unwrap_or_default();
        let ahead = r.ahead.min(span / 2);
        if now + ahead >= t.renew_at {
            refresh.push((key.clone(), ahead));
        }
    }
    (refresh, forget)
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
/// token per [`TokenKey`], each replaced well before it (or its credentials) expires, in
/// the background for keys in use ([`Refresh`]).
pub struct RdsTokens {
    inner: Arc<Inner>,
}

struct Inner {
    provider: SharedCredentialsProvider,
    runtime: tokio::runtime::Handle,
    credentials: tokio::sync::Mutex<CredentialState>,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
}

/// A runtime on a thread of its own, for the provider chain and the background refresh.
fn own_runtime() -> Result<tokio::runtime::Handle, RdsIamError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RdsIamError::Credentials(format!("cannot start a runtime: {e}")))?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("aws-credentials".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .map_err(|e| RdsIamError::Credentials(format!("cannot start a thread: {e}")))?;
    Ok(handle)
}

impl RdsTokens {
    /// Starts the standard credential provider chain on a thread of its own. `region` is
    /// where STS is asked for web identity credentials when `AWS_REGION` does not say.
    pub fn start(region: &str) -> Result<Self, RdsIamError> {
        let handle = own_runtime()?;
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
        Ok(Self::with_provider(provider, handle, REFRESH))
    }

    /// Tokens from `provider`, refreshed in the background on `runtime` as `refresh` says
    /// until this value is dropped.
    fn with_provider(
        provider: SharedCredentialsProvider,
        runtime: tokio::runtime::Handle,
        refresh: Refresh,
    ) -> Self {
        let inner = Arc::new(Inner {
            provider,
            runtime: runtime.clone(),
            credentials: tokio::sync::Mutex::new(CredentialState::default()),
            tokens: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&inner);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(refresh.tick).await;
                let Some(inner) = weak.upgrade() else { return };
                inner.refresh_due(&refresh).await;
            }
        });
        Self { inner }
    }

    /// A token for `key`: the cached one while it is fresh, else a new one signed now.
    pub async fn token(&self, key: &TokenKey) -> Result<Arc<str>, RdsIamError> {
        if let Some(t) = self.inner.lock_tokens().get_mut(key)
            && SystemTime::now() < t.renew_at
        {
            t.last_used = Instant::now();
            return Ok(t.token.clone());
        }
        self.inner.sign(key, Duration::ZERO).await
    }

    /// The current credentials (see [`Inner::credentials`]).
    pub async fn credentials(&self) -> Result<Credentials, RdsIamError> {
        Ok(self.inner.credentials(Duration::ZERO).await?.0)
    }
}

impl Inner {
    /// Signs a new token for `key` now and caches it, with credentials renewed first when
    /// they are due within `ahead`. The token is due when they are: a token never outlives
    /// the renewal of the credentials that signed it.
    async fn sign(&self, key: &TokenKey, ahead: Duration) -> Result<Arc<str>, RdsIamError> {
        let (creds, creds_renew_at) = self.credentials(ahead).await?;
        let now = SystemTime::now();
        let token: Arc<str> = sign_token(key, &creds, now)?.into();
        let mut expires = now + RDS_TOKEN_LIFETIME;
        if let Some(e) = creds.expiry() {
            expires = expires.min(e);
        }
        metrics::counter!(RDS_TOKENS_SIGNED_TOTAL).increment(1);
        tracing::debug!(host = %key.host, port = key.port, user = %key.user, region = %key.region, access_key_id = %creds.access_key_id(), "signed an RDS IAM token");
        let mut tokens = self.lock_tokens();
        let last_used = tokens.get(key).map_or_else(Instant::now, |t| t.last_used);
        tokens.insert(
            key.clone(),
            CachedToken {
                token: token.clone(),
                signed_at: now,
                renew_at: creds_renew_at
                    .map_or(renew_at(now, expires), |r| r.min(renew_at(now, expires))),
                last_used,
            },
        );
        Ok(token)
    }

    /// One pass of the background refresh: re-signs the due tokens (a failure leaves the
    /// cached token; the credential failure is logged and counted where it happens) and
    /// forgets the unused ones.
    async fn refresh_due(&self, r: &Refresh) {
        let (refresh, forget) = {
            let mut tokens = self.lock_tokens();
            let (refresh, forget) = due(&tokens, SystemTime::now(), Instant::now(), r);
            for k in &forget {
                tokens.remove(k);
            }
            (refresh, forget)
        };
        if !forget.is_empty() {
            tracing::debug!(keys = forget.len(), "forgot RDS IAM tokens no login used");
        }
        for (key, ahead) in refresh {
            if let Err(e) = self.sign(&key, ahead).await {
                tracing::debug!(host = %key.host, user = %key.user, error = %e, "background RDS IAM token refresh failed");
            }
        }
    }

    /// The current credentials and when they are due for renewal, asking the chain (one
    /// caller at a time) when the last ones are due within `ahead` (zero for a session, a
    /// little more for the background refresh, so a session does not wait for STS). A
    /// failure is logged and counted; for [`AWS_CREDENTIALS_RETRY_AFTER`] it stands without
    /// asking again, and the last credentials serve as long as they have not expired.
    async fn credentials(
        &self,
        ahead: Duration,
    ) -> Result<(Credentials, Option<SystemTime>), RdsIamError> {
        let mut state = self.credentials.lock().await;
        let now = SystemTime::now();
        // Credentials that have not expired yet still sign valid tokens.
        let usable = |state: &CredentialState| {
            state
                .last
                .as_ref()
                .filter(|c| c.creds.expiry().is_none_or(|x| now < x))
                .map(|c| (c.creds.clone(), c.renew_at))
        };
        if let Some(c) = state.last.as_ref()
            && c.renew_at.is_none_or(|r| now + ahead < r)
        {
            return Ok((c.creds.clone(), c.renew_at));
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
                let renew = creds.expiry().map(|e| renew_at(now, e));
                state.last = Some(CachedCredentials {
                    renew_at: renew,
                    creds: creds.clone(),
                });
                state.failed = None;
                Ok((creds, renew))
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

    fn cached(tokens: &RdsTokens, key: &TokenKey) -> Option<Arc<str>> {
        tokens.inner.lock_tokens().get(key).map(|t| t.token.clone())
    }

    fn test_key(user: &str) -> TokenKey {
        TokenKey {
            host: "db.example.com".into(),
            port: 5432,
            user: user.into(),
            region: "us-east-1".into(),
        }
    }

    /// A key in use gets its next token before the cached one is due, so the next login
    /// takes it from the cache; a key nobody used recently is not refreshed, and is
    /// forgotten once due.
    #[tokio::test]
    async fn tokens_in_use_are_refreshed_ahead_of_time_in_the_background() {
        // Credentials with 4 s left: a token is due after 2 s, refreshed from 1 s on.
        let creds = Credentials::new(
            "AKID",
            "secret",
            None,
            Some(SystemTime::now() + Duration::from_secs(4)),
            "test",
        );
        let refresh = Refresh {
            tick: Duration::from_millis(50),
            ahead: Duration::from_secs(60),
            recent: Duration::from_secs(60),
        };
        let runtime = own_runtime().unwrap();
        let used = RdsTokens::with_provider(
            SharedCredentialsProvider::new(creds.clone()),
            runtime.clone(),
            refresh,
        );
        let key = test_key("app");
        let first = used.token(&key).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let refreshed = cached(&used, &key).unwrap();
        assert_ne!(refreshed, first, "no background refresh");
        // Its signing time is later; the next login takes it as it is.
        let date = |t: &str| t.split("X-Amz-Date=").nth(1).unwrap()[..16].to_owned();
        assert!(date(&refreshed) > date(&first));
        assert_eq!(used.token(&key).await.unwrap(), refreshed);

        // Not used recently: left alone, then forgotten once due (after 3 s here).
        let creds = Credentials::new(
            "AKID",
            "secret",
            None,
            Some(SystemTime::now() + Duration::from_secs(6)),
            "test",
        );
        let idle = RdsTokens::with_provider(
            SharedCredentialsProvider::new(creds),
            runtime,
            Refresh {
                recent: Duration::ZERO,
                ..refresh
            },
        );
        let first = idle.token(&key).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(cached(&idle, &key), Some(first));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(cached(&idle, &key), None);
    }

    #[test]
    fn due_keys_are_recent_and_near_renewal() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let m0 = Instant::now();
        let entry = |signed: u64, renew: u64, used_ago: u64| CachedToken {
            token: "t".into(),
            signed_at: t0 + Duration::from_secs(signed),
            renew_at: t0 + Duration::from_secs(renew),
            last_used: m0 + Duration::from_secs(1200 - used_ago),
        };
        let mut tokens = HashMap::new();
        // A full token (renewal 10 min after signing), used a minute ago.
        tokens.insert(test_key("fresh"), entry(0, 600, 60));
        // Its renewal is 30 s away: due (60 s ahead).
        tokens.insert(test_key("soon"), entry(0, 630, 60));
        // Renewal 4 s after signing (short credentials): due only 2 s ahead.
        tokens.insert(test_key("short"), entry(597, 602, 0));
        tokens.insert(test_key("short-due"), entry(597, 601, 0));
        // Unused for 20 min: not refreshed; forgotten once past renewal.
        tokens.insert(test_key("idle"), entry(0, 610, 1200));
        tokens.insert(test_key("idle-gone"), entry(0, 500, 1200));
        let now = t0 + Duration::from_secs(600 - 1);
        let m_now = m0 + Duration::from_secs(1200);
        let (mut refresh, forget) = due(&tokens, now, m_now, &REFRESH);
        refresh.sort_by(|a, b| a.0.user.cmp(&b.0.user));
        let users = |v: &[TokenKey]| v.iter().map(|k| k.user.clone()).collect::<Vec<_>>();
        // `now` is 599 s: fresh renews at 600 (within 60 s): due too. Each is refreshed as
        // far ahead as its credentials are renewed: 60 s, or half of a short span.
        assert_eq!(
            refresh
                .iter()
                .map(|(k, ahead)| (k.user.as_str(), ahead.as_millis()))
                .collect::<Vec<_>>(),
            [("fresh", 60_000), ("short-due", 2_000), ("soon", 60_000)]
        );
        assert_eq!(users(&forget), ["idle-gone"]);
        let (refresh, _) = due(&tokens, t0 + Duration::from_secs(500), m_now, &REFRESH);
        assert!(refresh.is_empty(), "{refresh:?}");
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
