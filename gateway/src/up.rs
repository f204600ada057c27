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

use crate::config::Protocol;
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
    /// The listener's protocol (a `tcp` listener needs a [`TcpRoute`] of that name).
    pub protocol: Protocol,
}

impl Workload {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            route: ROUTE.into(),
            protocol: Protocol::Postgres,
        }
    }

    /// A listener of the same identity on `tcp` route `route`.
    pub fn tcp(namespace: &str, service_account: &str, route: &str) -> Self {
        Self {
            route: route.into(),
            protocol: Protocol::Tcp,
            ..Self::new(namespace, service_account)
        }
    }
}

/// A `tcp` route of the proxy (plain L4 to `upstream`).
#[derive(Debug, Clone)]
pub struct TcpRoute {
    pub name: String,
    pub upstream: SocketAddr,
    /// Transparent mode: pods reach it by dialling the database's address on this port.
    pub intercept_port: u16,
}

/// A `postgres` route of the proxy to the stack's own server.
#[derive(Debug, Clone)]
pub struct PgRoute {
    pub name: String,
    /// `upstream.reuse`, as a YAML flow mapping; `None` for off.
    pub reuse: Option<String>,
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
    /// Extra `data_plane:` settings of the node (YAML mapping lines, indented by 2; a
    /// `threads:` line here replaces the default of 2).
    pub node_data_plane_yaml: String,
    /// More entries of the proxy's `databases:` list (YAML sequence items, indented by 2).
    pub extra_databases_yaml: String,
    /// `upstream.reuse` of the main route (a YAML flow mapping such as `{ max_idle: 8 }`);
    /// `None` leaves reuse off, as it is by default.
    pub upstream_reuse: Option<String>,
    /// More `postgres` routes to the stack's own server (e.g. the same database with
    /// `upstream.reuse` on, next to the main route without it).
    pub pg_routes: Vec<PgRoute>,
    /// `tcp` routes on the proxy (and, in transparent mode, intercepted on their port).
    pub tcp_routes: Vec<TcpRoute>,
    /// SQL run as superuser once the database is up (roles, databases, grants).
    pub setup_sql: Vec<String>,
    /// Transparent mode: pods in namespaces and cgroups, intercepted by eBPF (root only).
    pub transparent: Option<TransparentSpec>,
    /// `pg_hba.conf` lines placed before the certificate-only rules (the benchmark's
    /// `direct` path and TLS peers log in over plain TCP with `hostnossl … trust`).
    pub extra_hba: Vec<String>,
}

/// One pod of the transparent demo or tests.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub host_network: bool,
    /// Left out of the inventory: a pod the resolver has not heard of (yet).
    pub unlisted: bool,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            host_network: false,
            unlisted: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TransparentSpec {
    pub pods: Vec<PodSpec>,
    /// The inventory's identity for processes outside any pod (`None` refuses them).
    pub host_identity: Option<(String, String)>,
    /// Also give the database, the agent and every namespaced pod an IPv6 address.
    pub ipv6: bool,
}

/// The kernel side of a transparent stack. Field order is drop order: pods (namespaces,
/// veths), then the cgroup tree, then the address bridges.
pub struct Kernel {
    /// The database's "original address" pods dial (held by a bridge, nothing listens).
    pub db_addr: SocketAddr,
    /// Where interception redirects to (the node agent listens here).
    pub agent_addr: SocketAddr,
    /// The database's IPv6 address (with [`TransparentSpec::ipv6`]).
    pub db_addr_v6: Option<SocketAddr>,
    pub agent_addr_v6: Option<SocketAddr>,
    /// The bridge the node agent creates to hold `agent_addr`.
    pub agent_interface: String,
    pub pin_dir: PathBuf,
    pub pods: Vec<pods::Pod>,
    /// A cgroup in the attached subtree that is not a pod: "a process outside any pod".
    pub outside: PathBuf,
    pub tree: pods::CgroupTree,
    _bridges: Vec<pods::Link>,
}

impl Kernel {
    /// A command prefix that runs a program in the `outside` cgroup (host network).
    pub fn outside_command(&self, program: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.outside.display()
            ))
            .arg("outside")
            .arg(program);
        c
    }
}

pub const CA_SERVER_NAME: &str = "ca.db-gateway.local";
pub const NODE_NAME: &str = "demo-node";
/// Port of the agent address in tests and the demo.
pub const AGENT_PORT: u16 = 15432;

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
    /// The CA service (transparent mode).
    pub ca: Option<Child>,
    pub ca_addr: SocketAddr,
    pub kernel: Option<Kernel>,
    /// Keep the directory (logs, configs, audit) when dropped.
    pub keep_dir: bool,
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
            extra_hba: spec.extra_hba.clone(),
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
            ca: None,
            ca_addr: loopback(0),
            kernel: None,
            keep_dir: std::env::var_os("GATEWAY_KEEP_TEST_DIR").is_some(),
            spec,
        };
        stack.start_proxy()?;
        if let Some(t) = stack.spec.transparent.clone() {
            stack.start_kernel(&t, &workload_ca)?;
            stack.start_ca()?;
        }
        stack.start_node()?;
        Ok(stack)
    }

    /// The database routes to the stack's server, as the proxy sees them.
    fn databases_yaml(&self) -> String {
        let main = PgRoute {
            name: ROUTE.into(),
            reuse: self.spec.upstream_reuse.clone(),
        };
        let mut y = String::from("databases:\n");
        for r in std::iter::once(&main).chain(&self.spec.pg_routes) {
            y.push_str(&format!(
                "  - name: {}\n    labels: {{ env: demo }}\n    upstream:\n      address: \"127.0.0.1:{}\"\n      auth: cert\n      server_name: localhost\n      ca: ca/{}\n",
                r.name,
                self.pg.port,
                pki::WORKLOAD_CA_CERT
            ));
            if let Some(reuse) = &r.reuse {
                y.push_str(&format!("      reuse: {reuse}\n"));
            }
        }
        y
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
        for r in &self.spec.tcp_routes {
            writeln!(
                y,
                "  - name: {}\n    protocol: tcp\n    upstream: {{ address: \"{}\" }}",
                r.name, r.upstream
            )?;
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
        writeln!(y, "node_name: {NODE_NAME}")?;
        writeln!(y, "admin_listen: \"127.0.0.1:0\"")?;
        writeln!(
            y,
            "proxy: {{ address: \"{}\", server_name: {PROXY_SERVER_NAME}, ca: ca/{} }}",
            self.proxy_addr,
            pki::WORKLOAD_CA_CERT
        )?;
        writeln!(y, "data_plane:")?;
        if !self.spec.node_data_plane_yaml.contains("  threads:") {
            writeln!(y, "  threads: 2")?;
        }
        y.push_str(&self.spec.node_data_plane_yaml);
        if !y.ends_with('\n') {
            y.push('\n');
        }
        if let Some(k) = &self.kernel {
            writeln!(y, "interception:")?;
            writeln!(y, "  cgroup: \"{}\"", k.tree.root.display())?;
            writeln!(y, "  pin_dir: \"{}\"", k.pin_dir.display())?;
            writeln!(y, "  agent_address: \"{}\"", k.agent_addr)?;
            writeln!(y, "  agent_interface: {}", k.agent_interface)?;
            let mut dsts = format!("\"{}\"", k.db_addr);
            if let (Some(db6), Some(agent6)) = (k.db_addr_v6, k.agent_addr_v6) {
                writeln!(y, "  agent_address_v6: \"{agent6}\"")?;
                dsts.push_str(&format!(", \"{db6}\""));
            }
            writeln!(y, "  routes:")?;
            writeln!(y, "    - {{ match_destination: [{dsts}], route: {ROUTE} }}")?;
            let mut extra = Vec::new();
            for r in &self.spec.tcp_routes {
                let dst = SocketAddr::new(k.db_addr.ip(), r.intercept_port);
                writeln!(
                    y,
                    "    - {{ match_destination: [\"{dst}\"], route: {}, protocol: tcp }}",
                    r.name
                )?;
                extra.push(format!("\"{}/32:{}\"", k.db_addr.ip(), r.intercept_port));
            }
            if !extra.is_empty() {
                writeln!(y, "  destinations: [{}]", extra.join(", "))?;
            }
            writeln!(
                y,
                "  identity: {{ trust_domain: {DEMO_TRUST_DOMAIN}, inventory: inventory.yaml, unknown_pod_wait: 1s }}"
            )?;
            writeln!(
                y,
                "  ca: {{ address: \"{}\", server_name: {CA_SERVER_NAME}, ca: ca/{}, node_cert: node.crt, node_key: node.key }}",
                self.ca_addr,
                pki::WORKLOAD_CA_CERT
            )?;
        }
        writeln!(
            y,
            "listeners:{}",
            if self.spec.workloads.is_empty() {
                " []"
            } else {
                ""
            }
        )?;
        for (i, w) in self.spec.workloads.iter().enumerate() {
            writeln!(y, "  - listen: \"127.0.0.1:0\"")?;
            writeln!(y, "    route: {}", w.route)?;
            writeln!(y, "    protocol: {}", w.protocol)?;
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
        self.spawn_args(what, &[what, "--config", &config.to_string_lossy()])
    }

    /// Starts `gateway <args>` with its output in `<log>.log` in the stack directory.
    pub fn spawn_args(&self, log: &str, args: &[&str]) -> Result<Child> {
        let what = log;
        let log = std::fs::File::create(self.dir.join(format!("{log}.log")))?;
        Command::new(&self.spec.gateway_bin)
            .args(args)
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

    /// Pods, cgroups, address bridges and the inventory, all unique to this stack.
    fn start_kernel(
        &mut self,
        t: &TransparentSpec,
        workload_ca: &CertificateAuthority,
    ) -> Result<()> {
        let idx = pods::unique_index();
        let (a, b) = ((idx / 250 % 250) as u8, (idx % 250 + 1) as u8);
        let db_ip = std::net::Ipv4Addr::new(10, 200, a, b);
        let agent_ip = std::net::Ipv4Addr::new(169, 254, a, b);
        // The agent creates its own address holder (`agent_interface`); the guard only
        // makes sure it goes away with the stack.
        let bridges = vec![
            pods::address_holder(&format!("dbgwd{idx}"), db_ip)?,
            pods::Link(format!("dbgwa{idx}")),
        ];
        let (hi, lo) = ((idx >> 16) as u16, idx as u16);
        let v6 = t.ipv6.then(|| {
            (
                std::net::Ipv6Addr::new(0xfd00, 0xdb, 0, 0, 0, 0, hi, lo),
                std::net::Ipv6Addr::new(0xfd00, 0xa9, 0, 0, 0, 0, hi, lo),
            )
        });
        if let Some((db6, _)) = v6 {
            pods::run(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{db6}/128"),
                    "dev",
                    &format!("dbgwd{idx}"),
                    "nodad",
                ],
            )?;
        }
        let cgroup2 = crate::identity::cgroup::cgroup2_mount()?;
        let tree = pods::CgroupTree::create(&cgroup2, &format!("dbgw-up-{idx}"))?;
        let outside = tree.mkdir("system.slice/outside.service")?;
        let mut made = Vec::new();
        let mut inventory = String::from("pods:\n");
        for (k, p) in t.pods.iter().enumerate() {
            let pod = pods::Pod::create(
                &tree,
                idx * 100 + k as u32,
                p.host_network,
                &format!("dbgw{idx}p{k}"),
                &format!("dbgw{idx}v{k}"),
                std::net::Ipv4Addr::new(10, 201 + k as u8, a, b),
            )?;
            if let (Some((db6, agent6)), false) = (v6, p.host_network) {
                pod.add_ipv6(
                    std::net::Ipv6Addr::new(0xfd00, 0x10 + k as u16, 0, 0, 0, 0, hi, lo),
                    &[db6, agent6],
                )?;
            }
            if !p.unlisted {
                writeln!(
                    inventory,
                    "  - {{ uid: {}, namespace: {}, name: {}, service_account: {}, node: {NODE_NAME}, host_network: {} }}",
                    pod.uid, p.namespace, p.name, p.service_account, p.host_network
                )?;
            }
            made.push(pod);
        }
        if let Some((ns, sa)) = &t.host_identity {
            writeln!(
                inventory,
                "host: {{ namespace: {ns}, service_account: {sa} }}"
            )?;
        }
        std::fs::write(self.dir.join("inventory.yaml"), inventory)?;

        let day = Duration::from_secs(24 * 3600);
        let (c, k) =
            workload_ca.issue(&LeafSpec::server(vec![CA_SERVER_NAME.into()], vec![]), day)?;
        pki::write_public(&self.dir.join("ca-server.crt"), &c)?;
        pki::write_secret(&self.dir.join("ca-server.key"), &k)?;
        let (c, k) = workload_ca.issue(&LeafSpec::node(DEMO_TRUST_DOMAIN, NODE_NAME), day)?;
        pki::write_public(&self.dir.join("node.crt"), &c)?;
        pki::write_secret(&self.dir.join("node.key"), &k)?;
        self.kernel = Some(Kernel {
            db_addr: SocketAddr::from((db_ip, 5432)),
            agent_addr: SocketAddr::from((agent_ip, AGENT_PORT)),
            db_addr_v6: v6.map(|(db6, _)| SocketAddr::from((db6, 5432))),
            agent_addr_v6: v6.map(|(_, agent6)| SocketAddr::from((agent6, AGENT_PORT))),
            agent_interface: format!("dbgwa{idx}"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/dbgw-up-{idx}")),
            pods: made,
            outside,
            tree,
            _bridges: bridges,
        });
        Ok(())
    }

    /// (Re)starts the CA service that signs workload certificates for the node.
    pub fn start_ca(&mut self) -> Result<()> {
        let d = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        let args = [
            "ca".to_owned(),
            "serve".to_owned(),
            "--dir".to_owned(),
            d("ca"),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--admin-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--tls-cert".to_owned(),
            d("ca-server.crt"),
            "--tls-key".to_owned(),
            d("ca-server.key"),
            "--inventory".to_owned(),
            d("inventory.yaml"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = self.spawn_args("ca", &args)?;
        let started = wait_for_startup(&self.dir.join("ca.log"), "ca", &mut child, 1);
        self.ca = Some(child);
        self.ca_addr = started?.1[0];
        Ok(())
    }

    /// SIGKILLs the node agent (no clean-up of any kind) and waits for it.
    pub fn kill_node(&mut self) {
        if let Some(mut c) = self.node.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
        for c in [self.node.as_mut(), self.proxy.as_mut(), self.ca.as_mut()]
            .into_iter()
            .flatten()
        {
            stop(c);
        }
        if let Some(k) = &self.kernel
            && k.pin_dir.exists()
            && let Err(e) = crate::ebpf::uninstall(&k.pin_dir)
        {
            eprintln!("failed to remove {}: {e}", k.pin_dir.display());
        }
        if !self.keep_dir {
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

/// Shell-quotes one word for the `POD` line.
fn shell_quote(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:".contains(&b))
    {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// `gateway up`: one demo workload, `demo/app`, allowed as database user `app` on
/// database `app`. As root the workload is a pod (network namespace + kubelet-shaped
/// cgroup) intercepted by eBPF; otherwise, or with `explicit`, an explicit-mode listener.
pub fn run(keep: bool, explicit: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let transparent = !explicit && unsafe { libc::geteuid() } == 0;
    let spec = StackSpec {
        gateway_bin: std::env::current_exe()?,
        workloads: if transparent { Vec::new() } else { vec![Workload::new("demo", "app")] },
        roles_yaml: "  - name: demo-apps\n    match: { namespace: demo }\n    databases: { labels: { env: demo } }\n    db_users: [\"{{ .service_account }}\"]\n    db_names: [\"{{ .service_account }}\"]\n    force_db_user: true\n    force_db_name: true\n".into(),
        proxy_extra_yaml: String::new(),
        node_data_plane_yaml: String::new(),
        extra_databases_yaml: String::new(),
        tcp_routes: Vec::new(),
        transparent: transparent.then(|| TransparentSpec {
            pods: vec![PodSpec::new("demo", "app-0", "app")],
            host_identity: None,
            ipv6: false,
        }),
        setup_sql: vec![
            "CREATE ROLE app LOGIN".into(),
            "CREATE DATABASE app OWNER app".into(),
        ],
        extra_hba: Vec::new(),
        upstream_reuse: None,
        pg_routes: Vec::new(),
    };
    let mut stack = Stack::start(spec)?;
    stack.keep_dir = keep;
    eprintln!("db-gateway demo in {}", stack.dir.display());
    eprintln!(
        "  PostgreSQL 15 on 127.0.0.1:{} (certificate logins only)",
        stack.pg.port
    );
    eprintln!(
        "  proxy on {} (admin http://{}/metrics)",
        stack.proxy_addr, stack.proxy_admin
    );
    eprintln!("  node agent admin http://{}/metrics", stack.node_admin);
    eprintln!("  audit log {}", stack.audit_path.display());
    let (ready, pod) = match &stack.kernel {
        Some(k) => {
            let conn = format!(
                "host={} port={} user=app dbname=app sslmode=disable",
                k.db_addr.ip(),
                k.db_addr.port()
            );
            let prefix: Vec<String> = k.pods[0]
                .command_prefix()
                .iter()
                .map(|w| shell_quote(w))
                .collect();
            eprintln!(
                "  pod demo/app-0 (uid {}) in its own network namespace; {} is intercepted by eBPF",
                k.pods[0].uid, k.db_addr
            );
            (conn, Some(prefix.join(" ")))
        }
        None => (stack.conn_string(0, "app", "app"), None),
    };
    match &pod {
        Some(p) => eprintln!(
            "Try: {p} psql \"{ready}\" -c 'select current_user'   (Ctrl-C stops and cleans up)"
        ),
        None => eprintln!(
            "Try: psql \"{ready}\" -c 'select current_user'   (Ctrl-C stops and cleans up)"
        ),
    }
    println!("READY {ready}");
    if let Some(p) = &pod {
        println!("POD {p}");
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::admin::shutdown_signal());
    eprintln!("stopping and cleaning up");
    if keep {
        eprintln!("keeping {}", stack.dir.display());
    }
    drop(stack);
    Ok(())
}
