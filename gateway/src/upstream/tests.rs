//! `upstream` against a real PostgreSQL 15 (the harness's `localdb`: `hostssl … cert`
//! only), as the proxy meets it in production.

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
                region: None,
                iam_host: None,
                account_id: None,
                resource_id: None,
                reuse: None,
                startup_parameters: Vec::new(),
                admin_user: None,
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
    assert_eq!(login.backend.addr, loopback(db.pg.port));
    assert_eq!(
        login.backend.ready.first(),
        Some(&b'Z'),
        "{:?}",
        login.backend.ready
    );
    assert!(login.rest.is_empty());
    let params = parameters(&login.backend.greeting);
    let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(param("application_name"), Some("unit-test"), "{params:?}");
    assert_eq!(param("session_authorization"), Some("alice"), "{params:?}");

    assert_eq!(query_one(&mut login, "SELECT current_user").await, "alice");
    assert_eq!(
        query_one(&mut login, "SELECT current_database()").await,
        "app"
    );
    // The session is TLS with the certificate the proxy issued (CN = database user).
    let ssl = "SELECT ssl::text || ' ' || client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert_eq!(query_one(&mut login, ssl).await, "true /CN=alice");
    let pid = query_one(&mut login, "SELECT pg_backend_pid()").await;
    let (key_pid, _) = login.backend.key.expect("BackendKeyData");
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
    let db = Db::start(vec![
        "hostssl all pwuser 127.0.0.1/32 password".into(),
        "hostssl all md5user 127.0.0.1/32 md5".into(),
        "hostssl all scramuser 127.0.0.1/32 scram-sha-256".into(),
    ]);
    db.pg.psql("CREATE ROLE pwuser LOGIN PASSWORD 'x'").unwrap();
    // An MD5-stored password: PostgreSQL 15 answers the md5 method with SCRAM otherwise.
    db.pg
        .psql("SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'x'")
        .unwrap();
    db.pg
        .psql("CREATE ROLE scramuser LOGIN PASSWORD 'x'")
        .unwrap();
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

    // Password methods: a certificate route holds no password to answer them with.
    for (user, method) in [
        ("pwuser", "cleartext password"),
        ("md5user", "MD5"),
        ("scramuser", "SCRAM"),
    ] {
        let e = refused(&upstreams, &route, user, "app").await;
        assert!(
            matches!(e, UpstreamError::PasswordNotHeld(m) if m == method),
            "{e:?}"
        );
        let c = e.to_client("main", user);
        assert_eq!(c.sqlstate, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
        assert_eq!(
            c.message,
            format!(
                "db-gateway: database \"main\" refused login as \"{user}\": server asked for a password the gateway does not hold ({method})"
            )
        );
    }

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
            region: None,
            iam_host: None,
            account_id: None,
            resource_id: None,
            reuse: None,
            startup_parameters: Vec::new(),
            admin_user: None,
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

/// The `rds-db:connect` hint names the whole ARN when the route gives the account and the
/// resource id, and keeps placeholders for what it does not.
#[test]
fn rds_hints_name_the_configured_arn() {
    let mut upstream: crate::config::UpstreamConfig = serde_norway::from_str(
        "{address: 'db:5432', auth: rds-iam, region: ca-central-1, ca: c, account_id: '123456789012', resource_id: db-ABCDEFGHIJKL01234}",
    )
    .unwrap();
    let full = "arn:aws:rds-db:ca-central-1:123456789012:dbuser:db-ABCDEFGHIJKL01234/bot-temporal";
    let refused = UpstreamError::IamRejected {
        error: Box::new(ErrorResponse::fatal(
            "28P01",
            "PAM authentication failed for user \"bot-temporal\"",
        )),
        arn: upstream.rds_db_user_arn("bot-temporal"),
    }
    .to_client("rds", "bot-temporal");
    assert_eq!(refused.sqlstate, "28P01");
    assert!(
        refused.hint.as_deref().unwrap().starts_with(&format!(
            "The proxy's AWS identity needs rds-db:connect on {full}, "
        )),
        "{refused:?}"
    );
    let no_credentials = UpstreamError::RdsToken {
        error: super::rds_iam::RdsIamError::Credentials("none".into()),
        arn: upstream.rds_db_user_arn("bot-temporal"),
    }
    .to_client("rds", "bot-temporal");
    assert_eq!(no_credentials.sqlstate, "28000");
    assert!(
        no_credentials
            .hint
            .as_deref()
            .unwrap()
            .contains(&format!("allowed rds-db:connect on {full};")),
        "{no_credentials:?}"
    );
    upstream.account_id = None;
    upstream.resource_id = None;
    let placeholders = UpstreamError::RdsToken {
        error: super::rds_iam::RdsIamError::Credentials("none".into()),
        arn: upstream.rds_db_user_arn("u"),
    }
    .to_client("rds", "u");
    assert!(
        placeholders.hint.as_deref().unwrap().contains(
            "rds-db:connect on arn:aws:rds-db:ca-central-1:<account>:dbuser:<resource-id>/u;"
        ),
        "{placeholders:?}"
    );
}
