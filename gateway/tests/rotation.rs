//! Rotation never touches a session (issue 21): a pod's tokio-postgres session queries every
//! 100 ms, and opens a new session every second, while the node's workload certificates
//! (8 s) and its own joined certificate (16 s) are renewed several times, while the workload
//! CA's root is rotated (`gateway ca rotate prepare|activate|finish`, every verifier
//! reloading its bundle, the CA and proxy server certificates issued again from the new
//! root), and while the CA is down for longer than a renewal interval. Everything real: the
//! node agent with eBPF interception, the CA, the proxy and PostgreSQL as processes.
//!
//! Needs root (eBPF, namespaces); skipped otherwise.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{Killed, metric, result_count, run_gateway, scrape};
use gateway::harness::spec::{CA_SERVER_NAME, PROXY_SERVER_NAME, strings};
use gateway::harness::{PodSpec, Stack, TransparentSpec};

const WORKLOAD_TTL: Duration = Duration::from_secs(8);
const NODE_TTL: Duration = Duration::from_secs(16);

/// Not a test of its own: the pod's client that [`rotation_never_touches_a_session`] runs
/// inside the pod. One session queries `select pg_backend_pid(), $1` every 100 ms (same
/// backend, the number echoed) and a new session logs in every second, until the stop file
/// exists. Prints `NEW-SESSION <unix ms>` per new session and a summary at the end; any
/// failure ends the process with the error.
#[test]
fn pod_session() {
    let (Ok(conninfo), Ok(stop)) = (
        std::env::var("DBGW_POD_SESSION"),
        std::env::var("DBGW_POD_SESSION_STOP"),
    ) else {
        return;
    };
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        println!("POD-SESSION-ERROR {what}: {e}");
        std::process::exit(1)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| fail("connect", &e));
        tokio::spawn(conn);
        let pid: i32 = client
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap_or_else(|e| fail("first query", &e))
            .get(0);
        let (mut queries, mut sessions, mut slowest) = (0i32, 0u32, Duration::ZERO);
        let mut next_session = Instant::now();
        while !Path::new(&stop).exists() {
            let started = Instant::now();
            let row = client
                .query_one("select pg_backend_pid(), $1::int", &[&queries])
                .await
                .unwrap_or_else(|e| fail("query on the open session", &e));
            slowest = slowest.max(started.elapsed());
            if row.get::<_, i32>(0) != pid || row.get::<_, i32>(1) != queries {
                fail(
                    "query on the open session",
                    &"another backend or a wrong answer",
                );
            }
            queries += 1;
            if Instant::now() >= next_session {
                next_session += Duration::from_secs(1);
                let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                    .await
                    .unwrap_or_else(|e| fail("new session", &e));
                let task = tokio::spawn(conn);
                let user: String = c
                    .query_one("select current_user::text", &[])
                    .await
                    .unwrap_or_else(|e| fail("new session's query", &e))
                    .get(0);
                if user != "api" {
                    fail("new session", &format!("current_user {user}"));
                }
                drop(c);
                let _ = task.await;
                sessions += 1;
                let ms = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                println!("NEW-SESSION {ms}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "POD-SESSION queries={queries} sessions={sessions} slowest_ms={}",
            slowest.as_millis()
        );
    });
}

/// The pod's client, with its output collected as it comes.
struct PodClient {
    child: Killed,
    lines: Arc<Mutex<Vec<String>>>,
    stop: std::path::PathBuf,
}

impl PodClient {
    fn start(s: &Stack) -> Self {
        let k = s.kernel.as_ref().unwrap();
        let stop = s.dir.join("stop-pod-session");
        let mut child = k.pods[0]
            .command(std::env::current_exe().unwrap().to_str().unwrap())
            .args(["--exact", "pod_session", "--nocapture", "--test-threads=1"])
            .env(
                "DBGW_POD_SESSION",
                format!(
                    "host={} port=5432 user=api dbname=app sslmode=disable connect_timeout=5",
                    k.db_addr.ip()
                ),
            )
            .env("DBGW_POD_SESSION_STOP", &stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child: Killed(child),
            lines,
            stop,
        }
    }

    /// Fails the test if the client has stopped (with what it said).
    fn assert_running(&mut self, s: &Stack, when: &str) {
        if let Some(status) = self.child.0.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "{when}: the pod's client ended ({status}): {:?}\nnode log:\n{}",
                self.lines.lock().unwrap(),
                s.log("node")
            );
        }
    }

    /// New sessions that logged in since `since`.
    fn sessions_since(&self, since: SystemTime) -> usize {
        let since = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("NEW-SESSION "))
            .filter(|ms| ms.parse::<u128>().is_ok_and(|ms| ms >= since))
            .count()
    }

    /// Stops the client and returns its summary line.
    fn finish(mut self, s: &Stack) -> String {
        std::fs::write(&self.stop, "").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = common::wait_exit(&mut self.child.0, deadline, "the pod's client stops");
        std::thread::sleep(Duration::from_millis(200));
        let lines = self.lines.lock().unwrap().clone();
        assert!(status.success(), "{lines:?}\nnode log:\n{}", s.log("node"));
        lines
            .iter()
            .find(|l| l.starts_with("POD-SESSION "))
            .cloned()
            .unwrap_or_else(|| panic!("no summary: {lines:?}"))
    }
}

/// Polls `f` (given the client) every 100 ms while the client keeps running; fails after `within`.
fn wait_until(
    s: &Stack,
    client: &mut PodClient,
    what: &str,
    within: Duration,
    mut f: impl FnMut(&PodClient) -> bool,
) {
    let deadline = Instant::now() + within;
    while !f(client) {
        client.assert_running(s, what);
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nnode log:\n{}\nca log:\n{}",
            s.log("node"),
            s.log("ca")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fetched(s: &Stack) -> f64 {
    metric(
        &scrape(s.node_admin),
        "gateway_node_certificates_fetched_total",
    )
    .unwrap_or(0.0)
}

fn node_renewals(s: &Stack) -> usize {
    s.log("node").matches("node certificate renewed").count()
}

fn ca_reloads(s: &Stack) -> usize {
    s.log("ca").matches("CA files reloaded").count()
}

fn readyz(s: &Stack) -> String {
    common::http_get(s.node_admin, "/readyz")
}

/// `gateway ca <args>` on the stack's CA directory.
fn ca(s: &Stack, args: &[&str]) -> String {
    let dir = s.ca_dir.to_str().unwrap().to_owned();
    let mut all = vec!["ca"];
    all.extend_from_slice(args);
    all.extend(["--dir", &dir]);
    run_gateway(&all)
}

#[test]
fn rotation_never_touches_a_session() {
    if !gateway::harness::root_or_skip("the rotation test (CAP_BPF, CAP_NET_ADMIN)") {
        return;
    }
    let mut spec = common::spec();
    spec.workloads.clear();
    spec.transparent = Some(TransparentSpec {
        pods: vec![PodSpec::new("team-a", "api-0", "api")],
        join: true,
        ca_args: strings(&[
            "--ttl",
            &format!("{}s", WORKLOAD_TTL.as_secs()),
            "--node-cert-ttl",
            &format!("{}s", NODE_TTL.as_secs()),
        ]),
        ..TransparentSpec::default()
    });
    let mut s = Stack::start(spec).expect("a stack whose node joins, with second-long TTLs");
    let started = Instant::now();
    let mut client = PodClient::start(&s);

    // 1. Renewals: three of each kind, the session going on.
    let (f0, n0) = (fetched(&s), node_renewals(&s));
    wait_until(
        &s,
        &mut client,
        "3 workload and 3 node renewals",
        Duration::from_secs(60),
        |_| fetched(&s) >= f0 + 3.0 && node_renewals(&s) >= n0 + 3,
    );

    // The node exports when its certificates end: within their TTLs from now.
    let metrics = scrape(s.node_admin);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (name, ttl) in [
        (
            "gateway_node_workload_certificate_expiry_timestamp_seconds",
            WORKLOAD_TTL,
        ),
        (
            "gateway_node_node_certificate_expiry_timestamp_seconds",
            NODE_TTL,
        ),
    ] {
        let left = metric(&metrics, name).unwrap() - now;
        assert!(
            left > 0.0 && left <= ttl.as_secs_f64() + 1.0,
            "{name}: {left} s left"
        );
    }

    // 2. Root rotation. prepare: every verifier gets the old and the new root.
    let node_reloads =
        |s: &Stack| result_count(s.node_admin, "gateway_node_tls_reloads_total", "success");
    let proxy_reloads =
        |s: &Stack| result_count(s.proxy_admin, "gateway_proxy_tls_reloads_total", "success");
    let (nr, pr, cr) = (node_reloads(&s), proxy_reloads(&s), ca_reloads(&s));
    let out = ca(&s, &["rotate", "prepare"]);
    assert!(out.contains("holds 2 root(s)"), "{out}");
    // The node reads the bundle twice (interception.ca.ca and proxy.ca are the one file).
    wait_until(
        &s,
        &mut client,
        "the overlap bundle everywhere",
        Duration::from_secs(10),
        |_| node_reloads(&s) >= nr + 2.0 && proxy_reloads(&s) > pr && ca_reloads(&s) > cr,
    );

    // activate: the new root signs; the CA's and the proxy's server certificates are
    // issued again from it (as an operator would).
    let (pr, cr) = (proxy_reloads(&s), ca_reloads(&s));
    ca(&s, &["rotate", "activate"]);
    for (name, out) in [(CA_SERVER_NAME, "ca-server"), (PROXY_SERVER_NAME, "proxy")] {
        let out = s.dir.join(out);
        ca(
            &s,
            &[
                "issue-server",
                "--dns",
                name,
                "--ttl",
                "24h",
                "--out",
                out.to_str().unwrap(),
            ],
        );
    }
    wait_until(
        &s,
        &mut client,
        "the new signing root and server certificates",
        Duration::from_secs(10),
        |_| proxy_reloads(&s) > pr && ca_reloads(&s) > cr,
    );
    // Every certificate moves to the new root at its next renewal.
    let (f1, n1) = (fetched(&s), node_renewals(&s));
    wait_until(
        &s,
        &mut client,
        "renewals from the new root",
        Duration::from_secs(40),
        |_| fetched(&s) >= f1 + 2.0 && node_renewals(&s) >= n1 + 2,
    );

    // finish: the old root is trusted nowhere. Renewals and new sessions go on, which they
    // could not with a certificate of the old root anywhere (node, workload, proxy, CA).
    let (nr, pr, cr) = (node_reloads(&s), proxy_reloads(&s), ca_reloads(&s));
    let out = ca(&s, &["rotate", "finish"]);
    assert!(out.contains("holds 1 root(s)"), "{out}");
    wait_until(
        &s,
        &mut client,
        "the new-root bundle everywhere",
        Duration::from_secs(10),
        |_| node_reloads(&s) >= nr + 2.0 && proxy_reloads(&s) > pr && ca_reloads(&s) > cr,
    );
    let finished = SystemTime::now();
    let (f2, n2) = (fetched(&s), node_renewals(&s));
    wait_until(
        &s,
        &mut client,
        "renewals and new sessions with the new root only",
        Duration::from_secs(30),
        |c| fetched(&s) >= f2 + 2.0 && node_renewals(&s) > n2 && c.sessions_since(finished) >= 3,
    );
    assert!(
        !s.log("node").contains("did not load") && !s.log("proxy").contains("did not load"),
        "every reload of the rotation loaded"
    );

    // 3. The CA down for longer than a renewal interval: right after a renewal, so the
    // certificate has its whole life ahead.
    let f3 = fetched(&s);
    wait_until(
        &s,
        &mut client,
        "a workload renewal",
        Duration::from_secs(10),
        |_| fetched(&s) > f3,
    );
    let renewed = Instant::now();
    s.stop_ca();
    let down = SystemTime::now();
    wait_until(&s, &mut client, "readiness degraded", WORKLOAD_TTL, |_| {
        readyz(&s).contains("degraded: workload certificate for spiffe://")
    });
    let degraded_after = renewed.elapsed();
    // Renewal is due at half-life (±10 %): the CA has been down past it, and the
    // certificate has not ended.
    assert!(
        degraded_after > WORKLOAD_TTL.mul_f64(0.55) && degraded_after < WORKLOAD_TTL,
        "degraded {degraded_after:?} after the renewal"
    );
    let body = readyz(&s);
    assert!(body.starts_with("HTTP/1.0 503"), "{body}");
    assert!(
        client.sessions_since(down) >= 3,
        "new sessions went on while the CA was down"
    );
    client.assert_running(&s, "the CA down");
    s.start_ca().expect("the CA back on its addresses");
    wait_until(
        &s,
        &mut client,
        "ready again after a renewal",
        Duration::from_secs(10),
        |_| readyz(&s).starts_with("HTTP/1.0 200"),
    );
    let back = SystemTime::now();
    wait_until(
        &s,
        &mut client,
        "new sessions with the CA back",
        Duration::from_secs(10),
        |c| c.sessions_since(back) >= 2,
    );

    // The one session lived through all of it, on the same backend.
    let summary = client.finish(&s);
    let field = |k: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {summary}"))
    };
    let secs = started.elapsed().as_secs();
    eprintln!(
        "rotation: {summary} in {secs} s; readiness degraded {degraded_after:?} after the last renewal with the CA down; {} node renewals, {} workload certificates",
        node_renewals(&s),
        fetched(&s)
    );
    assert!(field("queries") >= secs * 5, "{summary} in {secs} s");
    assert!(field("sessions") >= secs / 2, "{summary} in {secs} s");
    assert!(field("slowest_ms") < 3000, "{summary}");
}
