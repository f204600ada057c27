//! Logging in to the real database without a stored password: TLS with the server
//! verified (`verify-full`), then either a short-lived client certificate whose CN is the
//! database user, signed by the database-client CA (PostgreSQL `hostssl … cert`), or, on
//! Amazon RDS (`auth: rds-iam`), an IAM token (`upstream/rds_iam.rs`) as the cleartext
//! password the server asks for. A password of any kind is only ever written to the TLS
//! stream ([`read_login`] takes nothing else), and a server asking for a password the
//! gateway does not hold (SCRAM, MD5, or cleartext on a certificate route) is refused.

pub mod rds_iam;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{DatabaseConfig, UpstreamAuth};
use crate::pg::{self, ErrorResponse, sqlstate};
use crate::pki::{CertificateAuthority, LeafSpec, PkiError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        address: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("server {0} does not accept TLS connections")]
    SslRefused(SocketAddr),
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server rejected the login: {}", .0.message)]
    Rejected(ErrorResponse),
    #[error(
        "server asked for authentication method {0}, but the gateway logs in only with a client certificate"
    )]
    UnsupportedAuth(i32),
    /// SCRAM, MD5, or a cleartext password on a route whose login is a certificate.
    #[error("server asked for a password the gateway does not hold ({0})")]
    PasswordNotHeld(&'static str),
    /// No RDS IAM token: the credential chain failed. `arn` is the resource the proxy's
    /// identity needs `rds-db:connect` on (for the hint).
    #[error("{error}")]
    RdsToken {
        error: rds_iam::RdsIamError,
        arn: String,
    },
    /// RDS refused the IAM token (`PAM authentication failed`): the proxy's AWS identity
    /// lacks `rds-db:connect` for this user, or the role lacks `rds_iam`.
    #[error("server rejected the IAM token: {}", .error.message)]
    IamRejected {
        error: Box<ErrorResponse>,
        /// [`crate::config::UpstreamConfig::rds_db_user_arn`] of the login.
        arn: String,
    },
    #[error("protocol error from server: {0}")]
    Protocol(String),
    #[error("connection to the server failed during login: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot issue a database-client certificate: {0}")]
    Pki(#[from] PkiError),
    #[error("bad TLS settings for database {db}: {reason}")]
    Config { db: String, reason: String },
    /// The whole login (`upstream_login_timeout`), not only its connect.
    #[error("login to {address} did not finish within {timeout:?}")]
    LoginTimeout { address: String, timeout: Duration },
}

impl UpstreamError {
    /// The error the client sees, naming the database and user and what to do.
    pub fn to_client(&self, route: &str, user: &str) -> ErrorResponse {
        match self {
            UpstreamError::Resolve { .. } | UpstreamError::Unreachable { .. } => ErrorResponse::fatal(
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                format!("db-gateway: database \"{route}\" is unreachable: {self}"),
            )
            .with_hint("The proxy could not open a connection to the database server; check that it is running and that the proxy can reach it."),
            UpstreamError::Rejected(e) => ErrorResponse {
                message: format!(
                    "db-gateway: database \"{route}\" refused login as \"{user}\": {}",
                    e.message
                ),
                hint: Some(format!(
                    "The database must have a role \"{user}\" and a pg_hba.conf line \"hostssl … cert\" for the proxy, and trust the gateway's database-client CA (ssl_ca_file)."
                )),
                ..e.clone()
            },
            UpstreamError::PasswordNotHeld(_) => ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway: database \"{route}\" refused login as \"{user}\": {self}"),
            )
            .with_hint(format!("The gateway holds no database password: use pg_hba.conf \"hostssl … cert\" (auth: cert), or IAM authentication on Amazon RDS (auth: rds-iam), where the role needs GRANT rds_iam TO \"{user}\" (RDS asks other roles for a password).")),
            UpstreamError::RdsToken { arn, .. } => ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway: cannot log in to database \"{route}\" as \"{user}\": {self}"),
            )
            .with_hint(format!("The proxy needs AWS credentials (IRSA, EKS Pod Identity, an instance profile, …) for an identity allowed rds-db:connect on {arn}; the proxy log says why the credential provider chain failed.")),
            UpstreamError::IamRejected { error, arn } => ErrorResponse {
                message: format!(
                    "db-gateway: database \"{route}\" refused IAM login as \"{user}\": {}",
                    error.message
                ),
                hint: Some(format!(
                    "The proxy's AWS identity needs rds-db:connect on {arn}, the database needs IAM authentication enabled, and the role \"{user}\" needs GRANT rds_iam."
                )),
                ..(**error).clone()
            },
            UpstreamError::SslRefused(_) => ErrorResponse::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("db-gateway: connection to database \"{route}\" failed: {self}"),
            )
            .with_hint("The gateway sends a certificate or an IAM token only over TLS; turn on ssl on the database server."),
            UpstreamError::UnsupportedAuth(_) => ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway: database \"{route}\" refused certificate login as \"{user}\": {self}"),
            )
            .with_hint("Configure pg_hba.conf with \"hostssl … cert\" for the proxy's address (no password methods)."),
            UpstreamError::LoginTimeout { .. } => ErrorResponse::fatal(
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                format!("db-gateway: database \"{route}\" is unreachable: {self}"),
            )
            .with_hint("The database server accepted the connection but did not complete the login in time; check that it is not overloaded or stuck."),
            UpstreamError::Config { .. } | UpstreamError::Pki(_) => ErrorResponse::fatal(
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                format!("db-gateway: cannot log in to database \"{route}\": {self}"),
            )
            .with_hint("This is a proxy configuration problem; the proxy log has details."),
            _ => ErrorResponse::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("db-gateway: connection to database \"{route}\" failed: {self}"),
            )
            .with_hint("Check the database server's TLS certificate against the proxy's upstream.ca and server_name."),
        }
    }
}

/// The proxy's TLS connection to a PostgreSQL server.
pub type ServerStream = TlsStream<TcpStream>;

/// A logged-in upstream session, positioned right after the server's first
/// `ReadyForQuery`: the connection, and what the server said while it started.
pub struct Login {
    pub stream: ServerStream,
    pub backend: Backend,
    /// Bytes the server sent after `ReadyForQuery` in the same read (normally none).
    pub rest: Vec<u8>,
}

/// The server session a login reached and its start-up answers, which a kept session
/// (`upstream.reuse`) carries on to the next client's greeting.
pub struct Backend {
    pub addr: SocketAddr,
    /// `ParameterStatus` and `NoticeResponse` messages, raw, in the server's order.
    pub greeting: Vec<u8>,
    /// The server's own `BackendKeyData` (pid, secret), when it sent one.
    pub key: Option<(i32, i32)>,
    /// The raw `ReadyForQuery`.
    pub ready: Vec<u8>,
}

/// (database, user) → (renew at, TLS settings with that user's certificate).
type ConfigCache = HashMap<(String, String), (SystemTime, Arc<ClientConfig>)>;

/// TLS client settings per (database, user), renewed at half the certificate's life so
/// that TLS session resumption keeps working between logins.
pub struct Upstreams {
    /// Swapped when its files change (`proxy/tls_reload.rs`); a login signs with the one
    /// it loaded.
    ca: arc_swap::ArcSwap<CertificateAuthority>,
    ttl: Duration,
    roots: HashMap<String, Arc<RootCertStore>>,
    configs: Mutex<ConfigCache>,
    /// Server-verifying TLS settings without a client certificate, per `rds-iam` database.
    iam_configs: HashMap<String, Arc<ClientConfig>>,
    /// The RDS IAM tokens; started only when a database uses `auth: rds-iam`.
    rds_tokens: Option<rds_iam::RdsTokens>,
}

impl Upstreams {
    /// From now on, logins sign with `ca` (a reloaded database-client CA): the client
    /// certificates the old one signed are forgotten.
    pub fn set_ca(&self, ca: CertificateAuthority) {
        self.ca.store(Arc::new(ca));
        self.configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn new(
        ca: CertificateAuthority,
        ttl: Duration,
        databases: &[DatabaseConfig],
    ) -> Result<Self, UpstreamError> {
        let mut roots = HashMap::new();
        for db in databases.iter().filter(|d| d.protocol.is_postgres()) {
            let ca = db
                .upstream
                .ca
                .as_ref()
                .ok_or_else(|| UpstreamError::Config {
                    db: db.name.clone(),
                    reason: "upstream.ca is required".into(),
                })?;
            let mut store = RootCertStore::empty();
            for c in crate::pki::load_certs(ca)? {
                store.add(c).map_err(|e| UpstreamError::Config {
                    db: db.name.clone(),
                    reason: format!("{}: {e}", ca.display()),
                })?;
            }
            roots.insert(db.name.clone(), Arc::new(store));
        }
        let mut iam_configs = HashMap::new();
        let mut rds_tokens = None;
        for db in databases.iter().filter(|d| is_rds_iam(d)) {
            let roots = roots
                .get(&db.name)
                .cloned()
                .ok_or_else(|| UpstreamError::Config {
                    db: db.name.clone(),
                    reason: "no CA loaded".into(),
                })?;
            let cfg = ClientConfig::builder_with_provider(crate::tunnel::crypto_provider())
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .map_err(|e| UpstreamError::Config {
                    db: db.name.clone(),
                    reason: e.to_string(),
                })?;
            iam_configs.insert(db.name.clone(), Arc::new(cfg));
            if rds_tokens.is_none() {
                let region = db.upstream.region.as_deref().unwrap_or_default();
                rds_tokens =
                    Some(
                        rds_iam::RdsTokens::start(region).map_err(|e| UpstreamError::Config {
                            db: db.name.clone(),
                            reason: e.to_string(),
                        })?,
                    );
            }
        }
        Ok(Self {
            ca: arc_swap::ArcSwap::from_pointee(ca),
            ttl,
            roots,
            configs: Mutex::new(HashMap::new()),
            iam_configs,
            rds_tokens,
        })
    }

    /// The IAM token a login to `db` as `user` sends, or `None` on a certificate route.
    async fn password(
        &self,
        db: &DatabaseConfig,
        user: &str,
    ) -> Result<Option<Arc<str>>, UpstreamError> {
        if !is_rds_iam(db) {
            return Ok(None);
        }
        let tokens = self
            .rds_tokens
            .as_ref()
            .ok_or_else(|| UpstreamError::Config {
                db: db.name.clone(),
                reason: "RDS IAM tokens were not set up".into(),
            })?;
        let (host, port) = db.upstream.iam_endpoint();
        let key = rds_iam::TokenKey {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            region: db.upstream.region.clone().unwrap_or_default(),
        };
        tokens
            .token(&key)
            .await
            .map(Some)
            .map_err(|error| UpstreamError::RdsToken {
                error,
                arn: db.upstream.rds_db_user_arn(user),
            })
    }

    fn client_config(
        &self,
        db: &DatabaseConfig,
        user: &str,
    ) -> Result<Arc<ClientConfig>, UpstreamError> {
        if let Some(cfg) = self.iam_configs.get(&db.name) {
            return Ok(cfg.clone());
        }
        let now = SystemTime::now();
        let key = (db.name.clone(), user.to_owned());
        let mut configs = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((renew_at, cfg)) = configs.get(&key)
            && now < *renew_at
        {
            return Ok(cfg.clone());
        }
        let roots = self
            .roots
            .get(&db.name)
            .cloned()
            .ok_or_else(|| UpstreamError::Config {
                db: db.name.clone(),
                reason: "no CA loaded".into(),
            })?;
        let (cert, key_pair) = self
            .ca
            .load()
            .issue_der(&LeafSpec::db_client(user), self.ttl)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        let cfg = ClientConfig::builder_with_provider(crate::tunnel::crypto_provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_root_certificates(roots)
                    .with_client_auth_cert(vec![cert], key_der)
            })
            .map_err(|e| UpstreamError::Config {
                db: db.name.clone(),
                reason: e.to_string(),
            })?;
        let cfg = Arc::new(cfg);
        configs.insert(key, (now + self.ttl / 2, cfg.clone()));
        metrics::counter!(crate::telemetry::proxy::DB_CLIENT_CERTS_ISSUED_TOTAL).increment(1);
        Ok(cfg)
    }

    /// Connects, negotiates TLS, sends the startup packet and reads the login phase.
    pub async fn login(
        &self,
        db: &DatabaseConfig,
        user: &str,
        database: &str,
        extra_params: &[(String, String)],
        connect_timeout: Duration,
    ) -> Result<Login, UpstreamError> {
        let cfg = self.client_config(db, user)?;
        // Before any connection: a session that cannot have a token opens none.
        let password = self.password(db, user).await?;
        let address = &db.upstream.address;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(address.as_str())
            .await
            .map_err(|source| UpstreamError::Resolve {
                address: address.clone(),
                source,
            })?
            .collect();
        let mut last = String::from("no addresses");
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some((s, addr));
                    break;
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: timed out after {connect_timeout:?}"),
            }
        }
        let (mut tcp, addr) = tcp.ok_or_else(|| UpstreamError::Unreachable {
            address: address.clone(),
            reason: last,
        })?;
        tcp.set_nodelay(true)?;
        tcp.write_all(&pg::encode_ssl_request()).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(UpstreamError::SslRefused(addr));
        }
        let name = ServerName::try_from(db.upstream.server_name().to_owned()).map_err(|e| {
            UpstreamError::Config {
                db: db.name.clone(),
                reason: format!("server_name: {e}"),
            }
        })?;
        let mut stream = TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|source| UpstreamError::Tls { addr, source })?;

        let mut params: Vec<(&str, &str)> = vec![("user", user), ("database", database)];
        params.extend(
            extra_params
                .iter()
                .filter(|(k, _)| is_forwarded_param(k))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        stream.write_all(&pg::encode_startup(&params)).await?;
        stream.flush().await?;
        read_login(stream, addr, password.as_deref())
            .await
            .map_err(|e| match e {
                UpstreamError::Rejected(error) if password.is_some() => {
                    UpstreamError::IamRejected {
                        error: Box::new(error),
                        arn: db.upstream.rds_db_user_arn(user),
                    }
                }
                e => e,
            })
    }
}

/// Startup parameters of the client that go to the server as they are: not `user` and
/// `database` (the policy decides those), not protocol extensions (`_pq_.*`, answered by
/// the proxy).
pub fn is_forwarded_param(name: &str) -> bool {
    name != "user" && name != "database" && !name.starts_with("_pq_.")
}

fn is_rds_iam(db: &DatabaseConfig) -> bool {
    db.protocol.is_postgres() && db.upstream.auth == Some(UpstreamAuth::RdsIam)
}

/// PostgreSQL's `AuthenticationRequest` codes the login meets.
const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT_PASSWORD: i32 = 3;
const AUTH_MD5_PASSWORD: i32 = 5;
const AUTH_SASL: i32 = 10;

/// Reads the login phase on the TLS stream (the only kind of stream a password may be
/// written to), answering a cleartext password request with `password` when there is one.
async fn read_login(
    mut stream: TlsStream<TcpStream>,
    addr: SocketAddr,
    password: Option<&str>,
) -> Result<Login, UpstreamError> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut greeting = Vec::new();
    let mut backend_key = None;
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((tag, body, used)) = pg::split_message(&buf, pg::MAX_LOGIN_MESSAGE_LENGTH)
            .map_err(|e| UpstreamError::Protocol(e.message))?
        {
            match tag {
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or_else(|| {
                            UpstreamError::Protocol("short authentication message".into())
                        })?;
                    match (code, password) {
                        (AUTH_OK, _) => {}
                        (AUTH_CLEARTEXT_PASSWORD, Some(p)) => {
                            stream.write_all(&pg::encode_password(p)).await?;
                            stream.flush().await?;
                        }
                        (AUTH_CLEARTEXT_PASSWORD, None) => {
                            return Err(UpstreamError::PasswordNotHeld("cleartext password"));
                        }
                        (AUTH_MD5_PASSWORD, _) => {
                            return Err(UpstreamError::PasswordNotHeld("MD5"));
                        }
                        (AUTH_SASL, _) => return Err(UpstreamError::PasswordNotHeld("SCRAM")),
                        _ => return Err(UpstreamError::UnsupportedAuth(code)),
                    }
                }
                b'E' => {
                    let e = ErrorResponse::parse(body)
                        .ok_or_else(|| UpstreamError::Protocol("malformed ErrorResponse".into()))?;
                    return Err(UpstreamError::Rejected(e));
                }
                b'K' if body.len() == 8 => {
                    backend_key = Some((
                        i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                        i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
                    ));
                }
                b'S' | b'N' => greeting.extend_from_slice(&buf[..used]),
                b'Z' => {
                    let ready = buf[..used].to_vec();
                    let rest = buf[used..].to_vec();
                    let backend = Backend {
                        addr,
                        greeting,
                        key: backend_key,
                        ready,
                    };
                    return Ok(Login {
                        stream,
                        backend,
                        rest,
                    });
                }
                other => {
                    return Err(UpstreamError::Protocol(format!(
                        "unexpected message {:?} during login",
                        other as char
                    )));
                }
            }
            buf.drain(..used);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(UpstreamError::Protocol(
                "server closed the connection during login".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends a `CancelRequest` to the server on a fresh connection. PostgreSQL reads cancel
/// requests before authentication, so plain TCP works even where pg_hba demands TLS.
pub async fn cancel(
    addr: SocketAddr,
    pid: i32,
    secret: i32,
    timeout: Duration,
) -> std::io::Result<()> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&pg::encode_cancel_request(pid, secret)).await?;
        // The server closes without answering; wait for that so the cancel is delivered.
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
        Ok(())
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel request timed out")
    })?
}

/// Against a real PostgreSQL 15 (the harness's `localdb`: `hostssl … cert` only), as the
/// proxy meets it in production; without the harness there is nothing to test with.
#[cfg(all(test, feature = "harness"))]
mod tests;
