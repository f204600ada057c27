//! `upstream.reuse`: a server session whose client ended cleanly while idle is reset with
//! `DISCARD ALL` and serves the next client with the same database user, database name and
//! startup parameters; nothing of the first client's session state reaches the second.
//! Sessions ended inside a transaction, killed on the server, idle too long or on a route
//! without reuse are never handed out.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gateway::config::ReuseConfig;
use gateway::harness::{Stack, Workload};

const API: usize = 0;
const WORKER: usize = 1;

fn stack() -> Stack {
    let mut spec = spec();
    spec.workloads = vec![
        Workload::new("team-a", "api"),
        Workload::new("team-b", "worker"),
    ];
    // One proxy thread: kept sessions belong to the thread that logged them in, and the
    // test wants every session on the same one.
    spec.proxy.threads = Some(1);
    spec.upstream_reuse = Some(ReuseConfig {
        max_idle: 2,
        idle_timeout: Duration::from_secs(3),
        ..ReuseConfig::default()
    });
    spec.roles = vec![
        role(
            "team-a",
            "team-a",
            &["main"],
            &["{{ .service_account }}"],
            &["app"],
        ),
        role(
            "team-b",
            "team-b",
            &["main"],
            &["{{ .service_account }}"],
            &["app"],
        ),
    ];
    spec.setup_sql
        .push("GRANT ALL ON DATABASE app TO worker".into());
    Stack::start(spec).expect("start the stack")
}

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn text(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = c.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get(0).unwrap_or("NULL").to_owned())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row: {rows:?}"))
}

/// Connects and returns the client and its connection task (which ends after the client
/// is dropped and tokio-postgres has sent `Terminate`).
async fn open(
    s: &Stack,
    i: usize,
    user: &str,
    extra: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let url = format!("{} {extra}", s.conn_string(i, user, "app"));
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

async fn close(c: (tokio_postgres::Client, tokio::task::JoinHandle<()>)) {
    drop(c.0);
    tokio::time::timeout(Duration::from_secs(10), c.1)
        .await
        .expect("connection ended")
        .unwrap();
}

fn kept(s: &Stack) -> f64 {
    metric(
        &scrape(s.proxy_admin),
        "gateway_proxy_upstream_kept_sessions",
    )
    .unwrap_or(0.0)
}

fn reuse_count(s: &Stack, result: &str) -> f64 {
    result_count(s.proxy_admin, "gateway_proxy_upstream_reuse_total", result)
}

fn backend_alive(s: &Stack, pid: i32) -> bool {
    s.pg.psql(&format!(
        "select count(*) from pg_stat_activity where pid = {pid}"
    ))
    .unwrap()
    .trim()
        == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_session_is_reset_and_serves_only_the_same_user_and_parameters() {
    let s = stack();

    let first = open(&s, API, "api", "").await;
    let c = &first.0;
    let first_pid = pid(c).await;
    let default_work_mem = text(c, "show work_mem").await;
    c.batch_execute(
        "set work_mem = '7MB';
         create temp table scratch (x int);
         prepare p as select 1;
         select pg_advisory_lock(42);
         listen chan;
         set search_path = pg_catalog",
    )
    .await
    .unwrap();
    close(first).await;
    wait_for("the session to be kept", || kept(&s) == 1.0).await;
    assert!(backend_alive(&s, first_pid), "the kept backend stays");

    let second = open(&s, API, "api", "").await;
    let c = &second.0;
    assert_eq!(pid(c).await, first_pid, "the kept server session serves it");
    assert_eq!(kept(&s), 0.0);
    assert_eq!(reuse_count(&s, "reused"), 1.0);
    // DISCARD ALL left nothing of the first client's session.
    assert_eq!(text(c, "show work_mem").await, default_work_mem);
    assert_eq!(text(c, "show search_path").await, "\"$user\", public");
    assert_eq!(text(c, "select current_user").await, "api");
    assert_eq!(text(c, "select to_regclass('scratch') is null").await, "t");
    let e = c.simple_query("execute p").await.unwrap_err();
    assert_eq!(sqlstate(&e), "26000", "prepared statement gone: {e}");
    assert_eq!(
        text(
            c,
            "select count(*) from pg_locks where locktype = 'advisory'"
        )
        .await,
        "0"
    );
    assert_eq!(
        text(c, "select count(*) from pg_listening_channels()").await,
        "0"
    );

    // A different database user or different startup parameters never take it.
    close(second).await;
    wait_for("the session to be kept again", || kept(&s) == 1.0).await;
    let worker = open(&s, WORKER, "worker", "").await;
    assert_ne!(pid(&worker.0).await, first_pid);
    assert_eq!(text(&worker.0, "select current_user").await, "worker");
    let named = open(&s, API, "api", "application_name=other").await;
    assert_ne!(pid(&named.0).await, first_pid);
    assert_eq!(text(&named.0, "show application_name").await, "other");
    assert_eq!(kept(&s), 1.0, "still kept for its own key");
    close(worker).await;
    close(named).await;

    // The audit log says which sessions were served by a kept server session.
    let starts: Vec<_> = s
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "db.session.start" && e["db_user"] == "api")
        .collect();
    assert!(starts.len() >= 3, "{starts:?}");
    assert!(starts[0].get("upstream_reused").is_none(), "{}", starts[0]);
    assert_eq!(starts[1]["upstream_reused"], true, "{}", starts[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_transaction_killed_backend_and_expiry_are_not_reused_and_drain_closes() {
    let mut s = stack();

    // Ended inside a transaction: the server session ends with the client.
    let busy = open(&s, API, "api", "").await;
    let busy_pid = pid(&busy.0).await;
    busy.0.batch_execute("begin; select 1").await.unwrap();
    close(busy).await;
    wait_for("the backend to end", || !backend_alive(&s, busy_pid)).await;
    assert_eq!(kept(&s), 0.0);

    // Killed while kept: not handed out; the client gets a fresh login that works.
    let victim = open(&s, API, "api", "").await;
    let victim_pid = pid(&victim.0).await;
    close(victim).await;
    wait_for("the session to be kept", || kept(&s) == 1.0).await;
    s.pg.psql(&format!("select pg_terminate_backend({victim_pid})"))
        .unwrap();
    wait_for("the backend to end", || !backend_alive(&s, victim_pid)).await;
    let fresh = open(&s, API, "api", "").await;
    let fresh_pid = pid(&fresh.0).await;
    assert_ne!(fresh_pid, victim_pid);
    assert_eq!(reuse_count(&s, "server_closed"), 1.0);
    close(fresh).await;

    // Idle longer than idle_timeout (3 s): closed by the sweeper, backend gone.
    wait_for("the session to be kept", || kept(&s) == 1.0).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(kept(&s), 0.0);
    assert_eq!(reuse_count(&s, "idle_timeout"), 1.0);
    wait_for("the expired backend to end", || {
        !backend_alive(&s, fresh_pid)
    })
    .await;

    // Drain closes kept sessions: the proxy exits and their backends end.
    let last = open(&s, API, "api", "").await;
    let last_pid = pid(&last.0).await;
    close(last).await;
    wait_for("the session to be kept", || kept(&s) == 1.0).await;
    let mut proxy = s.terminate_proxy().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "proxy exits after drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("the kept backend to end on drain", || {
        !backend_alive(&s, last_pid)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reuse_every_client_session_logs_in() {
    // The shared test stack leaves `upstream.reuse` out: the default.
    let s = common::stack();
    let a = open(&s, TEAM_A_API, "api", "").await;
    let a_pid = pid(&a.0).await;
    close(a).await;
    let b = open(&s, TEAM_A_API, "api", "").await;
    assert_ne!(pid(&b.0).await, a_pid);
    close(b).await;
    wait_for("the first backend to end", || !backend_alive(&s, a_pid)).await;
    assert_eq!(kept(&s), 0.0);
    assert_eq!(reuse_count(&s, "reused"), 0.0);
}
