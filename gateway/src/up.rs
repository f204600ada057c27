//! `gateway up`: the whole product on one machine, for a first look and for the tests.
//!
//! It makes a temporary directory with both CAs, starts a local PostgreSQL configured for
//! certificate logins only (`hostssl … cert`), then the proxy and the node agent as child
//! processes of the same binary, with one explicit-mode listener per demo workload. The
//! integration tests build their environments with the same [`Stack`], so the demo and the
//! tests exercise the same wiring.

pub mod pods;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::localdb::{self, LocalPostgres, LocalPostgresOptions};
use crate::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};

pub const DEMO_TRUST_DOMAIN: &str = "demo.db-gateway.local";
/// The name in the proxy's certificate that nodes verify.
pub const PROXY_SERVER_NAME: &str = "proxy.db-gateway.local";
/// The database route every demo and test listener uses.
pub const ROUTE: &str = "main";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One workload: an explicit-mode node listener presenting this identity.
#[derive(Debug, Clone)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    /// Route the listener sends to (default [`ROUTE`]).
    pub route: String,
}

impl Workload {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            route: ROUTE.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StackSpec {
    /// The `gateway` binary to run for the proxy and the node.
    pub gateway_bin: PathBuf,
    pub workloads: Vec<Workload>,
    /// The `roles:` list of the proxy policy, as YAML (a sequence).
    pub roles_yaml: String,
    /// Extra top-level proxy settings (YAML lines), e.g. `drain_grace: 5s`.
    pub proxy_extra_yaml: String,
    /// Extra `data_plane:` settings of the node (YAML mapping lines, indented by 2).
    pub node_data_plane_yaml: String,
    /// More entries of the proxy's `databases:` list (YAML sequence items, indented by 2).
    pub extra_databases_yaml: String,
    /// SQL run as superuser once the database is up (roles, databases, grants).
    pub setup_sql: Vec<String>,
}

/// A running local deployment; dropping it stops every process and removes every file.
pub struct Stack {
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    pub pg: LocalPostgres,
    pub proxy: Option<Child>,
    pub node: Option<Child>,
    pub proxy_addr: SocketAddr,
    pub proxy_admin: SocketAddr,
    pub node_admin: SocketAddr,
    /// Node listener per workload, in the order of [`StackSpec::workloads`].
    pub listeners: Vec<SocketAddr>,
    pub audit_path: PathBuf,
    pub proxy_config: PathBuf,
    pub node_config: PathBuf,
    spec: StackSpec,
}

/// A free TCP port on loopback. Another process may take it before we bind it again;
/// start-up then fails with a bind error naming the address, and callers retry.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn temp_dir(prefix: &str) -> Result<PathBuf> {
    let nonce: u64 = rand::random();
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nonce:016x}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    Ok(dir)
}

impl Stack {
    pub fn start(spec: StackSpec) -> Result<Self> {
        let dir = temp_dir("db-gateway-up")?;
        // From here on, a failure must still remove the directory.
        match Self::start_in(spec, &dir) {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn start_in(spec: StackSpec, dir: &Path) -> Result<Self> {
        let ca_dir = dir.join("ca");
        pki::init_ca(&ca_dir, DEMO_TRUST_DOMAIN)?;
        let workload_ca = CertificateAuthority::load(
            &ca_dir.join(pki::WORKLOAD_CA_CERT),
            &ca_dir.join(pki::WORKLOAD_CA_KEY),
        )?;
        let day = Duration::from_secs(24 * 3600);
        // The database's server certificate comes from the workload CA in the demo; in
        // production it is the database's own (e.g. the RDS CA bundle).
        let (pg_cert, pg_key) = workload_ca.issue(
            &LeafSpec::server(vec!["localhost".into()], vec!["127.0.0.1".parse()?]),
            day,
        )?;
        let pg = localdb::start(LocalPostgresOptions {
            server_cert_pem: pg_cert,
            server_key_pem: pg_key,
            client_ca_pem: std::fs::read_to_string(ca_dir.join(pki::DB_CLIENT_CA_CERT))?,
            extra_hba: Vec::new(),
        })?;
        for sql in &spec.setup_sql {
            pg.psql(sql)
                .with_context(|| format!("setup SQL failed: {sql}"))?;
        }

        let (proxy_cert, proxy_key) = workload_ca.issue(
            &LeafSpec::server(vec![PROXY_SERVER_NAME.into()], vec![]),
            day,
        )?;
        pki::write_public(&dir.join("proxy.crt"), &proxy_cert)?;
        pki::write_secret(&dir.join("proxy.key"), &proxy_key)?;
        for (i, w) in spec.workloads.iter().enumerate() {
            let id = SpiffeId::new(DEMO_TRUST_DOMAIN, &w.namespace, &w.service_account);
            let (c, k) = workload_ca.issue(&LeafSpec::workload(&id), day)?;
            pki::write_public(&dir.join(format!("workload-{i}.crt")), &c)?;
            pki::write_secret(&dir.join(format!("workload-{i}.key")), &k)?;
        }

        let audit_path = dir.join("audit.jsonl");
        let proxy_config = dir.join("proxy.yaml");
        let node_config = dir.join("node.yaml");
        let mut stack = Stack {
            dir: dir.to_owned(),
            ca_dir,
            pg,
            proxy: None,
            node: None,
            proxy_addr: loopback(0),
            proxy_admin: loopback(0),
            node_admin: loopback(0),
            listeners: Vec::new(),
            audit_path,
            proxy_config,
            node_config,
            spec,
        };
        stack.start_proxy()?;
        stack.start_node()?;
        Ok(stack)
    }

    /// The database route's upstream, as the proxy sees it.
    fn databases_yaml(&self) -> String {
        format!(
            "databases:\n  - name: {ROUTE}\n    labels: {{ env: demo }}\n    upstream:\n      address: \"127.0.0.1:{}\"\n      auth: cert\n      server_name: localhost\n      ca: ca/{}\n",
            self.pg.port,
            pki::WORKLOAD_CA_CERT
        )
    }

    /// (Re)starts the proxy on a fresh port; the node config follows it.
    pub fn start_proxy(&mut self) -> Result<()> {
        let mut y = String::new();
        // Port 0 everywhere: the kernel picks, the process reports (no port races).
        writeln!(y, "listen: \"127.0.0.1:0\"")?;
        writeln!(y, "admin_listen: \"127.0.0.1:0\"")?;
        writeln!(y, "trust_domain: {DEMO_TRUST_DOMAIN}")?;
        writeln!(
            y,
            "tls: {{ cert: proxy.crt, key: proxy.key, client_ca: ca/{} }}",
            pki::WORKLOAD_CA_CERT
        )?;
        writeln!(
            y,
            "db_client_ca: {{ cert: ca/{}, key: ca/{} }}",
            pki::DB_CLIENT_CA_CERT,
            pki::DB_CLIENT_CA_KEY
        )?;
        writeln!(y, "audit: {{ path: audit.jsonl }}")?;
        y.push_str(&self.spec.proxy_extra_yaml);
        if !y.ends_with('\n') {
            y.push('\n');
        }
        y.push_str(&self.databases_yaml());
        y.push_str(&self.spec.extra_databases_yaml);
        if !y.ends_with('\n') {
            y.push('\n');
        }
        y.push_str("roles:\n");
        y.push_str(&self.spec.roles_yaml);
        std::fs::write(&self.proxy_config, y)?;
        let mut child = self.spawn("proxy", &self.proxy_config)?;
        let started = wait_for_startup(&self.dir.join("proxy.log"), "proxy", &mut child, 1);
        self.proxy = Some(child);
        let (admin, listening) = started?;
        self.proxy_admin = admin;
        self.proxy_addr = listening[0];
        Ok(())
    }

    pub fn start_node(&mut self) -> Result<()> {
        let mut y = String::new();
        writeln!(y, "node_name: demo-node")?;
        writeln!(y, "admin_listen: \"127.0.0.1:0\"")?;
        writeln!(
            y,
            "proxy: {{ address: \"{}\", server_name: {PROXY_SERVER_NAME}, ca: ca/{} }}",
            self.proxy_addr,
            pki::WORKLOAD_CA_CERT
        )?;
        writeln!(y, "data_plane:\n  threads: 2")?;
        y.push_str(&self.spec.node_data_plane_yaml);
        if !y.ends_with('\n') {
            y.push('\n');
        }
        writeln!(y, "listeners:")?;
        for (i, w) in self.spec.workloads.iter().enumerate() {
            writeln!(y, "  - listen: \"127.0.0.1:0\"")?;
            writeln!(y, "    route: {}", w.route)?;
            writeln!(
                y,
                "    identity: {{ cert: workload-{i}.crt, key: workload-{i}.key }}"
            )?;
            writeln!(
                y,
                "    pod: {{ namespace: {}, name: {}-{i}, service_account: {} }}",
                w.namespace, w.service_account, w.service_account
            )?;
        }
        std::fs::write(&self.node_config, y)?;
        let mut child = self.spawn("node", &self.node_config)?;
        let started = wait_for_startup(
            &self.dir.join("node.log"),
            "node",
            &mut child,
            self.spec.workloads.len(),
        );
        self.node = Some(child);
        let (admin, listening) = started?;
        self.node_admin = admin;
        self.listeners = listening;
        Ok(())
    }

    fn spawn(&self, what: &str, config: &Path) -> Result<Child> {
        let log = std::fs::File::create(self.dir.join(format!("{what}.log")))?;
        Command::new(&self.spec.gateway_bin)
            .arg(what)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {} {what}", self.spec.gateway_bin.display()))
    }

    /// A libpq connection string for workload `i` (plain TCP to the node's listener:
    /// the tunnel from the node onwards is the encryption).
    pub fn conn_string(&self, i: usize, user: &str, dbname: &str) -> String {
        let a = self.listeners[i];
        format!(
            "host={} port={} user={user} dbname={dbname} sslmode=disable",
            a.ip(),
            a.port()
        )
    }

    /// Sends SIGTERM to the proxy (drain) and returns its process for the caller to wait.
    pub fn terminate_proxy(&mut self) -> Option<Child> {
        let child = self.proxy.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Some(child)
    }

    pub fn log(&self, what: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default()
    }

    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in [self.node.as_mut(), self.proxy.as_mut()]
            .into_iter()
            .flatten()
        {
            stop(c);
        }
        if std::env::var_os("GATEWAY_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits for the `ADMIN <addr>` line and `listeners` `LISTENING <addr>` lines a gateway
/// process prints once it serves; fails with the log's tail if it exits first.
fn wait_for_startup(
    log: &Path,
    what: &str,
    child: &mut Child,
    listeners: usize,
) -> Result<(SocketAddr, Vec<SocketAddr>)> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let admin = text
            .lines()
            .find_map(|l| l.strip_prefix("ADMIN "))
            .and_then(|a| a.trim().parse().ok());
        let listening: Vec<SocketAddr> = text
            .lines()
            .filter_map(|l| l.strip_prefix("LISTENING "))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        if let Some(admin) = admin
            && listening.len() >= listeners
        {
            return Ok((admin, listening));
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "gateway {what} exited during start-up ({status}); its log ends:\n{}",
                tail.join("\n")
            );
        }
        if Instant::now() > deadline {
            bail!("gateway {what} did not report its addresses within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `gateway up`: one demo workload allowed as database user `app` on database `app`.
pub fn run(keep: bool) -> Result<()> {
    let spec = StackSpec {
        gateway_bin: std::env::current_exe()?,
        workloads: vec![Workload::new("demo", "app")],
        roles_yaml: "  - name: demo-apps\n    match: { namespace: demo }\n    databases: { labels: { env: demo } }\n    db_users: [\"{{ .service_account }}\"]\n    db_names: [\"{{ .service_account }}\"]\n    force_db_user: true\n    force_db_name: true\n".into(),
        proxy_extra_yaml: String::new(),
        node_data_plane_yaml: String::new(),
        extra_databases_yaml: String::new(),
        setup_sql: vec![
            "CREATE ROLE app LOGIN".into(),
            "CREATE DATABASE app OWNER app".into(),
        ],
    };
    let stack = Stack::start(spec)?;
    eprintln!("db-gateway demo in {}", stack.dir.display());
    eprintln!(
        "  PostgreSQL 15 on 127.0.0.1:{} (certificate logins only)",
        stack.pg.port
    );
    eprintln!(
        "  proxy on {} (admin http://{}/metrics)",
        stack.proxy_addr, stack.proxy_admin
    );
    eprintln!(
        "  node agent listener {} for spiffe://{DEMO_TRUST_DOMAIN}/ns/demo/sa/app (admin http://{}/metrics)",
        stack.listeners[0], stack.node_admin
    );
    eprintln!("  audit log {}", stack.audit_path.display());
    eprintln!(
        "Try: psql \"{}\" -c 'select current_user'   (Ctrl-C stops and cleans up)",
        stack.conn_string(0, "app", "app")
    );
    println!("READY {}", stack.conn_string(0, "app", "app"));
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::admin::shutdown_signal());
    eprintln!("stopping and cleaning up");
    if keep {
        eprintln!("keeping {}", stack.dir.display());
        // SAFETY-free: setting our own env var before Drop reads it, single-threaded here.
        unsafe { std::env::set_var("GATEWAY_KEEP_TEST_DIR", "1") };
    }
    drop(stack);
    Ok(())
}
