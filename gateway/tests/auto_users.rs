//! Issue 19, automatic database users (Teleport's model per policy role): the proxy, as
//! the route's `upstream.admin_user`, creates the decided user on its first session,
//! keeps its roles in step with the policy, and retires it after its last session
//! (`keep`: roles revoked and NOLOGIN; `best_effort_drop`: dropped unless objects depend
//! on it). Against the harness's real PostgreSQL, whose pg_hba lets any user log in by
//! certificate.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gateway::config::{CreateDbUserMode, RoleConfig};
use gateway::harness::{PgRoute, Stack, StackSpec, Workload};

const AUTO_SVC: usize = 4;
const AUTO_OTHER: usize = 5;
const DROP_A: usize = 6;
const DROP_B: usize = 7;
const AUTO_MANY: usize = 8;
const WEAK_SVC: usize = 9;
const AUTO_PAIR: usize = 10;

fn auto_spec() -> StackSpec {
    let mut spec = spec();
    let on_auto = |ns: &str, sa: &str| Workload {
        route: "auto".into(),
        ..Workload::new(ns, sa)
    };
    spec.workloads.extend([
        on_auto("auto", "svc"),
        on_auto("auto", "other"),
        on_auto("drop", "a"),
        on_auto("drop", "b"),
        on_auto("auto", "many"),
        Workload {
            route: "weak".into(),
            ..Workload::new("weak", "svc")
        },
        on_auto("auto", "pair"),
    ]);
    // A route whose admin user lacks CREATEROLE.
    spec.pg_routes.push(PgRoute {
        name: "weak".into(),
        reuse: None,
        admin_user: Some("weak_admin".into()),
    });
    spec.roles.push(RoleConfig {
        force_db_user: true,
        force_db_name: true,
        create_db_user_mode: CreateDbUserMode::Keep,
        ..role(
            "weak",
            "weak",
            &["weak"],
            &["weak_{{ .service_account }}"],
            &["app"],
        )
    });
    spec.pg_routes.push(PgRoute {
        name: "auto".into(),
        reuse: None,
        admin_user: Some("gateway_admin".into()),
    });
    spec.roles.push(RoleConfig {
        force_db_user: true,
        force_db_name: true,
        create_db_user_mode: CreateDbUserMode::Keep,
        db_roles: vec!["reader".into()],
        ..role(
            "auto",
            "auto",
            &["auto"],
            &["auto_{{ .service_account }}"],
            &["app"],
        )
    });
    spec.roles.push(RoleConfig {
        force_db_user: true,
        force_db_name: true,
        create_db_user_mode: CreateDbUserMode::BestEffortDrop,
        db_roles: vec!["reader".into()],
        ..role(
            "drop",
            "drop",
            &["auto"],
            &["drop_{{ .service_account }}"],
            &["app"],
        )
    });
    spec.setup_sql.extend(
        [
            "CREATE ROLE gateway_admin LOGIN CREATEROLE",
            "CREATE ROLE weak_admin LOGIN",
            "CREATE ROLE reader NOLOGIN",
            "CREATE ROLE writer NOLOGIN",
            // Someone else's user: never altered.
            "CREATE ROLE auto_other LOGIN",
        ]
        .map(String::from),
    );
    spec
}

fn auto_stack() -> Stack {
    let s = Stack::start(auto_spec()).expect("start the stack");
    s.pg.psql_db("app", "GRANT CREATE ON SCHEMA public TO reader")
        .unwrap();
    s
}

fn sql(s: &Stack, q: &str) -> String {
    s.pg.psql(q).unwrap().trim().to_owned()
}

/// `(can log in, member of the marker, other roles)` or `None` when the role is gone.
fn user_state(s: &Stack, user: &str) -> Option<(bool, bool, Vec<String>)> {
    let login = sql(
        s,
        &format!("SELECT rolcanlogin FROM pg_roles WHERE rolname = '{user}'"),
    );
    if login.is_empty() {
        return None;
    }
    let roles: Vec<String> = sql(
        s,
        &format!(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
             JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = '{user}' ORDER BY 1"
        ),
    )
    .lines()
    .map(str::to_owned)
    .collect();
    let marked = roles.iter().any(|r| r == "gateway-auto-user");
    let others = roles
        .into_iter()
        .filter(|r| r != "gateway-auto-user")
        .collect();
    Some((login == "t", marked, others))
}

fn user_events(s: &Stack, user: &str) -> Vec<serde_json::Value> {
    only_user(s.audit_events(), user)
}

fn only_user(events: Vec<serde_json::Value>, user: &str) -> Vec<serde_json::Value> {
    events
        .into_iter()
        .filter(|e| {
            e["event"]
                .as_str()
                .is_some_and(|x| x.starts_with("db.user."))
                && e["db_user"] == user
        })
        .collect()
}

async fn wait_state(s: &Stack, user: &str, want: Option<(bool, bool, Vec<String>)>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = user_state(s, user);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{user}: {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn current_user(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_1_first_session_creates_grants_and_audits() {
    let s = auto_stack();
    assert_eq!(user_state(&s, "auto_svc"), None);
    let c = connect(&s, AUTO_SVC, "whatever", "app").await.unwrap();
    assert_eq!(current_user(&c).await, "auto_svc");
    assert_eq!(
        user_state(&s, "auto_svc"),
        Some((true, true, vec!["reader".into()]))
    );
    // The marker role exists and cannot log in.
    assert_eq!(
        sql(
            &s,
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'gateway-auto-user'"
        ),
        "f"
    );
    let events = user_events(&s, "auto_svc");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["event"], "db.user.create");
    assert_eq!(
        e["identity"],
        "spiffe://demo.db-gateway.local/ns/auto/sa/svc"
    );
    assert_eq!(e["database_route"], "auto");
    assert_eq!(e["roles"], serde_json::json!(["reader"]));
    assert_eq!(e["result"], "success");
    assert!(e["session_id"].is_string() && e["time"].is_string(), "{e}");
    let text = scrape(s.proxy_admin);
    assert_eq!(
        metric_with(
            &text,
            "gateway_proxy_db_user_changes_total",
            "action=\"create\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "gateway_proxy_db_user_change_errors_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_2_keep_deactivates_after_the_last_session_and_reactivates() {
    let s = auto_stack();
    let c1 = connect(&s, AUTO_SVC, "x", "app").await.unwrap();
    let c2 = connect(&s, AUTO_SVC, "x", "app").await.unwrap();
    drop(c1);
    // One session is still open: nothing changes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        user_state(&s, "auto_svc"),
        Some((true, true, vec!["reader".into()]))
    );
    assert_eq!(current_user(&c2).await, "auto_svc");
    drop(c2);
    wait_state(&s, "auto_svc", Some((false, true, vec![]))).await;
    let events = user_events(&s, "auto_svc");
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["db.user.create", "db.user.deactivate"],
        "{events:?}"
    );
    assert_eq!(events[1]["revoked"], serde_json::json!(["reader"]));

    // The next session re-enables it and grants its roles again.
    let c = connect(&s, AUTO_SVC, "x", "app").await.unwrap();
    assert_eq!(current_user(&c).await, "auto_svc");
    assert_eq!(
        user_state(&s, "auto_svc"),
        Some((true, true, vec!["reader".into()]))
    );
    let events = user_events(&s, "auto_svc");
    assert_eq!(
        events.last().unwrap()["event"],
        "db.user.update",
        "{events:?}"
    );
    assert_eq!(
        events.last().unwrap()["granted"],
        serde_json::json!(["reader"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_3_roles_follow_a_policy_change() {
    let s = auto_stack();
    let open = connect(&s, AUTO_SVC, "x", "app").await.unwrap();
    // The policy now grants writer instead of reader.
    let original = std::fs::read_to_string(&s.proxy_config).unwrap();
    let mut cfg: serde_norway::Value = serde_norway::from_str(&original).unwrap();
    for r in cfg["roles"].as_sequence_mut().unwrap() {
        if r["name"].as_str() == Some("auto") {
            r["db_roles"] = serde_norway::from_str("[writer]").unwrap();
        }
    }
    std::fs::write(&s.proxy_config, serde_norway::to_string(&cfg).unwrap()).unwrap();
    let pid = s.proxy.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while result_count(
        s.proxy_admin,
        "gateway_proxy_config_reloads_total",
        "success",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = connect(&s, AUTO_SVC, "x", "app").await.unwrap();
    assert_eq!(current_user(&c).await, "auto_svc");
    assert_eq!(
        user_state(&s, "auto_svc"),
        Some((true, true, vec!["writer".into()]))
    );
    let events = user_events(&s, "auto_svc");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "db.user.update", "{events:?}");
    assert_eq!(last["granted"], serde_json::json!(["writer"]));
    assert_eq!(last["revoked"], serde_json::json!(["reader"]));
    assert_eq!(last["roles"], serde_json::json!(["writer"]));
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_4_an_existing_user_without_the_marker_is_refused() {
    let s = auto_stack();
    let e = connect(&s, AUTO_OTHER, "x", "app").await.unwrap_err();
    assert_eq!(sqlstate(&e), "28000", "{e:?}");
    let db = e.as_db_error().unwrap();
    assert!(
        db.message().contains("\"auto_other\"") && db.message().contains("not managed"),
        "{db:?}"
    );
    assert!(db.hint().unwrap().contains("gateway-auto-user"), "{db:?}");
    // Untouched.
    assert_eq!(user_state(&s, "auto_other"), Some((true, false, vec![])));
    assert!(user_events(&s, "auto_other").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_5_best_effort_drop_drops_or_keeps_a_user_that_owns_objects() {
    let s = auto_stack();
    let a = connect(&s, DROP_A, "x", "app").await.unwrap();
    assert_eq!(current_user(&a).await, "drop_a");
    drop(a);
    wait_state(&s, "drop_a", None).await;
    let events = user_events(&s, "drop_a");
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db.user.create", "db.user.drop"], "{events:?}");

    // A table depends on drop_b: it is kept, deactivated.
    let b = connect(&s, DROP_B, "x", "app").await.unwrap();
    b.batch_execute("CREATE TABLE owned_by_b (x int)")
        .await
        .unwrap();
    drop(b);
    wait_state(&s, "drop_b", Some((false, true, vec![]))).await;
    let events = user_events(&s, "drop_b");
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["db.user.create", "db.user.deactivate"],
        "{events:?}"
    );
    assert_eq!(
        s.pg.psql_db(
            "app",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'owned_by_b'"
        )
        .unwrap()
        .trim(),
        "drop_b"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_6_concurrent_first_sessions_create_the_user_once() {
    let s = auto_stack();
    let sessions =
        futures_util::future::join_all((0..16).map(|_| connect(&s, AUTO_MANY, "x", "app"))).await;
    let mut clients = Vec::new();
    for r in sessions {
        let c = r.expect("every first session succeeds");
        assert_eq!(current_user(&c).await, "auto_many");
        clients.push(c);
    }
    let events = user_events(&s, "auto_many");
    let creates = events
        .iter()
        .filter(|e| e["event"] == "db.user.create")
        .count();
    assert_eq!(creates, 1, "{events:?}");
    assert!(
        events.iter().all(|e| e["result"] == "success"),
        "{events:?}"
    );
    drop(clients);
    wait_state(&s, "auto_many", Some((false, true, vec![]))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_7_an_admin_without_createrole_gives_42501_with_a_hint() {
    let s = auto_stack();
    let e = connect(&s, WEAK_SVC, "x", "app").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    let db = e.as_db_error().unwrap();
    assert!(
        db.message()
            .contains("cannot provision database user \"weak_svc\" on \"weak\" as \"weak_admin\""),
        "{db:?}"
    );
    assert!(db.hint().unwrap().contains("CREATEROLE"), "{db:?}");
    assert_eq!(user_state(&s, "weak_svc"), None);
    let events = user_events(&s, "weak_svc");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "db.user.create");
    assert_eq!(events[0]["result"], "error");
    assert_eq!(events[0]["error_code"], "42501");
    let text = scrape(s.proxy_admin);
    assert_eq!(
        metric_with(
            &text,
            "gateway_proxy_db_user_change_errors_total",
            "action=\"create\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "gateway_proxy_db_user_changes_total"),
        Some(0.0)
    );
}

/// Issue 19: "20 concurrent first sessions for one user through two proxy processes all
/// succeed and create it once". Two `gateway proxy` processes on the same policy and
/// database, each with its own node agent, ten first sessions through each at once: the
/// advisory lock in the database serializes them across the processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_users_8_twenty_first_sessions_through_two_proxies_create_the_user_once() {
    let s = auto_stack();
    let r = s.start_replica(2).expect("start a second proxy and node");
    let through = |via_replica: bool| {
        let conn = if via_replica {
            r.conn_string(AUTO_PAIR, "x", "app")
        } else {
            s.conn_string(AUTO_PAIR, "x", "app")
        };
        async move {
            let (client, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    let sessions = futures_util::future::join_all((0..20).map(|i| through(i % 2 == 1))).await;
    let mut clients = Vec::new();
    for r in sessions {
        let c = r.expect("every first session succeeds");
        assert_eq!(current_user(&c).await, "auto_pair");
        clients.push(c);
    }
    // Created once, in the database and in the audit logs of both proxies together.
    assert_eq!(
        sql(
            &s,
            "SELECT count(*) FROM pg_roles WHERE rolname = 'auto_pair'"
        ),
        "1"
    );
    assert_eq!(
        user_state(&s, "auto_pair"),
        Some((true, true, vec!["reader".into()]))
    );
    let (first, second) = (s.audit_events(), r.audit_events());
    let starts = |events: &[serde_json::Value]| {
        events
            .iter()
            .filter(|e| e["event"] == "db.session.start" && e["db_user"] == "auto_pair")
            .filter(|e| e["result"] == "success")
            .count()
    };
    // The sessions really were split across the two processes.
    assert_eq!((starts(&first), starts(&second)), (10, 10));
    let events: Vec<serde_json::Value> = only_user(first, "auto_pair")
        .into_iter()
        .chain(only_user(second, "auto_pair"))
        .collect();
    let creates = events
        .iter()
        .filter(|e| e["event"] == "db.user.create")
        .count();
    assert_eq!(creates, 1, "{events:?}");
    assert!(
        events.iter().all(|e| e["result"] == "success"),
        "{events:?}"
    );
    // The metric agrees: one create between the two processes.
    let created = |admin| {
        metric_with(
            &scrape(admin),
            "gateway_proxy_db_user_changes_total",
            "action=\"create\"",
        )
        .unwrap()
    };
    assert_eq!(created(s.proxy_admin) + created(r.proxy_admin), 1.0);
    // After the last session, whichever proxy ends it, the user is retired once.
    drop(clients);
    wait_state(&s, "auto_pair", Some((false, true, vec![]))).await;
    // Its audit record follows the change in the database by a moment.
    let deactivations = || {
        only_user(s.audit_events(), "auto_pair")
            .into_iter()
            .chain(only_user(r.audit_events(), "auto_pair"))
            .filter(|e| e["event"] == "db.user.deactivate")
            .count()
    };
    wait_for("the deactivation's audit record", || deactivations() >= 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(deactivations(), 1);
}
