//! The data path with a real client (tokio-postgres) through node and proxy to a real
//! PostgreSQL: identity → database user, both query protocols, big rows, COPY both ways,
//! LISTEN/NOTIFY, cancel, audit and metrics.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_maps_to_policy_user_and_denied_identity_gets_error() {
    let s = stack();
    // team-a/api asks for its own user: allowed.
    let a = connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect("team-a connects");
    let row = a
        .query_one("select current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("api".into(), "app".into())
    );

    // team-b/worker asks for postgres/postgres and is forced to worker/app.
    let b = connect(&s, TEAM_B_WORKER, "postgres", "postgres")
        .await
        .expect("team-b connects");
    let row = b
        .query_one("select current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("worker".into(), "app".into())
    );

    // An identity no role matches.
    let e = connect(&s, INTRUDER, "api", "app")
        .await
        .expect_err("intruder refused");
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000");
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(
        db.message(),
        "db-gateway: identity spiffe://demo.db-gateway.local/ns/intruder/sa/x is not allowed to use database \"main\""
    );
    assert_eq!(
        db.hint(),
        Some("No role in the gateway policy matches this workload; ask an operator to add one.")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_protocol_with_prepared_statements_and_a_10mb_row() {
    let s = stack();
    let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    c.batch_execute(
        "create table kv (k int primary key, v text); insert into kv values (1, 'one'), (2, 'two')",
    )
    .await
    .unwrap();
    let rows = c.simple_query("select v from kv order by k").await.unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["one", "two"]);

    let stmt = c.prepare("select v from kv where k = $1").await.unwrap();
    for (k, want) in [(1, "one"), (2, "two"), (1, "one")] {
        let row = c.query_one(&stmt, &[&k]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), want);
    }

    const TEN_MB: usize = 10 * 1024 * 1024;
    let row = c
        .query_one("select repeat('x', $1)", &[&(TEN_MB as i32)])
        .await
        .unwrap();
    let big: String = row.get(0);
    assert_eq!(big.len(), TEN_MB);
    assert!(big.bytes().all(|b| b == b'x'));
    // And 10 MB the other way, as a bind parameter.
    let param: String = (0..TEN_MB)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let row = c
        .query_one("select length($1::text), md5($1::text)", &[&param])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0) as usize, TEN_MB);
    let want_md5 = c.query_one("select md5(string_agg(chr(97 + (i % 26)), '' order by i)) from generate_series(0, $1 - 1) i", &[&(TEN_MB as i32)])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(1), want_md5.get::<_, String>(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_100mb_in_and_out_byte_for_byte() {
    let s = stack();
    let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    c.batch_execute("create table blob (id int, payload text)")
        .await
        .unwrap();
    // Deterministic 100 MB of COPY text, in the canonical form COPY TO prints back.
    let mut data = Vec::with_capacity(101 * 1024 * 1024);
    let mut id = 0u32;
    while data.len() < 100 * 1024 * 1024 {
        let payload: String = (0..90)
            .map(|j| (b'A' + ((id as usize * 7 + j) % 58) as u8) as char)
            .filter(|ch| *ch != '\\' && *ch != '`')
            .collect();
        data.extend_from_slice(format!("{id}\t{payload}\n").as_bytes());
        id += 1;
    }
    let sink = c.copy_in("copy blob from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(256 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, u64::from(id));

    let out = c
        .copy_out("copy (select * from blob order by id) to stdout")
        .await
        .unwrap();
    futures_util::pin_mut!(out);
    let mut back = Vec::with_capacity(data.len());
    while let Some(chunk) = out.next().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(back.len(), data.len());
    assert!(back == data, "COPY TO output differs from COPY FROM input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_crosses_the_gateway() {
    let s = stack();
    let (listener, mut conn) = tokio_postgres::connect(
        &s.conn_string(TEAM_A_API, "api", "app"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener.batch_execute("listen jobs").await.unwrap();
    let notifier = connect(&s, TEAM_B_WORKER, "worker", "app").await.unwrap();
    notifier
        .batch_execute("notify jobs, 'job-42'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification within 5s");
    assert_eq!(got, Some(("jobs".into(), "job-42".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_right_backend() {
    let s = stack();
    let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    let token = c.cancel_token();
    let q = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let err = tokio::time::timeout(Duration::from_secs(5), q)
        .await
        .expect("query ends after cancel")
        .unwrap()
        .expect_err("cancelled query fails");
    let elapsed = t0.elapsed();
    assert_eq!(sqlstate(&err), "57014");
    assert!(elapsed < Duration::from_secs(1), "cancel took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_has_one_start_and_one_end_per_session_with_fields() {
    let s = stack();
    for _ in 0..3 {
        let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
        c.simple_query("select 1").await.unwrap();
    }
    let _ = connect(&s, INTRUDER, "x", "app").await.expect_err("denied");
    // Let the proxy notice the clients' Terminate and write the end events.
    let deadline = Instant::now() + Duration::from_secs(5);
    let events = loop {
        let ev = s.audit_events();
        if ev.iter().filter(|e| e["event"] == "db.session.end").count() >= 4
            || Instant::now() > deadline
        {
            break ev;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["session_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "four sessions: {events:#?}");
    for id in ids {
        let of = |kind: &str| {
            events
                .iter()
                .filter(|e| e["session_id"] == id && e["event"] == kind)
                .collect::<Vec<_>>()
        };
        let (start, end) = (of("db.session.start"), of("db.session.end"));
        assert_eq!((start.len(), end.len()), (1, 1), "session {id}");
        let (start, end) = (start[0], end[0]);
        for field in [
            "time",
            "identity",
            "node",
            "pod",
            "database_route",
            "client_addr",
            "node_addr",
            "result",
        ] {
            assert!(!start[field].is_null(), "start.{field} missing: {start}");
        }
        for field in [
            "bytes_client_to_server",
            "bytes_server_to_client",
            "duration_ms",
        ] {
            assert!(end[field].is_number(), "end.{field} missing: {end}");
        }
        if start["result"] == "success" {
            assert_eq!(
                start["identity"],
                "spiffe://demo.db-gateway.local/ns/team-a/sa/api"
            );
            assert_eq!(start["db_user"], "api");
            assert_eq!(start["db_name"], "app");
            assert_eq!(start["node"], "demo-node");
            assert_eq!(start["pod"]["namespace"], "team-a");
            assert!(
                start["upstream_addr"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!(":{}", s.pg.port))
            );
            assert!(end["bytes_server_to_client"].as_u64().unwrap() > 0);
        } else {
            assert_eq!(start["result"], "denied");
            assert_eq!(start["error_code"], "28000");
            assert_eq!(
                start["identity"],
                "spiffe://demo.db-gateway.local/ns/intruder/sa/x"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_connections_bytes_latency_and_errors() {
    let s = stack();
    let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    c.simple_query("select repeat('y', 100000)").await.unwrap();
    let _ = connect(&s, INTRUDER, "x", "app").await.expect_err("denied");
    let node = scrape(s.node_admin);
    let proxy = scrape(s.proxy_admin);
    assert!(
        metric(&node, "gateway_node_connections_total").unwrap() >= 2.0,
        "{node}"
    );
    assert!(
        metric_with(&node, "gateway_node_bytes_total", "proxy_to_app").unwrap() > 100_000.0,
        "{node}"
    );
    assert!(
        metric(&node, "gateway_node_tunnel_handshake_seconds_count").unwrap() >= 2.0,
        "{node}"
    );
    assert!(
        metric(&proxy, "gateway_proxy_connections_total").unwrap() >= 2.0,
        "{proxy}"
    );
    assert!(
        metric_with(&proxy, "gateway_proxy_bytes_total", "server_to_client").unwrap() > 100_000.0
    );
    assert!(metric(&proxy, "gateway_proxy_tls_handshake_seconds_count").unwrap() >= 2.0);
    assert_eq!(
        metric_with(&proxy, "gateway_proxy_errors_total", "sqlstate=\"28000\""),
        Some(1.0),
        "{proxy}"
    );
    assert_eq!(
        metric_with(&proxy, "gateway_proxy_sessions_total", "result=\"denied\""),
        Some(1.0)
    );
    // The refused session may still be finishing its audit when the client has its error.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&scrape(s.proxy_admin), "gateway_proxy_active_sessions") != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "one open session expected:\n{}",
            scrape(s.proxy_admin)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = http_get(s.node_admin, "/healthz");
    assert!(
        health.starts_with("HTTP/1.0 200") && health.ends_with("ok\n"),
        "{health}"
    );
    let ready = http_get(s.proxy_admin, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.0 200") && ready.ends_with("ready\n"),
        "{ready}"
    );
    drop(c);
}
