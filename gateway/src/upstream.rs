//! Logging in to the real database without a stored password: TLS with the server
//! verified (`verify-full`), and a short-lived client certificate whose CN is the database
//! user, signed by the database-client CA (PostgreSQL `hostssl … cert`).

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

use crate::config::DatabaseConfig;
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
    #[error("protocol error from server: {0}")]
    Protocol(String),
    #[error("connection to the server failed during login: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot issue a database-client certificate: {0}")]
    Pki(#[from] PkiError),
    #[error("bad TLS settings for database {db}: {reason}")]
    Config { db: String, reason: String },
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
            UpstreamError::UnsupportedAuth(_) => ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway: database \"{route}\" refused certificate login as \"{user}\": {self}"),
            )
            .with_hint("Configure pg_hba.conf with \"hostssl … cert\" for the proxy's address (no password methods)."),
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
/// `ReadyForQuery`.
pub struct Login {
    pub stream: ServerStream,
    pub addr: SocketAddr,
    /// `ParameterStatus` and `NoticeResponse` messages, raw, in the server's order.
    pub greeting: Vec<u8>,
    pub backend_key: Option<(i32, i32)>,
    /// The raw `ReadyForQuery`.
    pub ready: Vec<u8>,
    /// Bytes the server sent after `ReadyForQuery` in the same read (normally none).
    pub rest: Vec<u8>,
}

/// (database, user) → (renew at, TLS settings with that user's certificate).
type ConfigCache = HashMap<(String, String), (SystemTime, Arc<ClientConfig>)>;

/// TLS client settings per (database, user), renewed at half the certificate's life so
/// that TLS session resumption keeps working between logins.
pub struct Upstreams {
    ca: CertificateAuthority,
    ttl: Duration,
    roots: HashMap<String, Arc<RootCertStore>>,
    configs: Mutex<ConfigCache>,
}

impl Upstreams {
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
        Ok(Self {
            ca,
            ttl,
            roots,
            configs: Mutex::new(HashMap::new()),
        })
    }

    fn client_config(
        &self,
        db: &DatabaseConfig,
        user: &str,
    ) -> Result<Arc<ClientConfig>, UpstreamError> {
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
        let (cert, key_pair) = self.ca.issue_der(&LeafSpec::db_client(user), self.ttl)?;
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
        read_login(stream, addr).await
    }
}

/// Startup parameters of the client that go to the server as they are: not `user` and
/// `database` (the policy decides those), not protocol extensions (`_pq_.*`, answered by
/// the proxy).
pub fn is_forwarded_param(name: &str) -> bool {
    name != "user" && name != "database" && !name.starts_with("_pq_.")
}

async fn read_login(
    mut stream: TlsStream<TcpStream>,
    addr: SocketAddr,
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
                    if code != 0 {
                        return Err(UpstreamError::UnsupportedAuth(code));
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
                    return Ok(Login {
                        stream,
                        addr,
                        greeting,
                        backend_key,
                        ready,
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
/// proxy meets it in production.
#[cfg(test)]
mod tests {
    // The harness starts the database: without its feature there is nothing to test with.
    #![cfg(feature = "harness")]

    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::{UpstreamAuth, UpstreamConfig, UpstreamTlsMode};
    use crate::harness::localdb::{self, LocalPostgres, LocalPostgresOptions};
    use crate::harness::machine::{free_port, loopback, temp_dir};
    use crate::pg::Severity;
    use crate::pki;
    use crate::route::Protocol;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Both CAs in a temporary directory and a server whose certificate the workload CA
    /// signed for `localhost`, trusting the database-client CA; `extra_hba` goes first.
    struct Db {
        pg: LocalPostgres,
        dir: PathBuf,
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Db {
        fn start(extra_hba: Vec<String>) -> Self {
            let dir = temp_dir("db-gateway-upstream-test").unwrap();
            pki::init_ca(&dir, "test.local").unwrap();
            let server_ca = CertificateAuthority::load(
                &dir.join(pki::WORKLOAD_CA_CERT),
                &dir.join(pki::WORKLOAD_CA_KEY),
            )
            .unwrap();
            let (cert, key) = server_ca
                .issue(
                    &LeafSpec::server(vec!["localhost".into()], vec![]),
                    Duration::from_secs(3600),
                )
                .unwrap();
            let pg = localdb::start(LocalPostgresOptions {
                server_cert_pem: cert,
                server_key_pem: key,
                client_ca_pem: std::fs::read_to_string(dir.join(pki::DB_CLIENT_CA_CERT)).unwrap(),
                extra_hba,
            })
            .unwrap();
            pg.psql("CREATE ROLE alice LOGIN").unwrap();
            pg.psql("CREATE DATABASE app OWNER alice").unwrap();
            Db { pg, dir }
        }

        fn route(&self, address: String, server_name: &str) -> DatabaseConfig {
            DatabaseConfig {
                name: "main".into(),
                labels: Default::default(),
                protocol: Protocol::Postgres,
                upstream: UpstreamConfig {
                    address,
                    auth: Some(UpstreamAuth::Cert),
                    tls: UpstreamTlsMode::VerifyFull,
                    ca: Some(self.dir.join(pki::WORKLOAD_CA_CERT)),
                    server_name: Some(server_name.into()),
                    reuse: None,
                },
            }
        }

        fn main_route(&self) -> DatabaseConfig {
            self.route(loopback(self.pg.port).to_string(), "localhost")
        }

        fn upstreams(&self, db: &DatabaseConfig) -> Upstreams {
            let ca = client_ca(&self.dir);
            Upstreams::new(ca, Duration::from_secs(600), std::slice::from_ref(db)).unwrap()
        }
    }

    fn client_ca(dir: &Path) -> CertificateAuthority {
        CertificateAuthority::load(
            &dir.join(pki::DB_CLIENT_CA_CERT),
            &dir.join(pki::DB_CLIENT_CA_KEY),
        )
        .unwrap()
    }

    /// The `(name, value)` pairs of the `ParameterStatus` messages in `greeting`.
    fn parameters(greeting: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut rest = greeting;
        while let Some((tag, body, used)) = pg::split_message(rest, 1 << 20).unwrap() {
            if tag == b'S' {
                let mut parts = body.split(|b| *b == 0).map(String::from_utf8_lossy);
                out.push((
                    parts.next().unwrap().into_owned(),
                    parts.next().unwrap().into_owned(),
                ));
            }
            rest = &rest[used..];
        }
        out
    }

    /// Runs `sql` on a logged-in session and returns the first column of the first row.
    async fn query_one(login: &mut Login, sql: &str) -> String {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&(4 + sql.len() as i32 + 1).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        login.stream.write_all(&q).await.unwrap();
        let mut buf = Vec::new();
        let mut value = None;
        loop {
            while let Some((tag, body, used)) = pg::split_message(&buf, 1 << 20).unwrap() {
                match tag {
                    b'D' => {
                        let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
                        value = Some(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
                    }
                    b'E' => panic!("query failed: {:?}", ErrorResponse::parse(body)),
                    b'Z' => return value.expect("a row"),
                    _ => {}
                }
                buf.drain(..used);
            }
            let mut chunk = [0u8; 4096];
            let n = login.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed the session");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn logs_in_with_a_client_certificate_and_forwards_only_client_parameters() {
        let db = Db::start(Vec::new());
        let route = db.main_route();
        let upstreams = db.upstreams(&route);
        let extra = [
            ("application_name".to_owned(), "unit-test".to_owned()),
            // The policy decides user and database; protocol extensions stay with the proxy.
            ("user".to_owned(), "postgres".to_owned()),
            ("_pq_.ext".to_owned(), "x".to_owned()),
        ];
        let mut login = upstreams
            .login(&route, "alice", "app", &extra, TIMEOUT)
            .await
            .unwrap();
        assert_eq!(login.addr, loopback(db.pg.port));
        assert_eq!(login.ready.first(), Some(&b'Z'), "{:?}", login.ready);
        assert!(login.rest.is_empty());
        let params = parameters(&login.greeting);
        let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(param("application_name"), Some("unit-test"), "{params:?}");
        assert_eq!(param("session_authorization"), Some("alice"), "{params:?}");

        assert_eq!(query_one(&mut login, "SELECT current_user").await, "alice");
        assert_eq!(
            query_one(&mut login, "SELECT current_database()").await,
            "app"
        );
        // The session is TLS with the certificate the proxy issued (CN = database user).
        let ssl =
            "SELECT ssl::text || ' ' || client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        assert_eq!(query_one(&mut login, ssl).await, "true /CN=alice");
        let pid = query_one(&mut login, "SELECT pg_backend_pid()").await;
        let (key_pid, _) = login.backend_key.expect("BackendKeyData");
        assert_eq!(pid, key_pid.to_string());

        // A second login of the same user reuses the cached certificate and TLS settings.
        let first = upstreams.client_config(&route, "alice").unwrap();
        let second = upstreams.client_config(&route, "alice").unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        let other = upstreams.client_config(&route, "bob").unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
    }

    /// The error of a login that must fail.
    async fn refused(
        upstreams: &Upstreams,
        route: &DatabaseConfig,
        user: &str,
        database: &str,
    ) -> UpstreamError {
        match upstreams.login(route, user, database, &[], TIMEOUT).await {
            Ok(_) => panic!("{user}@{database} at {} logged in", route.upstream.address),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn refusals_map_to_the_client_error_naming_route_and_user() {
        let db = Db::start(vec!["hostssl all pwuser 127.0.0.1/32 password".into()]);
        db.pg.psql("CREATE ROLE pwuser LOGIN PASSWORD 'x'").unwrap();
        let route = db.main_route();
        let upstreams = db.upstreams(&route);

        // Unknown role: the server's own error, with our prefix and a hint naming the role.
        let e = refused(&upstreams, &route, "nobody", "app").await;
        assert!(matches!(e, UpstreamError::Rejected(_)), "{e:?}");
        let c = e.to_client("main", "nobody");
        assert_eq!(c.severity, Severity::Fatal);
        assert_eq!(c.sqlstate, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
        assert!(
            c.message
                .starts_with("db-gateway: database \"main\" refused login as \"nobody\": "),
            "{}",
            c.message
        );
        assert!(c.message.contains("nobody"), "{}", c.message);
        assert!(c.hint.unwrap().contains("role \"nobody\""));

        // Unknown database: the server's SQLSTATE is kept.
        let e = refused(&upstreams, &route, "alice", "nosuchdb").await;
        let c = e.to_client("main", "alice");
        assert_eq!(c.sqlstate, sqlstate::INVALID_CATALOG_NAME, "{c:?}");
        assert!(
            c.message.contains("\"nosuchdb\" does not exist"),
            "{}",
            c.message
        );

        // A password method: the gateway never answers it.
        let e = refused(&upstreams, &route, "pwuser", "app").await;
        assert!(matches!(e, UpstreamError::UnsupportedAuth(3)), "{e:?}");
        let c = e.to_client("main", "pwuser");
        assert_eq!(c.sqlstate, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
        assert!(
            c.message
                .contains("refused certificate login as \"pwuser\""),
            "{}",
            c.message
        );

        // A server certificate for another name: verify-full refuses it.
        let wrong_name = db.route(loopback(db.pg.port).to_string(), "db.example");
        // (A certificate for localhost is not one for db.example.)
        let e = refused(&db.upstreams(&wrong_name), &wrong_name, "alice", "app").await;
        assert!(matches!(e, UpstreamError::Tls { .. }), "{e:?}");
        let c = e.to_client("main", "alice");
        assert_eq!(c.sqlstate, sqlstate::CONNECTION_FAILURE);
        assert!(c.hint.unwrap().contains("server_name"));

        // Nothing listening.
        let closed = db.route(loopback(free_port().unwrap()).to_string(), "localhost");
        let e = refused(&db.upstreams(&closed), &closed, "alice", "app").await;
        assert!(matches!(e, UpstreamError::Unreachable { .. }), "{e:?}");
        let c = e.to_client("main", "alice");
        assert_eq!(c.sqlstate, sqlstate::UNABLE_TO_ESTABLISH_CONNECTION);
        assert!(
            c.message.contains("database \"main\" is unreachable"),
            "{}",
            c.message
        );
    }

    #[test]
    fn a_postgres_route_without_a_ca_is_a_configuration_error() {
        let dir = temp_dir("db-gateway-upstream-test").unwrap();
        pki::init_ca(&dir, "test.local").unwrap();
        let mut route = DatabaseConfig {
            name: "main".into(),
            labels: Default::default(),
            protocol: Protocol::Postgres,
            upstream: UpstreamConfig {
                address: "127.0.0.1:5432".into(),
                auth: Some(UpstreamAuth::Cert),
                tls: UpstreamTlsMode::VerifyFull,
                ca: None,
                server_name: None,
                reuse: None,
            },
        };
        let ttl = Duration::from_secs(60);
        let e = Upstreams::new(client_ca(&dir), ttl, std::slice::from_ref(&route))
            .err()
            .expect("no CA");
        assert!(
            matches!(&e, UpstreamError::Config { db, .. } if db == "main"),
            "{e:?}"
        );
        let c = e.to_client("main", "alice");
        assert_eq!(c.sqlstate, sqlstate::UNABLE_TO_ESTABLISH_CONNECTION);
        // A `tcp` route needs none.
        route.protocol = Protocol::Tcp;
        assert!(Upstreams::new(client_ca(&dir), ttl, &[route]).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_client_parameters_are_forwarded() {
        assert!(is_forwarded_param("application_name"));
        assert!(is_forwarded_param("search_path"));
        assert!(!is_forwarded_param("user"));
        assert!(!is_forwarded_param("database"));
        assert!(!is_forwarded_param("_pq_.anything"));
    }
}
