//! Issue 18, hardening: policy, listeners, audit and files (items 4, 5, 11, 12, 13). Each test
//! is named after the item it proves and fails on the code before its fix.

mod common;

use std::process::Command;

use common::*;
use gateway::harness::{Stack, Workload};

/// team-a's identities with a service account named like the superuser (index 4), and a
/// role `secret_reader` that `api` is a member of, which `SET ROLE` would reach.
fn reserved_stack() -> (Stack, usize) {
    let mut spec = spec();
    spec.workloads.push(Workload::new("team-a", "postgres"));
    spec.setup_sql.extend([
        "CREATE ROLE secret_reader NOLOGIN".to_owned(),
        "GRANT secret_reader TO api".to_owned(),
    ]);
    let i = spec.workloads.len() - 1;
    (Stack::start(spec).expect("stack"), i)
}

async fn connect_with(
    s: &Stack,
    i: usize,
    user: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conn = format!("{} {extra}", s.conn_string(i, user, "app"));
    let (client, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Item 4: the superuser is never reached through a template, and no startup parameter
/// changes the role the policy chose. Before the fix, team-a/postgres logged in as the
/// superuser and `options=-c role=secret_reader` ran as that role.
#[tokio::test]
async fn hardening_04_reserved_users_and_privileged_startup_parameters_are_refused() {
    let (s, superuser_sa) = reserved_stack();

    let e = connect_with(&s, superuser_sa, "postgres", "")
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "42501", "{e}");
    assert!(
        db.message().starts_with("db-gateway: identity spiffe://"),
        "{e}"
    );
    assert!(
        db.message().contains("reserved database user \"postgres\""),
        "{e}"
    );
    assert!(db.hint().unwrap().contains("lists them literally"), "{e}");

    for (extra, param) in [
        ("options='-c role=secret_reader'", "role"),
        (
            "options='-csession_authorization=postgres'",
            "session_authorization",
        ),
        ("options='--role=secret_reader'", "role"),
    ] {
        let e = connect_with(&s, TEAM_A_API, "api", extra)
            .await
            .unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{extra}: {e}"));
        assert_eq!(db.code().code(), "42501", "{extra}: {e}");
        assert_eq!(
            db.message(),
            format!(
                "db-gateway: the options parameter \"{param}\" is not allowed through the gateway"
            ),
        );
        assert!(
            db.hint()
                .unwrap()
                .contains("policy chooses the database user")
        );
    }
    // `replication` as a startup parameter (a walsender), sent raw.
    let bytes = gateway::pg::encode_startup(&[
        ("user", "api"),
        ("database", "app"),
        ("replication", "database"),
    ]);
    let e = only_error(&raw_exchange(s.listeners[TEAM_A_API], &bytes));
    assert_eq!(e.sqlstate, "42501", "{e:?}");
    assert!(e.message.contains("\"replication\""), "{e:?}");

    // Unknown settings: a protocol error naming the parameter and how to allow it.
    let e = connect_with(&s, TEAM_A_API, "api", "options='-c log_statement=all'")
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08P01", "{e}");
    assert!(
        db.hint().unwrap().contains("upstream.startup_parameters"),
        "{e}"
    );

    // What applications set still works, and the session is the policy's user.
    let c = connect_with(
        &s,
        TEAM_A_API,
        "api",
        "application_name=orders options='-c search_path=audit,public'",
    )
    .await
    .expect("allowed parameters connect");
    let row = c
        .query_one("SELECT current_user::text, current_setting('search_path'), current_setting('application_name')", &[])
        .await
        .unwrap();
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(got, ("api".into(), "audit,public".into(), "orders".into()));
}

/// Item 5: an explicit listener outside loopback is refused at start-up unless the
/// configuration says `expose: true`. Before the fix the node bound 0.0.0.0 and lent its
/// identity to anyone on the network.
#[test]
fn hardening_05_explicit_listener_outside_loopback_needs_expose() {
    let dir = std::env::temp_dir().join(format!("dbgw-h05-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.yaml");
    std::fs::write(
        &file,
        "proxy: {address: '127.0.0.1:1', server_name: proxy, ca: ca.crt}\nlisteners:\n  - {listen: '0.0.0.0:0', route: main, identity: {cert: w.crt, key: w.key}}\n",
    )
    .unwrap();
    let o = Command::new(gateway_bin())
        .args(["node", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("listeners: 0.0.0.0:0 is not a loopback address: anyone who can reach it would connect as the listener's identity"),
        "{err}"
    );
    assert!(err.contains("expose: true"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The audit file's records, by session id: (start events, end events).
fn audit_by_session(
    path: &std::path::Path,
) -> std::collections::BTreeMap<String, (usize, Vec<serde_json::Value>)> {
    let mut by = std::collections::BTreeMap::<String, (usize, Vec<serde_json::Value>)>::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = e["session_id"].as_str().unwrap().to_owned();
        let entry = by.entry(id).or_default();
        match e["event"].as_str().unwrap() {
            "db.session.start" => entry.0 += 1,
            "db.session.end" => entry.1.push(e),
            other => panic!("unexpected event {other}"),
        }
    }
    by
}

/// Item 11: a session still inside a transaction when the drain grace period runs out
/// gets its end record (57P01) before the proxy exits, and every session exactly one.
/// Before the fix the process exited with the session's task and no end was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_11_a_session_cut_by_drain_timeout_has_an_end_record() {
    let mut spec = spec();
    spec.proxy.drain_grace = Some(std::time::Duration::from_secs(1));
    let mut s = Stack::start(spec).unwrap();
    let url = s.conn_string(TEAM_A_API, "api", "app");
    let (busy, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // One finished session too, for the "exactly one" half.
    connect(&s, TEAM_A_API, "api", "app")
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();

    let t0 = std::time::Instant::now();
    let mut proxy = s.terminate_proxy().unwrap();
    let status = wait_exit(
        &mut proxy,
        t0 + std::time::Duration::from_secs(10),
        "proxy still running",
    );
    assert!(status.success(), "{status}");
    assert!(t0.elapsed() >= std::time::Duration::from_secs(1));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;

    let by = audit_by_session(&s.audit_path);
    assert_eq!(by.len(), 2, "{by:?}");
    for (id, (starts, ends)) in &by {
        assert_eq!((*starts, ends.len()), (1, 1), "session {id}: {ends:?}");
    }
    // The idle one ended at drain (57P01 "ended by proxy drain"), the one in a
    // transaction by the shutdown after the grace period.
    let cut: Vec<&serde_json::Value> = by
        .values()
        .map(|(_, e)| &e[0])
        .filter(|e| e["error_message"] == "ended by proxy shutdown: the drain grace period elapsed")
        .collect();
    assert_eq!(cut.len(), 1, "{by:?}");
    assert_eq!(cut[0]["error_code"], "57P01");
    assert!(
        cut[0]["duration_ms"].as_f64().unwrap() >= 1000.0,
        "{:?}",
        cut[0]
    );
}

/// Item 13: no process of a stack logs private key material or a token, even at `trace`
/// level and through refusals; every other test's stack runs the same scan when it stops
/// (`Stack`'s drop), and this test also plants each kind of secret to prove the scan sees it.
#[test]
fn hardening_13_no_process_logs_a_key_or_token() {
    // SAFETY: set before any thread of this test binary's own starts a child; the stack's
    // children read it at spawn.
    unsafe { std::env::set_var("RUST_LOG", "trace") };
    let s = stack();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
        assert_eq!(
            sqlstate(&connect(&s, INTRUDER, "x", "app").await.unwrap_err()),
            "28000"
        );
        assert_eq!(
            sqlstate(&connect(&s, TEAM_A_API, "ghost", "app").await.unwrap_err()),
            "28000"
        );
        assert!(connect(&s, DOWN_ROUTE, "worker", "app").await.is_err());
    });
    // A TLS client with no certificate at the proxy: a refused handshake, logged.
    let _ = raw_exchange(s.proxy_addr, b"\x16\x03\x01\x00\x05hello");

    use gateway::harness::secrets::scan;
    let found = scan(&s.dir, &[&s.ca_dir]);
    assert_eq!(found, [], "secret material in the logs");
    let trace = std::fs::read_to_string(s.dir.join("proxy.log")).unwrap();
    assert!(
        trace.contains("TRACE") || trace.contains("DEBUG"),
        "the proxy logged at trace level"
    );

    // The scan sees each kind: a PEM block, a key body without armour, a token.
    let key = std::fs::read_to_string(s.dir.join("workload-0.key")).unwrap();
    let body = key
        .lines()
        .find(|l| l.len() >= 40 && !l.starts_with("-----"))
        .unwrap();
    let planted = s.dir.join("planted.log");
    for (text, what) in [
        (key.clone(), "marker \"PRIVATE KEY-----\""),
        (format!("debug: key={body}\n"), "the body of"),
        (
            "GET /?Action=connect&X-Amz-Signature=abc\n".to_owned(),
            "marker \"X-Amz-Signature=\"",
        ),
    ] {
        std::fs::write(&planted, text).unwrap();
        let found = scan(&s.dir, &[&s.ca_dir]);
        assert!(
            found.iter().all(|f| f.file == planted)
                && found.iter().any(|f| f.what.starts_with(what)),
            "{what}: {found:?}"
        );
    }
    std::fs::remove_file(&planted).unwrap();
}

/// Item 11: cancel requests are audited (`db.cancel`, with who sent it and what became of
/// it), the forwarded one and one with an unknown key alike. Before the fix a cancel left
/// no record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_11_cancel_requests_are_audited() {
    let s = stack();
    let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    let token = c.cancel_token();
    let q = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = q.await.unwrap().expect_err("cancelled");
    assert_eq!(sqlstate(&err), "57014");
    // A made-up key: dropped silently for the client, recorded for the operator.
    let mut bogus = Vec::new();
    bogus.extend_from_slice(&16u32.to_be_bytes());
    bogus.extend_from_slice(&gateway::pg::CANCEL_REQUEST_CODE.to_be_bytes());
    bogus.extend_from_slice(&1i32.to_be_bytes());
    bogus.extend_from_slice(&2i32.to_be_bytes());
    assert!(raw_exchange(s.listeners[TEAM_A_API], &bogus).is_empty());

    let cancels = || -> Vec<serde_json::Value> {
        s.audit_events()
            .into_iter()
            .filter(|e| e["event"] == "db.cancel")
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while cancels().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut results: Vec<String> = cancels()
        .iter()
        .map(|e| {
            assert_eq!(
                e["identity"], "spiffe://demo.db-gateway.local/ns/team-a/sa/api",
                "{e}"
            );
            assert!(e["node"].is_string() && e["time"].is_string(), "{e}");
            e["result"].as_str().unwrap().to_owned()
        })
        .collect();
    results.sort();
    assert_eq!(results, ["forwarded", "unknown_key"]);
}

/// Item 8 at the node: past `data_plane.max_connections` a new application connection is
/// closed at accept and counted; a freed place serves again. Before the fix the agent
/// accepted without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_08_node_caps_connections_per_process() {
    use std::io::Read;
    let mut spec = spec();
    spec.data_plane.max_connections = 2;
    let s = Stack::start(spec).unwrap();
    let node = s.listeners[TEAM_A_API];
    // Two connections that send nothing hold both places (until startup_timeout).
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(node).unwrap())
        .collect();
    let refusals = || {
        metric(
            &scrape(s.node_admin),
            "gateway_node_connection_refusals_total",
        )
    };
    // Both held in their places before the third comes: the node's threads accept from
    // their own queues, so without this the third may be taken before one of them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while metric(&scrape(s.node_admin), "gateway_node_active_connections") < Some(2.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the node never held the two connections"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut third = std::net::TcpStream::connect(node).unwrap();
        third
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        if third.read(&mut buf).map(|n| n == 0).unwrap_or(false) && refusals() >= Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the third connection was not refused"
        );
    }
    // Freed places serve again.
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let c = loop {
        match connect(&s, TEAM_A_API, "api", "app").await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no session after places were freed: {e}"),
        }
    };
    c.simple_query("SELECT 1").await.unwrap();
}
