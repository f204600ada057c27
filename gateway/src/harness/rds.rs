//! A local stand-in for Amazon RDS's IAM login, in front of the harness's real PostgreSQL:
//! it checks what RDS checks and nothing less, so a test that logs in through it shows
//! the gateway would log in to RDS.
//!
//! RDS's side of `auth: rds-iam`: TLS (here from a CA of its own, the stand-in for the RDS
//! CA bundle), `AuthenticationCleartextPassword`, then the password must be a SigV4 presigned
//! `connect` URL for this endpoint (host and port), for the startup user, in this region,
//! signed by credentials IAM knows ([`AwsKeys`]), within its `X-Amz-Expires` and its
//! credentials' life, by an identity allowed `rds-db:connect` for that user. Anything else
//! gets RDS's own answer: `FATAL 28P01 PAM authentication failed for user "…"`. The signature
//! is recomputed here with `ring`'s HMAC from the token's own parts ([`verify_token`]), not
//! with the signer the proxy uses, so a shared mistake cannot pass.
//!
//! A verified login is relayed to the real PostgreSQL as the startup user over its unix
//! socket (`local all all trust`), and from there the bytes are PostgreSQL's own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use ring::{digest, hmac};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

use crate::pg::{self, ErrorResponse};
use crate::pki::{self, CertificateAuthority, LeafSpec};

/// The SQLSTATE RDS (PostgreSQL's PAM authentication) answers a refused token with.
pub const INVALID_PASSWORD: &str = "28P01";

/// Credentials IAM has issued: access key id → what signs with it.
#[derive(Clone, Default)]
pub struct AwsKeys(Arc<Mutex<HashMap<String, AwsKey>>>);

#[derive(Clone, Debug)]
pub struct AwsKey {
    pub secret: String,
    pub session_token: Option<String>,
    /// Temporary credentials stop signing valid requests at this time.
    pub expires: Option<SystemTime>,
}

impl AwsKeys {
    pub fn insert(&self, access_key_id: &str, key: AwsKey) {
        self.lock().insert(access_key_id.to_owned(), key);
    }

    pub fn get(&self, access_key_id: &str) -> Option<AwsKey> {
        self.lock().get(access_key_id).cloned()
    }

    /// When the credentials issued last stop signing: tests wait on it, not on a guess of
    /// when the gateway renews.
    pub fn latest_expiry(&self) -> Option<SystemTime> {
        self.lock().values().filter_map(|k| k.expires).max()
    }

    /// Every secret key and session token issued, for tests that look for leaks.
    pub fn all_secrets(&self) -> Vec<String> {
        self.lock()
            .values()
            .flat_map(|k| std::iter::once(k.secret.clone()).chain(k.session_token.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AwsKey>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What an RDS instance expects of a token.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The instance's endpoint name and port, as signed into the token (port 0: the
    /// front's own).
    pub host: String,
    pub port: u16,
    pub region: String,
}

/// Checks `token` as RDS does, for a login of `user` at `now`. The error says which check
/// failed (the front logs it; RDS's client only ever sees the PAM failure).
pub fn verify_token(
    token: &str,
    endpoint: &Endpoint,
    user: &str,
    keys: &AwsKeys,
    now: SystemTime,
) -> Result<AwsKeyUse, String> {
    let (authority, query) = token
        .split_once("/?")
        .ok_or("not a presigned URL without its scheme")?;
    let want = format!("{}:{}", endpoint.host, endpoint.port);
    if authority != want {
        return Err(format!("signed for {authority}, this endpoint is {want}"));
    }
    let mut params = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').ok_or("query parameter without =")?;
        params.push((decode(k)?, decode(v)?));
    }
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or(format!("no {name}"))
    };
    if get("Action")? != "connect" {
        return Err("Action is not connect".into());
    }
    if get("DBUser")? != user {
        return Err(format!("token for {:?}, login as {user:?}", get("DBUser")?));
    }
    if get("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" || get("X-Amz-SignedHeaders")? != "host" {
        return Err("not AWS4-HMAC-SHA256 over the host header".into());
    }
    let credential = get("X-Amz-Credential")?;
    let parts: Vec<&str> = credential.split('/').collect();
    let [akid, day, region, service, "aws4_request"] = parts[..] else {
        return Err(format!("malformed credential scope {credential:?}"));
    };
    if region != endpoint.region || service != "rds-db" {
        return Err(format!(
            "scope {region}/{service}, want {}/rds-db",
            endpoint.region
        ));
    }
    let amz_date = get("X-Amz-Date")?;
    if !amz_date.starts_with(day) || amz_date.len() != 16 {
        return Err(format!("X-Amz-Date {amz_date:?} outside the scope's day"));
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &amz_date[..4],
        &amz_date[4..6],
        &amz_date[6..8],
        &amz_date[9..11],
        &amz_date[11..13],
        &amz_date[13..15]
    );
    let signed_at = humantime::parse_rfc3339(&rfc3339).map_err(|e| e.to_string())?;
    let expires: u64 = get("X-Amz-Expires")?
        .parse()
        .map_err(|_| "bad X-Amz-Expires")?;
    if expires > 900 {
        return Err(format!("X-Amz-Expires {expires} is over 900"));
    }
    if now > signed_at + Duration::from_secs(expires) {
        return Err(format!("token expired at {rfc3339} + {expires}s"));
    }
    if signed_at > now + Duration::from_secs(300) {
        return Err("token signed in the future".into());
    }
    let key = keys
        .get(akid)
        .ok_or(format!("unknown access key id {akid}"))?;
    if key.expires.is_some_and(|e| now >= e) {
        return Err(format!("the credentials of {akid} have expired"));
    }
    let token_param = params
        .iter()
        .find(|(k, _)| k == "X-Amz-Security-Token")
        .map(|(_, v)| v.clone());
    if token_param != key.session_token {
        return Err(format!("wrong or missing session token for {akid}"));
    }
    // The canonical request of a presigned GET with an empty body, from the token's parts.
    let mut canonical: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (encode(k), encode(v)))
        .collect();
    canonical.sort();
    let canonical_query = canonical
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let request = format!(
        "GET\n/\n{canonical_query}\nhost:{authority}\n\nhost\n{}",
        hex(digest::digest(&digest::SHA256, b"").as_ref())
    );
    let scope = format!("{day}/{region}/rds-db/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, request.as_bytes()).as_ref())
    );
    let mut k = format!("AWS4{}", key.secret).into_bytes();
    for part in [day, region, "rds-db", "aws4_request"] {
        k = hmac_sha256(&k, part.as_bytes());
    }
    let want = hex(&hmac_sha256(&k, string_to_sign.as_bytes()));
    if get("X-Amz-Signature")? != want {
        return Err(format!("signature does not match the secret of {akid}"));
    }
    Ok(AwsKeyUse {
        access_key_id: akid.to_owned(),
        signed_at,
    })
}

/// Which credentials signed a verified token, and when.
#[derive(Clone, Debug)]
pub struct AwsKeyUse {
    pub access_key_id: String,
    pub signed_at: SystemTime,
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SigV4's URI encoding: every byte but the unreserved characters as `%XX`.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            out.push(u8::from_str_radix(h, 16).map_err(|_| "bad %-escape")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8".into())
}

/// How a front behaves.
#[derive(Clone)]
pub struct RdsFrontOptions {
    pub endpoint: Endpoint,
    pub keys: AwsKeys,
    /// Database users the IAM policy allows `rds-db:connect` for.
    pub iam_users: Vec<String>,
    /// Added to the front's clock (a late clock makes valid tokens look expired).
    pub clock_ahead: Duration,
    /// Answer `SSLRequest` with `N`, as a server without TLS does.
    pub plain: bool,
    /// Database users without `rds_iam`: RDS asks them for a SCRAM password instead.
    pub without_rds_iam: Vec<String>,
    /// Decide as RDS does, from the real database: a user that is not a member of the role
    /// `rds_iam` there (or does not exist) is asked for a SCRAM password. Tests of
    /// automatic users set it, so a user the gateway created logs in only once it granted
    /// `rds_iam` (the test's set-up creates that role, as RDS has one).
    pub rds_iam_from_database: bool,
    /// IAM holds another secret for every key than the one the signer had: each
    /// signature is wrong (a forged or mis-signed token).
    pub iam_secret_differs: bool,
}

/// A running front. Dropping it stops accepting (its thread ends with the test process).
pub struct RdsFront {
    pub addr: SocketAddr,
    /// The CA bundle of its server certificate (the proxy's `upstream.ca`).
    pub ca: PathBuf,
    backend: Arc<Mutex<Option<(PathBuf, u16)>>>,
    /// Tokens verified, in order, with the credentials that signed them.
    pub accepted: Arc<Mutex<Vec<AwsKeyUse>>>,
    /// Why tokens were refused, in order.
    pub refused: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl Drop for RdsFront {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RdsFront {
    /// Starts on `127.0.0.1:0` with a server certificate for `localhost` and 127.0.0.1.
    pub fn start(mut opts: RdsFrontOptions) -> Result<Self> {
        let dir = super::temp_dir("db-gateway-rds-front")?;
        pki::init_ca(&dir, "rds.test")?;
        let ca = CertificateAuthority::load(
            &dir.join(pki::WORKLOAD_CA_CERT),
            &dir.join(pki::WORKLOAD_CA_KEY),
        )?;
        let (cert, key) = ca.issue(
            &LeafSpec::server(vec!["localhost".into()], vec!["127.0.0.1".parse()?]),
            Duration::from_secs(24 * 3600),
        )?;
        pki::write_public(&dir.join("server.crt"), &cert)?;
        pki::write_secret(&dir.join("server.key"), &key)?;
        let server = rustls::ServerConfig::builder_with_provider(crate::tunnel::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                pki::load_certs(&dir.join("server.crt"))?,
                pki::load_key(&dir.join("server.key"))?,
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        if opts.endpoint.port == 0 {
            opts.endpoint.port = addr.port();
        }
        let front = RdsFront {
            addr,
            ca: dir.join(pki::WORKLOAD_CA_CERT),
            backend: Arc::default(),
            accepted: Arc::default(),
            refused: Arc::default(),
            dir,
        };
        let state = Conn {
            opts: Arc::new(opts),
            backend: front.backend.clone(),
            accepted: front.accepted.clone(),
            refused: front.refused.clone(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("rds-front".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (state, acceptor) = (state.clone(), acceptor.clone());
                        tokio::spawn(async move {
                            if let Err(e) = state.serve(tcp, acceptor).await {
                                tracing::debug!(error = %e, "rds front connection ended");
                            }
                        });
                    }
                })
            })?;
        Ok(front)
    }

    /// The real PostgreSQL verified logins go to: its unix socket directory and port.
    pub fn set_backend(&self, socket_dir: PathBuf, port: u16) {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some((socket_dir, port));
    }
}

#[derive(Clone)]
struct Conn {
    opts: Arc<RdsFrontOptions>,
    backend: Arc<Mutex<Option<(PathBuf, u16)>>>,
    accepted: Arc<Mutex<Vec<AwsKeyUse>>>,
    refused: Arc<Mutex<Vec<String>>>,
}

impl Conn {
    async fn serve(
        self,
        mut tcp: tokio::net::TcpStream,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> Result<()> {
        let first = read_packet(&mut tcp).await?;
        if first.get(..4) != Some(&pg::SSL_REQUEST_CODE.to_be_bytes()[..]) {
            anyhow::bail!("no SSLRequest first");
        }
        if self.opts.plain {
            tcp.write_all(b"N").await?;
            // Whatever comes now came without TLS: read it and refuse, as rds.force_ssl does.
            let _ = read_packet(&mut tcp).await;
            return Ok(());
        }
        tcp.write_all(b"S").await?;
        let mut tls = acceptor.accept(tcp).await?;
        let startup = read_packet(&mut tls).await?;
        let params = startup_params(&startup)?;
        let user = params
            .iter()
            .find(|(k, _)| k == "user")
            .map(|(_, v)| v.clone())
            .context("no user")?;
        let without_rds_iam = if self.opts.rds_iam_from_database {
            !self.has_rds_iam(&user).await?
        } else {
            self.opts.without_rds_iam.contains(&user)
        };
        if without_rds_iam {
            // AuthenticationSASL offering SCRAM-SHA-256, as for any password role.
            let mut sasl = vec![b'R', 0, 0, 0, 0, 0, 0, 0, 10];
            sasl.extend_from_slice(b"SCRAM-SHA-256\0\0");
            let len = (sasl.len() - 1) as u32;
            sasl[1..5].copy_from_slice(&len.to_be_bytes());
            tls.write_all(&sasl).await?;
            tls.flush().await?;
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            anyhow::ensure!(rest.is_empty(), "the client answered a SCRAM request");
            self.refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{user:?} has no rds_iam; asked for SCRAM"));
            return Ok(());
        }
        // AuthenticationCleartextPassword.
        tls.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await?;
        tls.flush().await?;
        let mut head = [0u8; 5];
        tls.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        anyhow::ensure!(
            head[0] == b'p' && (5..=8192).contains(&len),
            "no PasswordMessage"
        );
        let mut body = vec![0u8; len - 4];
        tls.read_exact(&mut body).await?;
        let password =
            String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
        let now = SystemTime::now() + self.opts.clock_ahead;
        let keys = if self.opts.iam_secret_differs {
            let other = AwsKeys::default();
            for (akid, mut key) in self.opts.keys.lock().clone() {
                key.secret.push('x');
                other.insert(&akid, key);
            }
            other
        } else {
            self.opts.keys.clone()
        };
        let verdict =
            verify_token(&password, &self.opts.endpoint, &user, &keys, now).and_then(|u| {
                if self.opts.iam_users.contains(&user) {
                    Ok(u)
                } else {
                    Err(format!(
                        "IAM policy does not allow rds-db:connect as {user:?}"
                    ))
                }
            });
        match verdict {
            Ok(used) => self
                .accepted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(used),
            Err(why) => {
                self.refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(why);
                let e = ErrorResponse::fatal(
                    INVALID_PASSWORD,
                    format!("PAM authentication failed for user \"{user}\""),
                );
                tls.write_all(&e.encode()).await?;
                tls.shutdown().await?;
                return Ok(());
            }
        }
        let (dir, port) = self
            .backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .context("no backend set")?;
        let mut pg = UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?;
        let pairs: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        pg.write_all(&pg::encode_startup(&pairs)).await?;
        tokio::io::copy_bidirectional(&mut tls, &mut pg).await?;
        Ok(())
    }
}

impl Conn {
    /// Whether `user` is a member of `rds_iam` in the real database (directly or not), asked
    /// as the superuser over the trusted unix socket.
    async fn has_rds_iam(&self, user: &str) -> Result<bool> {
        let (dir, port) = self
            .backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .context("no backend set")?;
        let mut pg = UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?;
        pg.write_all(&pg::encode_startup(&[
            ("user", "postgres"),
            ("database", "postgres"),
        ]))
        .await?;
        let sql = format!(
            "SELECT COALESCE((SELECT pg_has_role(oid, 'rds_iam', 'MEMBER') FROM pg_roles WHERE rolname = '{}'), false)",
            user.replace('\'', "''")
        );
        let mut q = vec![b'Q'];
        q.extend_from_slice(&(4 + sql.len() as u32 + 1).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        pg.write_all(&q).await?;
        let mut buf = Vec::new();
        let mut answer = None;
        let mut ready = 0;
        loop {
            while let Some((tag, body, used)) =
                pg::split_message(&buf, 1 << 20).map_err(|e| anyhow::anyhow!(e.message))?
            {
                match tag {
                    b'E' => anyhow::bail!("rds_iam membership query failed"),
                    // One column: length 1, then `t` or `f`.
                    b'D' => answer = Some(body.get(6) == Some(&b't')),
                    b'Z' => ready += 1,
                    _ => {}
                }
                buf.drain(..used);
            }
            // The first ReadyForQuery ends the login, the second the query.
            if ready == 2 {
                let _ = pg.write_all(&pg::TERMINATE).await;
                return answer.context("no answer to the rds_iam membership query");
            }
            let mut chunk = [0u8; 4096];
            let n = pg.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "PostgreSQL closed the membership query");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One length-prefixed packet without a type byte (SSLRequest, StartupMessage): the bytes
/// after the length.
async fn read_packet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    anyhow::ensure!(
        (8..=pg::MAX_STARTUP_PACKET_LENGTH).contains(&len),
        "bad packet length"
    );
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await?;
    Ok(body)
}

fn startup_params(body: &[u8]) -> Result<Vec<(String, String)>> {
    let mut fields = body
        .get(4..)
        .context("short startup")?
        .split(|b| *b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if k.is_empty() {
            break;
        }
        out.push((k, v));
    }
    Ok(out)
}
