//! SIGTERM on the proxy: no new sessions, idle sessions end at once with 57P01, a session
//! inside a transaction finishes it first, and the proxy exits when the last one is gone.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_idle_sessions_at_transaction_boundaries() {
    let mut spec = spec();
    spec.proxy.drain_grace = Some(Duration::from_secs(20));
    let mut s = gateway::harness::Stack::start(spec).unwrap();
    let url = s.conn_string(TEAM_A_API, "api", "app");

    let (idle, idle_conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let idle_end = tokio::spawn(idle_conn);
    let (busy, busy_conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let busy_end = tokio::spawn(busy_conn);
    idle.simple_query("select 1").await.unwrap();
    busy.batch_execute("create table if not exists t (x int); begin; insert into t values (1)")
        .await
        .unwrap();

    let t0 = Instant::now();
    let mut proxy = s.terminate_proxy().unwrap();

    // The idle session is ended promptly with 57P01.
    let end = tokio::time::timeout(Duration::from_secs(5), idle_end)
        .await
        .expect("idle session ended")
        .unwrap();
    let err = end.expect_err("connection ended with an error");
    assert_eq!(sqlstate(&err), "57P01");
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "terminating connection due to administrator command"
    );
    assert!(idle.is_closed());

    // The transaction is not cut: it goes on and commits.
    busy.simple_query("insert into t values (2)")
        .await
        .expect("transaction continues during drain");
    busy.simple_query("commit")
        .await
        .expect("commit during drain");
    let end = tokio::time::timeout(Duration::from_secs(5), busy_end)
        .await
        .expect("ended after commit")
        .unwrap();
    assert_eq!(sqlstate(&end.err().unwrap()), "57P01");
    assert_eq!(
        s.pg.psql("select count(*) from pg_database")
            .map(|_| ())
            .ok(),
        Some(())
    );

    // No new sessions: the listener is closed.
    let Err(e) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        panic!("a new session was accepted while draining");
    };
    assert_eq!(sqlstate(&e), "08001");

    // With no sessions left the proxy exits well before the grace period.
    let status = wait_exit(
        &mut proxy,
        t0 + Duration::from_secs(15),
        "proxy still running",
    );
    assert!(status.success(), "{status}");
    let committed = s.pg.psql_db("app", "select count(*) from t").unwrap();
    assert_eq!(committed.trim(), "2");
}
