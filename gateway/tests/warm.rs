//! The node's warm pool (`data_plane.warm_tunnels`): sessions after the first take a
//! pre-handshaked tunnel of their own identity; tunnels the proxy closed are never used;
//! unused ones are closed after `warm_tunnel_idle`; `warm_tunnels: 0` turns it off.

mod common;

use std::time::Duration;

use common::*;
use gateway::harness::Stack;

fn warm(s: &Stack, result: &str) -> f64 {
    result_count(s.node_admin, "gateway_node_warm_tunnels_total", result)
}

fn kept(s: &Stack) -> f64 {
    metric(&scrape(s.node_admin), "gateway_node_warm_tunnels").unwrap_or(0.0)
}

async fn current_user(s: &Stack, i: usize, user: &str) -> String {
    let c = connect(s, i, user, "app").await.expect("connect");
    c.query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_take_warm_tunnels_of_their_own_identity() {
    let mut spec = spec();
    // One data-plane thread: every session meets the same pool.
    spec.data_plane.threads = 1;
    let s = Stack::start(spec).unwrap();

    assert_eq!(current_user(&s, TEAM_A_API, "api").await, "api");
    // The first session of an identity dials; it also starts filling the pool.
    wait_for("a warm tunnel", || kept(&s) >= 1.0).await;
    assert_eq!(warm(&s, "hit"), 0.0);
    // On the proxy it waits for a preamble: not a session (once the first session's end
    // has reached the proxy, no session is counted while the warm tunnel waits).
    wait_for("the first session to end on the proxy", || {
        metric(&scrape(s.proxy_admin), "gateway_proxy_active_sessions") == Some(0.0)
    })
    .await;
    let p = scrape(s.proxy_admin);
    assert!(
        metric(&p, "gateway_proxy_waiting_tunnels").unwrap_or(0.0) >= 1.0,
        "{p}"
    );
    for _ in 0..3 {
        // Refills run in the background: each session starts once one is ready.
        wait_for("a warm tunnel", || kept(&s) >= 1.0).await;
        assert_eq!(current_user(&s, TEAM_A_API, "api").await, "api");
    }
    assert_eq!(warm(&s, "hit"), 3.0, "{}", scrape(s.node_admin));
    // team-b has its own certificate: team-a's warm tunnels never serve it.
    assert_eq!(current_user(&s, TEAM_B_WORKER, "worker").await, "worker");
    let events = s.audit_events();
    let starts: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "db.session.start" && e["result"] == "success")
        .collect();
    assert_eq!(starts.len(), 5, "{events:?}");
    for e in &starts[..4] {
        assert_eq!(
            e["identity"],
            "spiffe://demo.db-gateway.local/ns/team-a/sa/api"
        );
    }
    assert_eq!(
        starts[4]["identity"],
        "spiffe://demo.db-gateway.local/ns/team-b/sa/worker"
    );
    // Tunnels after the first are resumed TLS sessions: no signatures on either side.
    assert!(
        metric_with(
            &scrape(s.node_admin),
            "gateway_node_tunnel_handshakes_total",
            "kind=\"resumed\""
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_the_proxy_closed_are_not_used_and_idle_ones_expire() {
    let mut spec = spec();
    spec.data_plane.threads = 1;
    // The proxy gives up on a tunnel without preamble after 1 s; the node would keep it 20 s.
    spec.proxy.tunnel_idle_timeout = Some(Duration::from_secs(1));
    let s = Stack::start(spec).unwrap();
    assert_eq!(current_user(&s, TEAM_A_API, "api").await, "api");
    wait_for("a warm tunnel", || kept(&s) >= 1.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Closed by the proxy: seen as stale when taken, and the session dials instead.
    assert_eq!(current_user(&s, TEAM_A_API, "api").await, "api");
    assert!(warm(&s, "stale") >= 1.0, "{}", scrape(s.node_admin));
    assert!(
        metric(
            &scrape(s.proxy_admin),
            "gateway_proxy_idle_tunnels_closed_total"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // No session was refused on the way.
    assert!(
        s.audit_events().iter().all(|e| e["result"] == "success"),
        "{:?}",
        s.audit_events()
    );
    drop(s);

    let mut spec = common::spec();
    spec.data_plane.threads = 1;
    spec.data_plane.warm_tunnel_idle = Duration::from_secs(1);
    let s = Stack::start(spec).unwrap();
    assert_eq!(current_user(&s, TEAM_A_API, "api").await, "api");
    wait_for("a warm tunnel", || kept(&s) >= 1.0).await;
    wait_for("idle warm tunnels to close", || kept(&s) == 0.0).await;
    assert!(warm(&s, "expired") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_tunnels_zero_turns_the_pool_off() {
    let mut spec = spec();
    spec.data_plane.warm_tunnels = 0;
    let s = Stack::start(spec).unwrap();
    for _ in 0..3 {
        assert_eq!(current_user(&s, TEAM_A_API, "api").await, "api");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kept(&s), 0.0);
    assert_eq!(warm(&s, "hit"), 0.0);
    let full = metric_with(
        &scrape(s.node_admin),
        "gateway_node_tunnel_handshakes_total",
        "kind=",
    )
    .unwrap_or(0.0);
    assert_eq!(full, 3.0, "one handshake per session");
}
