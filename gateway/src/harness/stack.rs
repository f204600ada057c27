//! A running local deployment, for the tests, the bench and `gateway up`.
//!
//! It makes a temporary directory with both CAs, starts a local PostgreSQL configured for
//! certificate logins only (`hostssl … cert`), then the proxy and the node agent as child
//! processes of the same binary, with one explicit-mode listener per workload (or, in
//! transparent mode, pods intercepted by eBPF and the CA service). The demo, the integration
//! tests and the bench build their environments with the same [`Stack`], so they exercise
//! the same wiring.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::configs::{self, write_yaml};
use super::kernel::Kernel;
use super::localdb::{self, LocalPostgres, LocalPostgresOptions};
use super::machine::{loopback, stop_child, temp_dir};
use super::spec::{DB_SERVER_NAME, DEMO_TRUST_DOMAIN, PROXY_SERVER_NAME, StackSpec, TRUST_BUNDLE};
use crate::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};

mod replica;
pub use replica::Replica;

/// How long a gateway process may take to report its addresses.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped process may take to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
    /// The CA's join listener, when the node joins (`TransparentSpec::join`).
    pub join_addr: Option<SocketAddr>,
    pub kernel: Option<Kernel>,
    /// Keep the directory (logs, configs, audit) when dropped.
    pub keep_dir: bool,
    /// What applications verify the node's client TLS with (`sslrootcert=`): the gateway
    /// CA's root, as the `db-gateway-trust-bundle` ConfigMap publishes it.
    pub trust_bundle: PathBuf,
    spec: StackSpec,
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

        if spec.workloads.iter().any(|w| w.client_tls) {
            let (c, k) = workload_ca.issue(
                &LeafSpec::server(vec!["localhost".into()], vec!["127.0.0.1".parse()?]),
                day,
            )?;
            pki::write_public(&dir.join(super::spec::LISTENER_TLS_CERT), &c)?;
            pki::write_secret(&dir.join(super::spec::LISTENER_TLS_KEY), &k)?;
        }
        pki::write_public(&dir.join(super::spec::DB_SERVER_CA), workload_ca.cert_pem())?;
        let trust_bundle = dir.join(TRUST_BUNDLE);
        pki::write_public(&trust_bundle, workload_ca.cert_pem())?;
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
            join_addr: None,
            kernel: None,
            keep_dir: std::env::var_os("GATEWAY_KEEP_TEST_DIR").is_some(),
            trust_bundle,
            spec,
        };
        stack.start_proxy()?;
        if let Some(t) = stack.spec.transparent.clone() {
            stack.kernel = Some(Kernel::create(&stack.dir, &t, &workload_ca)?);
            stack.start_ca()?;
        }
        stack.start_node()?;
        Ok(stack)
    }

    /// (Re)starts the proxy on a fresh port; the node config follows it.
    pub fn start_proxy(&mut self) -> Result<()> {
        let config = configs::proxy_config(&self.spec, self.pg.port);
        write_yaml(&self.proxy_config, &config)?;
        let mut child = self.spawn("proxy", &self.proxy_config)?;
        let started = wait_for_startup(&self.dir.join("proxy.log"), "proxy", &mut child, 1);
        self.proxy = Some(child);
        let (admin, listening) = started?;
        self.proxy_admin = admin;
        self.proxy_addr = listening[0];
        Ok(())
    }

    pub fn start_node(&mut self) -> Result<()> {
        let mut config = configs::node_config(
            &self.spec,
            self.proxy_addr,
            self.kernel.as_ref(),
            self.ca_addr,
        );
        // A joining node has no certificate files: only its token.
        if let (Some(i), Some(address)) = (config.interception.as_mut(), self.join_addr) {
            i.ca.node_cert = Default::default();
            i.ca.node_key = Default::default();
            i.ca.join = Some(crate::config::JoinConfig::Token {
                address: format!("localhost:{}", address.port()),
                token_file: self.dir.join(super::spec::JOIN_TOKEN),
            });
        }
        write_yaml(&self.node_config, &config)?;
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

    /// Starts `gateway <args>` (see [`Stack::spawn_args`]) and waits for its `ADMIN` and
    /// `listeners` `LISTENING` lines; a process that does not start is stopped.
    pub fn spawn_started(
        &self,
        log: &str,
        args: &[&str],
        listeners: usize,
    ) -> Result<(Child, SocketAddr, Vec<SocketAddr>)> {
        let mut child = self.spawn_args(log, args)?;
        match wait_for_startup(
            &self.dir.join(format!("{log}.log")),
            log,
            &mut child,
            listeners,
        ) {
            Ok((admin, listening)) => Ok((child, admin, listening)),
            Err(e) => {
                stop_child(&mut child, STOP_GRACE);
                Err(e)
            }
        }
    }

    /// Starts `gateway <args>` with its output in `<log>.log` in the stack directory.
    pub fn spawn_args(&self, log: &str, args: &[&str]) -> Result<Child> {
        let what = log;
        let log = std::fs::File::create(self.dir.join(format!("{log}.log")))?;
        // The proxy's environment, for replicas (`proxy-<n>`) too.
        let env: &[(String, String)] = if what == "proxy" || what.starts_with("proxy-") {
            &self.spec.proxy.env
        } else {
            &[]
        };
        Command::new(&self.spec.gateway_bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
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

    /// Starts the CA service that signs workload certificates for the node; again after
    /// [`Stack::stop_ca`], on the same listen and join addresses.
    pub fn start_ca(&mut self) -> Result<()> {
        let d = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        // Server certificates (client TLS at the node) for the database's addresses and
        // name only.
        let mut names = vec![DB_SERVER_NAME.to_owned()];
        if let Some(k) = &self.kernel {
            names.push(k.db_addr.ip().to_string());
            names.extend(k.db_addr_v6.map(|a| a.ip().to_string()));
        }
        let join = self.spec.transparent.as_ref().is_some_and(|t| t.join);
        // A restart keeps the addresses the node was configured with.
        let restart = self.ca_addr.port() != 0;
        if join && !restart {
            self.create_join_token()?;
        }
        let mut args = vec![
            "ca".to_owned(),
            "serve".to_owned(),
            "--dir".to_owned(),
            d("ca"),
            "--listen".to_owned(),
            self.ca_addr.to_string(),
            "--admin-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--tls-cert".to_owned(),
            d("ca-server.crt"),
            "--tls-key".to_owned(),
            d("ca-server.key"),
            "--inventory".to_owned(),
            d("inventory.yaml"),
            "--server-names".to_owned(),
            names.join(","),
        ];
        if join {
            args.extend([
                "--join-listen".to_owned(),
                self.join_addr.unwrap_or(loopback(0)).to_string(),
                "--join-tokens".to_owned(),
                d(super::spec::JOIN_TOKENS),
            ]);
        }
        if let Some(t) = &self.spec.transparent {
            args.extend(t.ca_args.iter().cloned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = self.spawn_args("ca", &args)?;
        let started = wait_for_startup(&self.dir.join("ca.log"), "ca", &mut child, 1);
        self.ca = Some(child);
        self.ca_addr = started?.1[0];
        // `JOIN <addr>` comes before `LISTENING`.
        self.join_addr = self
            .log("ca")
            .lines()
            .find_map(|l| l.strip_prefix("JOIN "))
            .and_then(|a| a.trim().parse().ok());
        anyhow::ensure!(
            self.join_addr.is_some() || !join,
            "the CA printed no JOIN line"
        );
        Ok(())
    }

    /// Stops the CA service (SIGKILL) and waits for it: the node finds it unreachable.
    /// [`Stack::start_ca`] brings it back on the same addresses.
    pub fn stop_ca(&mut self) {
        if let Some(mut c) = self.ca.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A one-time join token for the stack's node, made by `gateway ca token create` (the
    /// CA keeps its hash, the node the token).
    fn create_join_token(&self) -> Result<()> {
        let out = Command::new(&self.spec.gateway_bin)
            .args(["ca", "token", "create", "--tokens"])
            .arg(self.dir.join(super::spec::JOIN_TOKENS))
            .args([
                "--node-name",
                super::spec::NODE_NAME,
                "--ttl",
                "10m",
                "--one-time",
            ])
            .output()
            .context("gateway ca token create")?;
        anyhow::ensure!(
            out.status.success(),
            "gateway ca token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pki::write_secret(
            &self.dir.join(super::spec::JOIN_TOKEN),
            &String::from_utf8_lossy(&out.stdout),
        )?;
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

    /// The audit log's events, once the proxy's writer has written what it queued: the
    /// proxy queues a session's records before it answers or closes the client, so after
    /// that answer the records are in the file once `gateway_proxy_audit_queue_depth` is 0
    /// (waited for up to 5 s, while the proxy runs).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        read_audit(
            &self.audit_path,
            self.proxy.is_some().then_some(self.proxy_admin),
        )
    }
}

/// The events of the audit log at `path`, once the proxy at `admin` (while it runs) has
/// written what it queued: `gateway_proxy_audit_queue_depth` 0, waited for up to 5 s.
fn read_audit(path: &Path, admin: Option<SocketAddr>) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(admin) = admin
        && Instant::now() < deadline
    {
        match audit_queue_depth(admin) {
            Some(0) | None => break,
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A proxy's `gateway_proxy_audit_queue_depth`, scraped from its admin endpoint.
fn audit_queue_depth(admin: SocketAddr) -> Option<u64> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("gateway_proxy_audit_queue_depth "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in [self.node.as_mut(), self.proxy.as_mut(), self.ca.as_mut()]
            .into_iter()
            .flatten()
        {
            stop_child(c, STOP_GRACE);
        }
        if let Some(k) = &self.kernel
            && k.pin_dir.exists()
            && let Err(e) = crate::ebpf::uninstall(&k.pin_dir)
        {
            eprintln!("failed to remove {}: {e}", k.pin_dir.display());
        }
        // Every test's stack proves that no process logged a key or a token (issue 18,
        // item 13); the directory is kept for a look when one did.
        let found = super::secrets::scan(&self.dir, &[&self.ca_dir]);
        if !self.keep_dir && found.is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if !found.is_empty() && !std::thread::panicking() {
            panic!(
                "secret material in the stack's logs (kept in {}): {found:?}",
                self.dir.display()
            );
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
