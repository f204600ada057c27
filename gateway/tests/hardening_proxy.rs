//! Issue 18, hardening of the proxy and the CA: certificate validity on every handshake,
//! the preamble checked against the certificate, reuse and cancel per identity, bounds
//! (items 2, 3, 6, 7, 8). Each test is named after the item it proves and fails on the code
//! before its fix.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use gateway::config::ReuseConfig;
use gateway::harness::{DEMO_TRUST_DOMAIN, PROXY_SERVER_NAME, Stack, Workload};
use gateway::pg;
use gateway::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};
use gateway::pod::PodMeta;
use gateway::tunnel::Preamble;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn workload_ca(s: &Stack) -> CertificateAuthority {
    CertificateAuthority::load(
        &s.ca_dir.join(pki::WORKLOAD_CA_CERT),
        &s.ca_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap()
}

fn pair(pem: (String, String)) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        vec![CertificateDer::from_pem_slice(pem.0.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(pem.1.as_bytes()).unwrap(),
    )
}

/// A node's TLS end towards the stack's proxy with this client certificate. One
/// connector is one client configuration: its sessions resume (TLS 1.3 tickets).
fn connector(
    s: &Stack,
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> tokio_rustls::TlsConnector {
    let ca = pki::load_certs(&s.ca_dir.join(pki::WORKLOAD_CA_CERT)).unwrap();
    let cfg = gateway::tunnel::client_config(client.0, client.1, &ca).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn preamble(node: &str, pod: PodMeta) -> Vec<u8> {
    Preamble {
        route: "main".into(),
        node: node.into(),
        client_addr: "127.0.0.1:1".parse().unwrap(),
        original_dst: None,
        pod,
        protocol: Default::default(),
    }
    .encode()
}

/// One tunnel as a node opens it: preamble, startup as `api` to `app`, `Terminate`; what
/// the proxy answered until it closed, or the TLS error.
async fn tunnel(
    s: &Stack,
    connector: &tokio_rustls::TlsConnector,
    preamble: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(s.proxy_addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from(PROXY_SERVER_NAME).unwrap(), tcp)
        .await?;
    let mut bytes = preamble;
    bytes.extend_from_slice(&pg::encode_startup(&[("user", "api"), ("database", "app")]));
    bytes.extend_from_slice(&pg::terminate());
    let _ = tls.write_all(&bytes).await;
    let _ = tls.flush().await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .expect("the proxy answers or closes")?;
    Ok(out)
}

fn logged_in(answer: &std::io::Result<Vec<u8>>) -> bool {
    matches!(answer, Ok(b) if !b.is_empty() && messages(b)[0].0 == b'R')
}

/// A node's TLS end with a certificate of team-a/api that ends 3 s from now.
fn short_lived_node(s: &Stack) -> tokio_rustls::TlsConnector {
    let id = SpiffeId::new(DEMO_TRUST_DOMAIN, "team-a", "api");
    let now = SystemTime::now();
    let short = workload_ca(s)
        .issue_between(
            &LeafSpec::workload(&id),
            now - Duration::from_secs(60),
            now + Duration::from_secs(3),
        )
        .unwrap();
    connector(s, pair(short))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_02_expired_certificate_cannot_resume() {
    let s = stack();
    let node = short_lived_node(&s);
    let first = tunnel(&s, &node, preamble("test", PodMeta::default())).await;
    assert!(logged_in(&first), "valid certificate: {first:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Same client configuration: it offers the ticket of the first session.
    let after = tunnel(&s, &node, preamble("test", PodMeta::default())).await;
    assert!(
        !logged_in(&after),
        "a session resumed past notAfter must be refused: {after:?}"
    );
}

/// A warm tunnel (handshake done, preamble not yet sent) that waits past its certificate's
/// end is refused when a session would start on it: the certificate is checked at each
/// use, not only at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_02_a_warm_tunnel_past_its_certificate_is_refused() {
    let s = stack();
    let node = short_lived_node(&s);
    let tcp = tokio::net::TcpStream::connect(s.proxy_addr).await.unwrap();
    let mut tls = node
        .connect(ServerName::try_from(PROXY_SERVER_NAME).unwrap(), tcp)
        .await
        .expect("the handshake while the certificate is valid");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut bytes = preamble("test", PodMeta::default());
    bytes.extend_from_slice(&pg::encode_startup(&[("user", "api"), ("database", "app")]));
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes");
    let answer = Ok(out.clone());
    assert!(!logged_in(&answer), "{out:?}");
    let e = only_error(&out);
    assert_eq!(e.sqlstate, "28000", "{e:?}");
    assert!(e.message.contains("is not valid now"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_03_preamble_must_match_the_certificate() {
    let s = stack();
    let id = SpiffeId::new(DEMO_TRUST_DOMAIN, "team-a", "api");
    let ca = workload_ca(&s);
    let bound = LeafSpec::workload(&id).on_node(DEMO_TRUST_DOMAIN, "node-1");
    let node = connector(
        &s,
        pair(ca.issue(&bound, Duration::from_secs(600)).unwrap()),
    );
    let pod = |ns: &str, sa: &str| PodMeta {
        namespace: Some(ns.into()),
        name: Some("api-0".into()),
        service_account: Some(sa.into()),
        ..PodMeta::default()
    };
    for (node_name, pod, says) in [
        ("node-1", pod("team-b", "api"), "pod namespace \"team-b\""),
        (
            "node-1",
            pod("team-a", "worker"),
            "service account \"worker\"",
        ),
        ("node-2", pod("team-a", "api"), "node \"node-2\""),
    ] {
        let got = tunnel(&s, &node, preamble(node_name, pod)).await.unwrap();
        let e = only_error(&got);
        assert_eq!(e.sqlstate, "08P01", "{e:?}");
        assert!(
            e.message
                .starts_with("db-gateway proxy: preamble does not match the client certificate: ")
                && e.message.contains(says),
            "{e:?}"
        );
        assert!(e.hint.is_some());
    }
    // The client reads the refusal before the proxy writes its audit end: wait for it.
    wait_for("three audit pairs", || s.audit_events().len() == 6).await;
    let events = s.audit_events();
    assert!(
        events.iter().all(|e| e["error_code"] == "08P01"),
        "{events:?}"
    );

    // The certificate's own node and pod: a session, and the audit says whose node it is.
    let ok = tunnel(&s, &node, preamble("node-1", pod("team-a", "api"))).await;
    assert!(logged_in(&ok), "{ok:?}");
    wait_for("the session's audit pair", || s.audit_events().len() == 8).await;
    let events = s.audit_events();
    let start = &events[6];
    assert_eq!(start["event"], "db.session.start");
    assert_eq!(start["result"], "success");
    assert_eq!(start["node"], "node-1");
    assert_eq!(start["node_verified"], true);

    // A certificate bound to no node (explicit listeners): the node stays a claim.
    let unbound = connector(
        &s,
        pair(
            ca.issue(&LeafSpec::workload(&id), Duration::from_secs(600))
                .unwrap(),
        ),
    );
    let ok = tunnel(&s, &unbound, preamble("anywhere", pod("team-a", "api"))).await;
    assert!(logged_in(&ok), "{ok:?}");
    wait_for("the session's audit pair", || s.audit_events().len() == 10).await;
    let events = s.audit_events();
    let start = &events[8];
    assert_eq!(start["event"], "db.session.start");
    assert_eq!(start["node"], "anywhere");
    assert!(start.get("node_verified").is_none(), "{start}");
}

/// team-a/api and team-c/api, both mapped to database user `api`, with reuse on.
fn shared_user_stack(workloads: Vec<Workload>) -> Stack {
    let mut spec = spec();
    spec.workloads = workloads;
    spec.proxy.threads = Some(1);
    spec.upstream_reuse = Some(ReuseConfig {
        max_idle: 2,
        idle_timeout: Duration::from_secs(30),
        ..ReuseConfig::default()
    });
    spec.roles = vec![
        role("team-a", "team-a", &["main"], &["api"], &["app"]),
        role("team-c", "team-c", &["main"], &["api"], &["app"]),
    ];
    Stack::start(spec).expect("start the stack")
}

async fn open(s: &Stack, i: usize) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let (client, conn) =
        tokio_postgres::connect(&s.conn_string(i, "api", "app"), tokio_postgres::NoTls)
            .await
            .expect("connect");
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

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

fn kept(s: &Stack) -> f64 {
    metric(
        &scrape(s.proxy_admin),
        "gateway_proxy_upstream_kept_sessions",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_06_reuse_never_crosses_identities() {
    const A: usize = 0;
    const B: usize = 1;
    let s = shared_user_stack(vec![
        Workload::new("team-a", "api"),
        Workload::new("team-c", "api"),
    ]);
    let a = open(&s, A).await;
    let a_pid = backend_pid(&a.0).await;
    close(a).await;
    wait_for("A's server session to be kept", || kept(&s) == 1.0).await;

    let b = open(&s, B).await;
    assert_eq!(
        tokio_postgres::Client::query_one(&b.0, "select current_user", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "api"
    );
    let b_pid = backend_pid(&b.0).await;
    assert_ne!(b_pid, a_pid, "identity B got identity A's backend");
    close(b).await;

    // Control: A's own next session does get its kept backend.
    let a = open(&s, A).await;
    assert_eq!(backend_pid(&a.0).await, a_pid);
    close(a).await;
}

/// A TCP relay to PostgreSQL that waits `delay` before it connects: a database a few
/// milliseconds away, so that a cancel request is still on its way when the next client's
/// query starts (without it, a local server takes the cancel before the next session can
/// begin, and the race this guards against is too narrow to meet). The server's address
/// is filled in once the stack has started it.
async fn slow_relay(delay: Duration) -> (std::net::SocketAddr, Arc<std::sync::OnceLock<u16>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = Arc::new(std::sync::OnceLock::new());
    let target = port.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Some(port) = target.get() else { return };
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", *port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_07_a_cancel_racing_a_session_end_never_cancels_the_next_owner() {
    const A: usize = 0;
    const B: usize = 1;
    let (relay, pg_port) = slow_relay(Duration::from_millis(15)).await;
    let mut spec = spec();
    spec.workloads = vec![
        Workload {
            route: "far".into(),
            ..Workload::new("team-a", "api")
        },
        Workload {
            route: "far".into(),
            ..Workload::new("team-c", "api")
        },
    ];
    spec.proxy.threads = Some(1);
    let mut far = spec.extra_databases[0].clone();
    far.name = "far".into();
    far.upstream.address = relay.to_string();
    far.upstream.reuse = Some(ReuseConfig {
        max_idle: 2,
        idle_timeout: Duration::from_secs(30),
        ..ReuseConfig::default()
    });
    spec.extra_databases.push(far);
    spec.roles = vec![
        role("team-a", "team-a", &["far"], &["api"], &["app"]),
        role("team-c", "team-c", &["far"], &["api"], &["app"]),
    ];
    let s = Stack::start(spec).expect("start the stack");
    pg_port.set(s.pg.port).unwrap();

    let mut cancelled_next = Vec::new();
    for i in 0..1000u32 {
        let first = open(&s, A).await;
        let token = first.0.cancel_token();
        // The cancel and the session's end race: the cancel is sent first, the session
        // ends 0 to 2.4 ms later, so the proxy looks the cancel up on either side of the
        // hand-over.
        let cancel = tokio::spawn(async move {
            let _ = token.cancel_query(tokio_postgres::NoTls).await;
        });
        tokio::time::sleep(Duration::from_micros(u64::from(i % 9) * 300)).await;
        close(first).await;
        // The next owner: another identity, or A's next session (which may get the
        // server session A just left).
        let next = open(&s, if i % 2 == 0 { A } else { B }).await;
        if let Err(e) = next.0.batch_execute("select pg_sleep(0.03)").await {
            assert_eq!(sqlstate(&e), "57014", "iteration {i}: {e}");
            cancelled_next.push(i);
        }
        cancel.await.unwrap();
        close(next).await;
    }
    assert!(
        cancelled_next.is_empty(),
        "a cancel of an ended session reached the next owner's query in iterations {cancelled_next:?}"
    );
}

/// Raises this process's open-files limit to its hard limit; the number of descriptors
/// the test may use.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_08_silent_upstream_silent_peer_and_half_open_connections() {
    // A database server that accepts and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let mut spec = spec();
    spec.extra_databases[0].upstream.address = silent_addr.to_string();
    spec.proxy.tls_handshake_timeout = Some(Duration::from_secs(1));
    // The harness's connect timeout is the default 5 s; the login's total is at least that.
    spec.proxy.upstream_login_timeout = Some(Duration::from_secs(5));
    spec.proxy.max_connections = Some(12_000);
    let s = Stack::start(spec).expect("stack");

    // A silent upstream: the login gives up in time, with 08001, and says so.
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        connect(&s, DOWN_ROUTE, "worker", "app"),
    )
    .await
    .expect("a silent upstream must not hang the session");
    let Err(e) = r else {
        panic!("no session with a silent upstream");
    };
    assert_eq!(sqlstate(&e), "08001", "{e}");
    let message = e.as_db_error().map(|d| d.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("did not finish within 5s")),
        "{message:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(9), "{:?}", t0.elapsed());
    let m = scrape(s.proxy_admin);
    assert_eq!(
        metric(&m, "gateway_proxy_upstream_login_timeouts_total"),
        Some(1.0)
    );

    // A silent TLS peer: closed after tls_handshake_timeout, not startup_timeout.
    let t0 = Instant::now();
    let mut peer = std::net::TcpStream::connect(s.proxy_addr).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    let n = peer.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "silent peer held for {:?}",
        t0.elapsed()
    );
    wait_for("the timeout to be counted", || {
        metric_with(
            &scrape(s.proxy_admin),
            "gateway_proxy_tls_handshake_failures_total",
            "reason=\"timeout\"",
        ) >= Some(1.0)
    })
    .await;

    // 10,000 half-open connections (or as many as the descriptor limit allows, with room
    // for the stack): a well-behaved client still gets through, memory stays bounded.
    let limit = raise_nofile();
    let n = 10_000.min(limit.saturating_sub(1_000) as usize);
    eprintln!("open-files limit {limit}: {n} half-open connections");
    let proxy_pid = s.proxy.as_ref().unwrap().id();
    let rss_before = rss_kib(proxy_pid);
    let addr = s.proxy_addr;
    let opener = std::thread::spawn(move || {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            match std::net::TcpStream::connect(addr) {
                Ok(c) => held.push(c),
                Err(e) => panic!("connect {}: {e}", held.len()),
            }
        }
        held
    });
    let t0 = Instant::now();
    let client = tokio::time::timeout(
        Duration::from_secs(10),
        connect(&s, TEAM_A_API, "api", "app"),
    )
    .await
    .expect("the proxy stays responsive")
    .expect("a well-behaved client gets a session");
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    eprintln!("well-behaved session under load after {:?}", t0.elapsed());
    let held = opener.join().unwrap();
    let rss_peak = rss_kib(proxy_pid);
    eprintln!("proxy RSS {rss_before} KiB before, {rss_peak} KiB with {n} half-open");
    assert!(
        rss_peak < rss_before + 256 * 1024,
        "proxy memory grew from {rss_before} to {rss_peak} KiB"
    );
    // Every half-open connection is closed by the handshake timeout.
    wait_for("the half-open connections to be closed", || {
        metric(&scrape(s.proxy_admin), "gateway_proxy_open_connections").unwrap_or(0.0) < 50.0
    })
    .await;
    drop(held);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_08_sessions_are_capped_per_identity_route_and_process() {
    let mut spec = spec();
    spec.proxy.max_sessions_per_identity = Some(2);
    spec.proxy.max_sessions_per_route = Some(3);
    let s = Stack::start(spec).expect("stack");

    let a1 = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    let a2 = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    let Err(e) = connect(&s, TEAM_A_API, "api", "app").await else {
        panic!("a third session of the identity");
    };
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert_eq!(
        db.message(),
        format!(
            "db-gateway: too many connections for identity spiffe://{DEMO_TRUST_DOMAIN}/ns/team-a/sa/api"
        )
    );
    assert!(
        db.hint().unwrap().contains("max_sessions_per_identity"),
        "{db:?}"
    );

    let b1 = connect(&s, TEAM_B_WORKER, "worker", "app").await.unwrap();
    let e = connect(&s, TEAM_B_WORKER, "worker", "app")
        .await
        .err()
        .unwrap();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert_eq!(
        db.message(),
        "db-gateway: too many connections for route \"main\""
    );
    assert!(
        db.hint().unwrap().contains("max_sessions_per_route"),
        "{db:?}"
    );
    let m = scrape(s.proxy_admin);
    assert_eq!(
        metric_with(
            &m,
            "gateway_proxy_limit_refusals_total",
            "reason=\"identity\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_with(&m, "gateway_proxy_limit_refusals_total", "reason=\"route\""),
        Some(1.0)
    );
    assert_eq!(
        metric_with(&m, "gateway_proxy_errors_total", "sqlstate=\"53300\""),
        Some(2.0)
    );

    // A session that ends gives its slot back.
    drop(a1);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = connect(&s, TEAM_A_API, "api", "app").await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = again.expect("a freed slot is usable again");
    drop((a2, b1, again));
}
