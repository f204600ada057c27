//! The benchmark environment: one PostgreSQL, the gateway (explicit listener and, as root,
//! an eBPF-intercepted pod), an stunnel pair and an HAProxy pair, all in front of the same
//! database, plus the `bench` role and database the scenarios use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use gateway::config::{DataPlaneConfig, ReuseConfig, RoleConfig};
use gateway::harness::{
    PgRoute, PodSpec, ProxySettings, Stack, StackSpec, TcpRoute, TransparentSpec, Workload,
    node_data_plane, role,
};
use gateway::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};

use crate::peers::{self, Peer};

pub const USER: &str = "bench";
pub const DATABASE: &str = "bench";
const NAMESPACE: &str = "bench";
/// Certificates the run issues live as long as any run can.
const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const SERVICE_ACCOUNT: &str = "bench";

/// `bench` may log in as `bench` on database `bench` over both PostgreSQL routes, and use
/// the echo route.
fn roles() -> Vec<RoleConfig> {
    vec![
        role(
            "bench",
            NAMESPACE,
            &["main", REUSE_ROUTE],
            &[USER],
            &[DATABASE],
        ),
        role("bench-echo", NAMESPACE, &[ECHO_ROUTE], &[], &[]),
    ]
}

/// The route with `upstream.reuse` on, its node listener, its settings, and the scenarios
/// the `gateway-reuse` path runs.
const REUSE_ROUTE: &str = "main-reuse";
const REUSE_LISTENER: usize = 2;
const REUSE_MAX_IDLE: usize = 16;
fn reuse() -> ReuseConfig {
    ReuseConfig {
        max_idle: REUSE_MAX_IDLE,
        ..ReuseConfig::default()
    }
}
const REUSE_SCENARIOS: &[&str] = &["connect-select-8", "setup-1"];

/// The node listener that terminates the client's TLS (`gateway-tls`), and the scenarios
/// both TLS paths run: what the extra TLS leg costs on long sessions, on bulk data, and on a
/// new connection's set-up.
const TLS_LISTENER: usize = 3;
const TLS_SCENARIOS: &[&str] = &["select-8", "copy-out", "copy-in", "setup-1"];

/// The `tcp` route to the echo server, and the port pods dial it on (the database's
/// address, intercepted like 5432).
const ECHO_ROUTE: &str = "echo";
const ECHO_INTERCEPT_PORT: u16 = 7000;

/// One way from a client to the database.
#[derive(Debug, Clone)]
pub struct DataPath {
    /// `direct`, `gateway`, `gateway-ebpf`, `stunnel`, `haproxy`.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Where the `tcp` scenarios connect (through this path to the echo server).
    pub tcp_addr: String,
    /// Run clients inside transparent pod `i` (the address is the intercepted original one).
    pub pod: Option<usize>,
    /// The processes that carry this path's traffic (CPU is summed over them).
    pub tunnel_pids: Vec<u32>,
    /// What the path is, hop by hop, for the report.
    pub description: String,
    /// Only these scenarios (all when `None`).
    pub scenarios: Option<&'static [&'static str]>,
    /// The client speaks TLS to the first hop (verified like `verify-full`).
    pub tls: Option<ClientTls>,
    /// The path its ratios are taken against: `direct`, or `direct-tls` for the gateway's
    /// TLS path (the comparison is of the extra leg, not of TLS itself).
    pub baseline: &'static str,
}

/// A TLS path's client files.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA certificates that verify the server.
    pub root: PathBuf,
    /// Certificate and key, for a server that logs in by certificate (PostgreSQL itself,
    /// as the proxy logs in to it).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl DataPath {
    pub fn runs(&self, scenario: &str) -> bool {
        self.scenarios.is_none_or(|s| s.contains(&scenario))
    }

    pub fn conn_string(&self) -> String {
        let sslmode = if self.tls.is_some() {
            "require"
        } else {
            "disable"
        };
        format!(
            "host={} port={} user={USER} dbname={DATABASE} sslmode={sslmode}",
            self.host, self.port
        )
    }

    /// libpq's environment for this path (pgbench): TLS verified by name or address.
    pub fn libpq_env(&self) -> Vec<(&'static str, PathBuf)> {
        let Some(t) = &self.tls else {
            return vec![("PGSSLMODE", "disable".into())];
        };
        let mut env = vec![
            ("PGSSLMODE", "verify-full".into()),
            ("PGSSLROOTCERT", t.root.clone()),
        ];
        if let Some((cert, key)) = &t.identity {
            env.push(("PGSSLCERT", cert.clone()));
            env.push(("PGSSLKEY", key.clone()));
        }
        env
    }

    /// The bench client's TLS flags (see [`crate::client::Options`]).
    pub fn client_tls_args(&self) -> Vec<String> {
        let Some(t) = &self.tls else {
            return Vec::new();
        };
        let mut args = vec!["--tls-root".into(), t.root.display().to_string()];
        if let Some((cert, key)) = &t.identity {
            args.extend([
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
            ]);
        }
        args
    }
}

/// Everything the run started. Field order is drop order: the peers, then the stack
/// (gateway processes, pods and cgroups, PostgreSQL, the temporary directory).
pub struct Env {
    pub paths: Vec<DataPath>,
    /// Why the eBPF path is missing, when it is.
    pub transparent_skipped: Option<String>,
    _peers: Vec<Peer>,
    pub stack: Stack,
    pub work_dir: PathBuf,
}

impl Env {
    pub fn start(
        gateway_bin: &Path,
        want_transparent: bool,
        scale: u32,
        threads: u16,
    ) -> Result<Self> {
        let root = gateway::harness::is_root();
        let echo = crate::echo::start()?;
        let spec = |transparent| spec(gateway_bin, transparent, echo, threads);
        let mut transparent_skipped = None;
        let stack = if want_transparent && root {
            match Stack::start(spec(true)) {
                Ok(s) => s,
                Err(e) => {
                    let why = format!("the eBPF stack did not start: {e:#}");
                    eprintln!("bench: {why}; continuing with the explicit listener only");
                    transparent_skipped = Some(why);
                    Stack::start(spec(false))?
                }
            }
        } else {
            transparent_skipped = Some(if root {
                "--no-transparent given".into()
            } else {
                "needs root (network namespaces, cgroups, eBPF)".into()
            });
            Stack::start(spec(false))?
        };
        let work_dir = stack.dir.join("bench");
        std::fs::create_dir_all(&work_dir)?;
        init_database(&stack, scale)?;

        let pg = format!("127.0.0.1:{}", stack.pg.port).parse()?;
        let ca = CertificateAuthority::load(
            &stack.ca_dir.join(pki::WORKLOAD_CA_CERT),
            &stack.ca_dir.join(pki::WORKLOAD_CA_KEY),
        )?;
        let certs = peers::Certs::write(
            &work_dir,
            &ca,
            &peers::Pair::issue(
                &ca,
                &SpiffeId::new(
                    gateway::harness::DEMO_TRUST_DOMAIN,
                    NAMESPACE,
                    SERVICE_ACCOUNT,
                ),
            )?,
        )?;
        let db_client = CertificateAuthority::load(
            &stack.ca_dir.join(pki::DB_CLIENT_CA_CERT),
            &stack.ca_dir.join(pki::DB_CLIENT_CA_KEY),
        )?;
        let stunnel = peers::stunnel_pair(&work_dir, &certs, &[pg, echo])?;
        let haproxy = peers::haproxy_pair(&work_dir, &certs, &[pg, echo], threads)?;

        let gw_pids: Vec<u32> = [stack.node.as_ref(), stack.proxy.as_ref()]
            .into_iter()
            .flatten()
            .map(|c| c.id())
            .collect();
        let mut paths = vec![DataPath {
            name: "direct".into(),
            host: "127.0.0.1".into(),
            port: stack.pg.port,
            tcp_addr: echo.to_string(),
            pod: None,
            tunnel_pids: Vec::new(),
            description: "client → PostgreSQL (TCP loopback, no TLS)".into(),
            scenarios: None,
            tls: None,
            baseline: "direct",
        }];
        // PostgreSQL's own TLS, logged in by certificate like the proxy: what an application
        // with `sslmode=verify-full` pays without the gateway.
        let (cert, key) = db_client.issue(&LeafSpec::db_client(USER), DAY)?;
        let (cert_path, key_path) = (
            work_dir.join("direct-tls.crt"),
            work_dir.join("direct-tls.key"),
        );
        pki::write_public(&cert_path, &cert)?;
        pki::write_secret(&key_path, &key)?;
        paths.push(DataPath {
            name: "direct-tls".into(),
            description: "client → TLS 1.3 (rustls or libpq) → PostgreSQL, certificate login"
                .into(),
            scenarios: Some(TLS_SCENARIOS),
            tls: Some(ClientTls {
                root: stack.trust_bundle.clone(),
                identity: Some((cert_path, key_path)),
            }),
            ..paths[0].clone()
        });
        let l = stack.listeners[0];
        let gateway = DataPath {
            name: "gateway".into(),
            host: l.ip().to_string(),
            port: l.port(),
            tcp_addr: stack.listeners[1].to_string(),
            pod: None,
            tunnel_pids: gw_pids.clone(),
            description: "client → node explicit listener → mTLS 1.3 → proxy → TLS → PostgreSQL"
                .into(),
            scenarios: None,
            tls: None,
            baseline: "direct",
        };
        paths.push(gateway.clone());
        // The client's own TLS, terminated by the node (a short-lived server certificate the
        // client verifies with the gateway's trust bundle).
        let l = stack.listeners[TLS_LISTENER];
        paths.push(DataPath {
            name: "gateway-tls".into(),
            host: l.ip().to_string(),
            port: l.port(),
            description: "client → TLS 1.3 → node (client TLS terminated) → mTLS 1.3 → proxy → TLS → PostgreSQL; ratios against `direct-tls`".into(),
            scenarios: Some(TLS_SCENARIOS),
            tls: Some(ClientTls {
                root: stack.trust_bundle.clone(),
                identity: None,
            }),
            baseline: "direct-tls",
            ..gateway.clone()
        });
        // The same hops with `upstream.reuse` on: only where a new session's server login
        // is what is measured (long sessions are the `gateway` path's figures).
        let l = stack.listeners[REUSE_LISTENER];
        paths.push(DataPath {
            name: "gateway-reuse".into(),
            host: l.ip().to_string(),
            port: l.port(),
            description: format!(
                "as `gateway`, with the proxy's upstream.reuse {{ max_idle: {REUSE_MAX_IDLE} }} (server sessions reset with DISCARD ALL and kept for the next client)"
            ),
            scenarios: Some(REUSE_SCENARIOS),
            ..gateway
        });
        if let Some(k) = &stack.kernel {
            paths.push(DataPath {
                name: "gateway-ebpf".into(),
                host: k.db_addr.ip().to_string(),
                port: k.db_addr.port(),
                tcp_addr: SocketAddr::new(k.db_addr.ip(), ECHO_INTERCEPT_PORT).to_string(),
                pod: Some(0),
                tunnel_pids: gw_pids,
                description:
                    "client in pod netns → connect4 rewrite → node → mTLS 1.3 → proxy → TLS → PostgreSQL"
                        .into(),
                scenarios: None,
                tls: None,
                baseline: "direct",
            });
        }
        for (name, peer) in [("stunnel", &stunnel), ("haproxy", &haproxy)] {
            paths.push(DataPath {
                name: name.into(),
                host: peer.addrs[0].ip().to_string(),
                port: peer.addrs[0].port(),
                tcp_addr: peer.addrs[1].to_string(),
                pod: None,
                tunnel_pids: peer.pids(),
                description: format!(
                    "client → {name} client → mTLS 1.3 (ECDSA P-256) → {name} server → PostgreSQL"
                ),
                scenarios: None,
                tls: None,
                baseline: "direct",
            });
        }
        Ok(Self {
            paths,
            transparent_skipped,
            _peers: vec![stunnel, haproxy],
            stack,
            work_dir,
        })
    }

    /// A command running `program` where path `p`'s clients run (host, or inside the pod).
    pub fn command(&self, p: &DataPath, program: &Path) -> Command {
        match (p.pod, &self.stack.kernel) {
            (Some(i), Some(k)) => k.pods[i].command(&program.to_string_lossy()),
            _ => Command::new(program),
        }
    }
}

fn spec(gateway_bin: &Path, transparent: bool, echo: SocketAddr, threads: u16) -> StackSpec {
    StackSpec {
        gateway_bin: gateway_bin.to_owned(),
        // Listener 0: PostgreSQL; listener 1: the echo server's `tcp` route.
        workloads: vec![
            Workload::new(NAMESPACE, SERVICE_ACCOUNT),
            Workload::tcp(NAMESPACE, SERVICE_ACCOUNT, ECHO_ROUTE),
            Workload {
                route: REUSE_ROUTE.into(),
                ..Workload::new(NAMESPACE, SERVICE_ACCOUNT)
            },
            Workload {
                client_tls: true,
                ..Workload::new(NAMESPACE, SERVICE_ACCOUNT)
            },
        ],
        roles: roles(),
        proxy: ProxySettings {
            threads: Some(threads.into()),
            ..ProxySettings::default()
        },
        data_plane: DataPlaneConfig {
            threads: threads.into(),
            ..node_data_plane()
        },
        extra_databases: Vec::new(),
        tcp_routes: vec![TcpRoute {
            name: ECHO_ROUTE.into(),
            upstream: echo,
            intercept_port: ECHO_INTERCEPT_PORT,
        }],
        setup_sql: vec![
            format!("CREATE ROLE {USER} LOGIN"),
            format!("CREATE DATABASE {DATABASE} OWNER {USER}"),
        ],
        transparent: transparent.then(|| TransparentSpec {
            pods: vec![PodSpec::new(NAMESPACE, "bench-0", SERVICE_ACCOUNT)],
            host_identity: None,
            ipv6: false,
            join: false,
            ..TransparentSpec::default()
        }),
        // `direct` and the TLS peers' server ends log in over plain TCP; TLS logins still
        // fall through to the certificate rule, so the gateway's upstream is unchanged.
        extra_hba: vec!["hostnossl all all 127.0.0.1/32 trust".into()],
        upstream_reuse: None,
        pg_routes: vec![PgRoute {
            name: REUSE_ROUTE.into(),
            reuse: Some(reuse()),
            admin_user: None,
        }],
    }
}

/// `pgbench -i` as the `bench` role over the trusted unix socket.
fn init_database(stack: &Stack, scale: u32) -> Result<()> {
    let out = Command::new(stack.pg.bin_dir.join("pgbench"))
        .arg("-i")
        .arg("-q")
        .args(["-s", &scale.to_string()])
        .arg("-h")
        .arg(&stack.pg.socket_dir)
        .args(["-p", &stack.pg.port.to_string(), "-U", USER, DATABASE])
        .output()
        .context("failed to run pgbench -i")?;
    ensure!(
        out.status.success(),
        "pgbench -i failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(stack.pg.bin_dir.join("psql"))
        .arg("-h")
        .arg(&stack.pg.socket_dir)
        .args([
            "-p",
            &stack.pg.port.to_string(),
            "-U",
            USER,
            "-d",
            DATABASE,
            "-v",
            "ON_ERROR_STOP=1",
            "-Xq",
            "-c",
            "CREATE UNLOGGED TABLE copy_sink (line text)",
        ])
        .output()
        .context("failed to run psql")?;
    ensure!(
        out.status.success(),
        "creating the COPY sink table failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
