//! Issue 19, the seed's flow as one test (`../shared/seeds/`: Temporal on EKS reaching
//! Amazon RDS without passwords, database users created on demand). The workload is the
//! Temporal pod's identity, `temporal/temporal`, through the node and the proxy; the
//! policy is the seed's `temporal-db-auto-user` role (`db_names: [temporal,
//! temporal_visibility]`, `db_roles` from the policy, one of them templated,
//! `create_db_user_mode: keep`); the route is `auth: rds-iam` to the harness's RDS-style
//! front, which verifies every IAM token and, as RDS does, asks a role that is not a
//! member of `rds_iam` for a password instead. So the admin user logs in by IAM token and
//! the user it creates can log in only because it was granted `rds_iam`.
//!
//! Temporal's SQL driver always sends a password, so the client is `psql` (the real
//! binary) with a dummy one, in the URL and in `PGPASSWORD`: the gateway never asks for it
//! and never passes it on.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use gateway::config::{
    CreateDbUserMode, DatabaseConfig, MatchConfig, RoleConfig, UpstreamAuth, UpstreamConfig,
    UpstreamTlsMode,
};
use gateway::harness::aws::CredentialEndpoint;
use gateway::harness::rds::{AwsKeys, Endpoint, RdsFront, RdsFrontOptions};
use gateway::harness::{Stack, Workload, temp_dir};

const REGION: &str = "ca-central-1";
const IAM_HOST: &str = "temporal-db.c3fvtofx6sjs.ca-central-1.rds.amazonaws.com";
/// The seed's `teleport-admin`: `CREATE USER … WITH CREATEROLE; GRANT rds_iam … WITH ADMIN
/// OPTION`.
const ADMIN: &str = "gateway-admin";
/// The seed's database user of the Temporal bot.
const USER: &str = "bot-temporal";
/// What Temporal's Helm values give as the password.
const DUMMY: &str = "dummypass";
const JWT: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGItZ2F0ZXdheTpwcm94eSJ9.c2ln";

/// `psql` as Temporal's driver would connect: `conn` names the user, the database and a
/// password; `PGPASSWORD` holds the dummy password as well.
fn psql(conn: &str, sql: &str) -> Output {
    Command::new("psql")
        .arg(conn)
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", DUMMY)
        .output()
        .expect("psql runs (package postgresql-client-15)")
}

fn rds_route(front: &RdsFront) -> DatabaseConfig {
    DatabaseConfig {
        name: "rds".into(),
        labels: Default::default(),
        protocol: gateway::route::Protocol::Postgres,
        upstream: UpstreamConfig {
            address: front.addr.to_string(),
            auth: Some(UpstreamAuth::RdsIam),
            tls: UpstreamTlsMode::VerifyFull,
            ca: Some(front.ca.clone()),
            server_name: Some("localhost".into()),
            region: Some(REGION.into()),
            iam_host: Some(IAM_HOST.into()),
            account_id: None,
            resource_id: None,
            reuse: None,
            startup_parameters: Vec::new(),
            admin_user: Some(ADMIN.into()),
        },
    }
}

/// `(can log in, member of gateway-auto-user, its other roles)`, `None` when it is gone.
fn user_state(s: &Stack) -> Option<(bool, bool, Vec<String>)> {
    let login =
        s.pg.psql(&format!(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = '{USER}'"
        ))
        .unwrap();
    if login.trim().is_empty() {
        return None;
    }
    let roles: Vec<String> =
        s.pg.psql(&format!(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
             JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = '{USER}' ORDER BY 1"
        ))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let marked = roles.iter().any(|r| r == "gateway-auto-user");
    let others = roles
        .into_iter()
        .filter(|r| r != "gateway-auto-user")
        .collect();
    Some((login.trim() == "t", marked, others))
}

async fn wait_state(s: &Stack, want: Option<(bool, bool, Vec<String>)>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = user_state(s);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{USER}: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_token_file(dir: &Path) -> String {
    let p = dir.join("token");
    std::fs::write(&p, JWT).unwrap();
    p.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporal_on_rds_with_an_automatic_user_and_a_dummy_password() {
    // The proxy's AWS identity (EKS Pod Identity) and the RDS instance in front of the real
    // PostgreSQL; IAM allows rds-db:connect as the admin and as the bot's user.
    let keys = AwsKeys::default();
    let agent = CredentialEndpoint::container(keys.clone(), JWT, Duration::from_secs(3600))
        .expect("container credentials endpoint");
    let front = RdsFront::start(RdsFrontOptions {
        endpoint: Endpoint {
            host: IAM_HOST.into(),
            port: 0,
            region: REGION.into(),
        },
        keys: keys.clone(),
        iam_users: vec![ADMIN.into(), USER.into()],
        clock_ahead: Duration::ZERO,
        plain: false,
        without_rds_iam: Vec::new(),
        rds_iam_from_database: true,
        iam_secret_differs: false,
    })
    .expect("RDS front");
    let dir = temp_dir("db-gateway-temporal").unwrap();

    let mut spec = spec();
    spec.workloads = vec![Workload {
        route: "rds".into(),
        ..Workload::new("temporal", "temporal")
    }];
    spec.extra_databases = vec![rds_route(&front)];
    // The seed's temporal-db-auto-user role, for the Temporal pod's identity.
    spec.roles = vec![RoleConfig {
        matcher: MatchConfig {
            namespace: Some("temporal".into()),
            service_account: Some("temporal".into()),
            ..MatchConfig::default()
        },
        create_db_user_mode: CreateDbUserMode::Keep,
        db_roles: vec![
            "pg_read_all_data".into(),
            "pg_write_all_data".into(),
            "{{ .namespace }}_owner".into(),
        ],
        ..role(
            "temporal-db-auto-user",
            "temporal",
            &["rds"],
            &["bot-{{ .service_account }}"],
            &["temporal", "temporal_visibility"],
        )
    }];
    // RDS has rds_iam; the admin user is the seed's; the databases were made by the
    // schema tool (here owned by a role the policy grants, so the bot can create tables).
    let admin = format!("\"{ADMIN}\"");
    spec.setup_sql.extend([
        "CREATE ROLE rds_iam NOLOGIN".to_owned(),
        format!("CREATE ROLE {admin} LOGIN CREATEROLE"),
        "CREATE ROLE temporal_owner NOLOGIN".to_owned(),
        format!(
            "GRANT rds_iam, pg_read_all_data, pg_write_all_data, temporal_owner TO {admin} WITH ADMIN OPTION"
        ),
        "CREATE DATABASE temporal OWNER temporal_owner".to_owned(),
        "CREATE DATABASE temporal_visibility OWNER temporal_owner".to_owned(),
    ]);
    spec.proxy.env = vec![
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
            agent.url("/v1/credentials"),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
            write_token_file(&dir),
        ),
        ("AWS_CONFIG_FILE".into(), "/nonexistent/config".into()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            "/nonexistent/credentials".into(),
        ),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ];
    let s = Stack::start(spec).expect("start the stack");
    front.set_backend(s.pg.socket_dir.clone(), s.pg.port);
    assert_eq!(user_state(&s), None);
    let listener = s.listeners[0];

    // Persistence: the password in the URL (and PGPASSWORD), as Temporal's DSN has it.
    let url = format!(
        "postgresql://{USER}:{DUMMY}@{}:{}/temporal?sslmode=disable",
        listener.ip(),
        listener.port()
    );
    let out = stdout(&psql(
        &url,
        "CREATE TABLE executions (shard_id int PRIMARY KEY, data bytea); \
         INSERT INTO executions VALUES (1, 'x'); \
         SELECT current_user || '@' || current_database() || ' ' || count(*) FROM executions",
    ));
    assert_eq!(out, format!("{USER}@temporal 1"));
    let all = vec![
        "pg_read_all_data".to_owned(),
        "pg_write_all_data".to_owned(),
        "rds_iam".to_owned(),
        "temporal_owner".to_owned(),
    ];
    // keep: once the session is over, no roles and NOLOGIN, the user itself kept.
    wait_state(&s, Some((false, true, Vec::new()))).await;

    // Visibility: key=value parameters with the password, the next session re-enables it.
    let conn = format!(
        "host={} port={} user={USER} dbname=temporal_visibility password={DUMMY} sslmode=disable",
        listener.ip(),
        listener.port()
    );
    let out = stdout(&psql(
        &conn,
        "CREATE TABLE executions_visibility (namespace_id text, run_id text PRIMARY KEY); \
         INSERT INTO executions_visibility VALUES ('default', 'r1'); \
         SELECT current_user || '@' || current_database() || ' ' || count(*) FROM executions_visibility",
    ));
    assert_eq!(out, format!("{USER}@temporal_visibility 1"));
    wait_state(&s, Some((false, true, Vec::new()))).await;

    // The tables are the bot's, in both databases.
    for (db, table) in [
        ("temporal", "executions"),
        ("temporal_visibility", "executions_visibility"),
    ] {
        let owner =
            s.pg.psql_db(
                db,
                &format!("SELECT tableowner FROM pg_tables WHERE tablename = '{table}'"),
            )
            .unwrap();
        assert_eq!(owner.trim(), USER, "{db}");
    }

    // Every login reached RDS with an IAM token (admin and bot), none with the password;
    // the front refused nothing.
    assert!(
        front.refused.lock().unwrap().is_empty(),
        "{:?}",
        front.refused
    );
    assert!(front.accepted.lock().unwrap().len() >= 6);

    // The audit log: the user's creation with its roles, each session, the deactivation
    // after it, the re-enabling update.
    let events: Vec<serde_json::Value> = s
        .audit_events()
        .into_iter()
        .filter(|e| e["db_user"] == USER)
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "db.user.create",
            "db.session.start",
            "db.session.end",
            "db.user.deactivate",
            "db.user.update",
            "db.session.start",
            "db.session.end",
            "db.user.deactivate",
        ],
        "{events:#?}"
    );
    let identity = "spiffe://demo.db-gateway.local/ns/temporal/sa/temporal";
    for e in &events {
        assert_eq!(e["identity"], identity, "{e}");
        assert_eq!(e["database_route"], "rds", "{e}");
        assert_eq!(e["result"], "success", "{e}");
    }
    assert_eq!(events[0]["roles"], serde_json::json!(all));
    assert_eq!(events[1]["db_name"], "temporal");
    assert_eq!(events[1]["role"], "temporal-db-auto-user");
    assert_eq!(events[3]["revoked"], serde_json::json!(all));
    assert_eq!(events[4]["granted"], serde_json::json!(all));
    assert_eq!(events[5]["db_name"], "temporal_visibility");

    // The dummy password went nowhere.
    for log in ["proxy", "node"] {
        assert!(!s.log(log).contains(DUMMY), "{log} log has the password");
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
