//! Shared test environment: a real PostgreSQL, the real proxy and node processes, and the
//! identities and policy the tests need. See `tests/README.md`.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Output};
use std::time::{Duration, Instant};

use gateway::config::{DatabaseConfig, RoleConfig, UpstreamAuth, UpstreamConfig, UpstreamTlsMode};
pub use gateway::harness::role;
use gateway::harness::{ProxySettings, Stack, StackSpec, Workload, node_data_plane};
use gateway::pg::{self, ErrorResponse};

/// Workload indexes in [`spec`].
pub const TEAM_A_API: usize = 0;
pub const TEAM_B_WORKER: usize = 1;
pub const INTRUDER: usize = 2;
pub const DOWN_ROUTE: usize = 3;

/// team-a chooses among its users; team-b is forced to its own user and `app`.
pub fn roles() -> Vec<RoleConfig> {
    vec![
        role(
            "team-a",
            "team-a",
            &["main"],
            &["{{ .service_account }}", "ghost"],
            &["app"],
        ),
        RoleConfig {
            force_db_user: true,
            force_db_name: true,
            ..role(
                "team-b",
                "team-b",
                &["main", "down"],
                &["{{ .service_account }}"],
                &["app"],
            )
        },
    ]
}

pub fn gateway_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gateway"))
}

/// team-a/api chooses among allowed users; team-b/worker is forced; intruder has no role;
/// the last listener routes to a database whose server is down.
pub fn spec() -> StackSpec {
    let closed_port = gateway::harness::free_port().expect("free port");
    StackSpec {
        gateway_bin: gateway_bin(),
        workloads: vec![
            Workload::new("team-a", "api"),
            Workload::new("team-b", "worker"),
            Workload::new("intruder", "x"),
            Workload {
                route: "down".into(),
                ..Workload::new("team-b", "worker")
            },
        ],
        roles: roles(),
        proxy: ProxySettings::default(),
        data_plane: node_data_plane(),
        extra_databases: vec![DatabaseConfig {
            name: "down".into(),
            labels: Default::default(),
            protocol: gateway::route::Protocol::Postgres,
            upstream: UpstreamConfig {
                address: format!("127.0.0.1:{closed_port}"),
                auth: Some(UpstreamAuth::Cert),
                tls: UpstreamTlsMode::VerifyFull,
                ca: Some("ca/workload-ca.crt".into()),
                server_name: Some("localhost".into()),
                region: None,
                iam_host: None,
                account_id: None,
                resource_id: None,
                reuse: None,
                startup_parameters: Vec::new(),
                admin_user: None,
            },
        }],
        tcp_routes: Vec::new(),
        transparent: None,
        setup_sql: vec![
            "CREATE ROLE api LOGIN".into(),
            "CREATE ROLE worker LOGIN".into(),
            "CREATE DATABASE app OWNER api".into(),
        ],
        extra_hba: Vec::new(),
        upstream_reuse: None,
        pg_routes: Vec::new(),
    }
}

pub fn stack() -> Stack {
    Stack::start(spec()).expect("start the local gateway stack")
}

/// Connects with tokio-postgres (no TLS: the node listener is local, the tunnel encrypts).
pub async fn connect(
    s: &Stack,
    i: usize,
    user: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&s.conn_string(i, user, db), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

/// Sends raw bytes to `addr` and reads everything until the peer closes.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The messages in a backend byte stream.
pub fn messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(Some((tag, body, used))) = pg::split_message(bytes, 1 << 24) {
        out.push((tag, body.to_vec()));
        bytes = &bytes[used..];
    }
    out
}

/// The single `ErrorResponse` a refused client receives, asserting nothing else came.
pub fn only_error(bytes: &[u8]) -> ErrorResponse {
    let msgs = messages(bytes);
    assert_eq!(msgs.len(), 1, "expected exactly one message, got {msgs:?}");
    assert_eq!(msgs[0].0, b'E', "expected an ErrorResponse");
    ErrorResponse::parse(&msgs[0].1).expect("ErrorResponse parses")
}

/// Scrapes a Prometheus endpoint.
pub fn scrape(addr: SocketAddr) -> String {
    http_get(addr, "/metrics")
}

/// A whole HTTP/1.0 response (status line, headers, body).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Sum of all samples of a metric (every label set), `None` when absent.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric_name = key.split('{').next().unwrap_or(key);
        if metric_name == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

/// A labelled sample, e.g. `metric_with(text, "x_total", "reason=\"expired\"")`.
pub fn metric_with(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .reduce(|a, b| a + b)
}

/// A counter's sample with `result="<result>"` (0 when absent).
pub fn result_count(admin: SocketAddr, name: &str, result: &str) -> f64 {
    metric_with(&scrape(admin), name, &format!("result=\"{result}\"")).unwrap_or(0.0)
}

/// Waits for `child` to exit, polling every 50 ms; fails the test with `failure` at `deadline`.
pub fn wait_exit(child: &mut Child, deadline: Instant, failure: &str) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{failure}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A command's trimmed standard output, failing the test with its stderr unless it succeeded.
pub fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// Polls `f` every 50 ms until it holds; fails the test after 10 s, naming `what`.
pub async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process killed and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `gateway <args>` to completion and returns its standard output; a failure fails
/// the test with its standard error.
pub fn run_gateway(args: &[&str]) -> String {
    let o = std::process::Command::new(gateway_bin())
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Starts `cmd` with its standard output piped and reads the addresses it prints before
/// `LISTENING` (`ADMIN`, `JOIN`, then `LISTENING`), by name.
pub fn start_printing_addresses(
    mut cmd: std::process::Command,
) -> (Killed, std::collections::HashMap<String, SocketAddr>) {
    use std::io::BufRead;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let process = Killed(child);
    let mut printed = std::collections::HashMap::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some((name, addr)) = line.split_once(' ')
            && let Ok(addr) = addr.trim().parse()
        {
            printed.insert(name.to_owned(), addr);
            if name == "LISTENING" {
                break;
            }
        }
    }
    (process, printed)
}
