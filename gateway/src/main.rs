//! The `gateway` binary: `node`, `proxy`, `ca`, `aws`, and `up` (with the cargo feature `harness`).
//! Every flag also reads a `GATEWAY_*` environment variable, so the same image is configured
//! from a Kubernetes manifest or a shell alike.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::config::{NodeConfig, ProxyConfig};
use gateway::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "db-gateway: passwordless PostgreSQL for Kubernetes workloads"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info`, `gateway=debug`).
    #[arg(long, global = true, env = "GATEWAY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (per-node DaemonSet).
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        #[command(subcommand)]
        action: Option<NodeAction>,
        #[arg(long, env = "GATEWAY_CONFIG", required = false)]
        config: Option<PathBuf>,
        /// Overrides `admin_listen` from the file.
        #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Overrides `node_name` from the file.
        #[arg(long, env = "GATEWAY_NODE_NAME")]
        node_name: Option<String>,
    },
    /// Run the proxy service.
    Proxy {
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: PathBuf,
        /// Overrides `listen` from the file.
        #[arg(long, env = "GATEWAY_LISTEN")]
        listen: Option<SocketAddr>,
        /// Overrides `admin_listen` from the file.
        #[arg(long, env = "GATEWAY_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Overrides `audit.path` from the file (`-` is standard output).
        #[arg(long, env = "GATEWAY_AUDIT_LOG")]
        audit_log: Option<String>,
        /// Overrides `replica_index` from the file: one ConfigMap for all replicas, each
        /// taking its index from its StatefulSet pod index.
        #[arg(long, env = "GATEWAY_REPLICA_INDEX")]
        replica_index: Option<u8>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Certificate authority tools.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Amazon Web Services tools.
    Aws {
        #[command(subcommand)]
        command: AwsCommand,
    },
    /// Run everything locally: PostgreSQL, CA, proxy, node agent. Prints `READY <conn>`.
    #[cfg(feature = "harness")]
    Up {
        /// Keep the temporary directory on exit (for inspection).
        #[arg(long, env = "GATEWAY_UP_KEEP")]
        keep: bool,
        /// Explicit-mode listener instead of an eBPF-intercepted demo pod (the default as root).
        #[arg(long, env = "GATEWAY_UP_EXPLICIT")]
        explicit: bool,
    },
}

#[derive(Subcommand)]
enum NodeAction {
    /// Detach and remove the kernel programs, maps and links pinned by a node agent.
    Uninstall {
        #[arg(long, env = "GATEWAY_BPF_PIN_DIR", default_value = gateway::config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Also delete the interface holding the agent address (e.g. `dbgw0`).
        #[arg(long, env = "GATEWAY_AGENT_INTERFACE")]
        interface: Option<String>,
    },
}

#[derive(Subcommand)]
enum AwsCommand {
    /// Print an RDS IAM authentication token, like `aws rds generate-db-auth-token`, signed
    /// by the proxy's code with credentials from the standard AWS provider chain.
    RdsToken {
        /// The database endpoint the token is for (the proxy's `iam_host`).
        #[arg(long, env = "GATEWAY_RDS_HOST")]
        host: String,
        #[arg(long, env = "GATEWAY_RDS_PORT", default_value_t = gateway::config::DEFAULT_RDS_PORT)]
        port: u16,
        /// The database user.
        #[arg(long, env = "GATEWAY_RDS_USER")]
        user: String,
        #[arg(long, env = "AWS_REGION")]
        region: String,
        /// Sign as of this time (RFC 3339, e.g. 2026-01-02T03:04:05Z) instead of now.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        at: Option<std::time::SystemTime>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate node or proxy config files with the loaders `node` and `proxy` use
    /// (errors name file:line:column). Paths inside are not opened: certificates in mounted
    /// Secrets need not exist where the check runs.
    Check {
        /// `node` or `proxy`; by default told from the file's top-level keys (`proxy`,
        /// `listeners`, `interception` → node; `listen`, `databases`, `tls` → proxy).
        #[arg(long, env = "GATEWAY_CONFIG_KIND", value_enum)]
        kind: Option<ConfigKind>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ConfigKind {
    Node,
    Proxy,
}

/// Which loader a file is for, from its top-level keys.
fn config_kind(path: &std::path::Path) -> anyhow::Result<ConfigKind> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read config {}", path.display()))?;
    let value: serde_norway::Value =
        serde_norway::from_str(&text).with_context(|| format!("{}: not YAML", path.display()))?;
    let key = |k: &str| value.get(k).is_some();
    match (
        key("proxy") || key("listeners") || key("interception"),
        key("listen") || key("databases") || key("tls"),
    ) {
        (true, false) => Ok(ConfigKind::Node),
        (false, true) => Ok(ConfigKind::Proxy),
        _ => anyhow::bail!(
            "{}: cannot tell a node config from a proxy config by its top-level keys; give --kind node or --kind proxy",
            path.display()
        ),
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the workload CA and the database-client CA in DIR.
    Init {
        #[arg(long, env = "GATEWAY_CA_DIR")]
        dir: PathBuf,
        #[arg(long, env = "GATEWAY_TRUST_DOMAIN")]
        trust_domain: String,
    },
    /// Issue a workload certificate (PREFIX.crt, PREFIX.key).
    Issue {
        #[arg(long, env = "GATEWAY_CA_DIR")]
        dir: PathBuf,
        /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
        #[arg(long, env = "GATEWAY_SPIFFE_ID")]
        spiffe_id: String,
        #[arg(long, env = "GATEWAY_CERT_OUT")]
        out: PathBuf,
        #[arg(long, env = "GATEWAY_CERT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Issue a node agent's certificate (spiffe://<td>/node/<name>), to authenticate to `ca serve`.
    IssueNode {
        #[arg(long, env = "GATEWAY_CA_DIR")]
        dir: PathBuf,
        #[arg(long, env = "GATEWAY_NODE_NAME")]
        node_name: String,
        #[arg(long, env = "GATEWAY_CERT_OUT")]
        out: PathBuf,
        #[arg(long, env = "GATEWAY_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Rotate the workload CA's root without ending a session: `prepare` (new root, bundle
    /// of both), `activate` (the new root signs), `finish` (bundle of the new root only).
    Rotate {
        #[arg(value_enum)]
        step: RotateStep,
        #[arg(long, env = "GATEWAY_CA_DIR")]
        dir: PathBuf,
    },
    /// Serve workload certificates to node agents, for pods on the asking node only.
    Serve(Box<gateway::ca::ServeOptions>),
    /// Join tokens for `token` node joins (`gateway ca serve --join-tokens DIR`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Issue a server certificate from the workload CA (the proxy's, or a database's).
    IssueServer {
        #[arg(long, env = "GATEWAY_CA_DIR")]
        dir: PathBuf,
        #[arg(long = "dns", env = "GATEWAY_CERT_DNS", value_delimiter = ',')]
        dns: Vec<String>,
        #[arg(long = "ip", env = "GATEWAY_CERT_IP", value_delimiter = ',')]
        ip: Vec<IpAddr>,
        #[arg(long, env = "GATEWAY_CERT_OUT")]
        out: PathBuf,
        #[arg(long, env = "GATEWAY_CERT_TTL", default_value = "720h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RotateStep {
    Prepare,
    Activate,
    Finish,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a join token for one node name; prints the token (stored only hashed).
    Create {
        /// The token directory `gateway ca serve --join-tokens` reads.
        #[arg(long, env = "GATEWAY_JOIN_TOKENS")]
        tokens: PathBuf,
        #[arg(long, env = "GATEWAY_NODE_NAME")]
        node_name: String,
        /// How long the token may be used to join.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Only the first join may use it (the node renews with its certificate).
        #[arg(long)]
        one_time: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for people: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    gateway::admin::raise_open_files_limit();
    if let Err(e) = run(cli.command) {
        eprintln!("gateway: error: {e:#}");
        std::process::exit(1);
    }
}

fn workload_ca(dir: &std::path::Path) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::load(
        &dir.join(pki::WORKLOAD_CA_CERT),
        &dir.join(pki::WORKLOAD_CA_KEY),
    )
    .with_context(|| {
        format!(
            "loading the workload CA from {} (run `gateway ca init` first)",
            dir.display()
        )
    })
}

fn write_pair(out: &std::path::Path, cert: &str, key: &str) -> anyhow::Result<()> {
    let cert_path = out.with_extension("crt");
    let key_path = out.with_extension("key");
    pki::write_public(&cert_path, cert)?;
    pki::write_secret(&key_path, key)?;
    println!(
        "wrote {} and {} (mode 0600)",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Node {
            action: Some(NodeAction::Uninstall { pin_dir, interface }),
            ..
        } => {
            gateway::ebpf::uninstall(&pin_dir)?;
            println!("removed interception pinned under {}", pin_dir.display());
            if let Some(ifname) = interface {
                let o = std::process::Command::new("ip")
                    .args(["link", "del", &ifname])
                    .output()
                    .context("failed to run `ip` (package iproute2)")?;
                anyhow::ensure!(
                    o.status.success(),
                    "failed to delete interface {ifname}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                println!("removed interface {ifname}");
            }
            Ok(())
        }
        Command::Node {
            action: None,
            config,
            admin_listen,
            node_name,
        } => {
            let config =
                config.context("--config (or GATEWAY_CONFIG) is required to run the node agent")?;
            let mut cfg = NodeConfig::load(&config)?;
            if let Some(a) = admin_listen {
                cfg.admin_listen = a;
            }
            if let Some(n) = node_name {
                cfg.node_name = n;
            }
            tracing::info!(config = %config.display(), node = %cfg.node_name, listeners = cfg.listeners.len(), proxy = %cfg.proxy.address, "starting node agent");
            gateway::node::run(cfg)
        }
        Command::Proxy {
            config,
            listen,
            admin_listen,
            audit_log,
            replica_index,
        } => {
            let mut cfg = ProxyConfig::load(&config)?;
            if replica_index.is_some() {
                cfg.replica_index = replica_index;
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(a) = admin_listen {
                cfg.admin_listen = a;
            }
            if let Some(p) = audit_log {
                cfg.audit.path = p;
            }
            tracing::info!(config = %config.display(), listen = %cfg.listen, databases = cfg.databases.len(), roles = cfg.roles.len(), "starting proxy");
            gateway::proxy::run(cfg, Some(config))
        }
        Command::Config {
            command: ConfigCommand::Check { kind, files },
        } => {
            let mut failed = 0;
            for file in &files {
                let checked = kind.map_or_else(|| config_kind(file), Ok).and_then(|k| {
                    match k {
                        ConfigKind::Node => NodeConfig::load(file).map(drop)?,
                        ConfigKind::Proxy => ProxyConfig::load(file).map(drop)?,
                    }
                    Ok(k)
                });
                match checked {
                    Ok(k) => println!("{}: ok ({k:?} config)", file.display()),
                    Err(e) => {
                        eprintln!("{e:#}");
                        failed += 1;
                    }
                }
            }
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} config files are invalid",
                files.len()
            );
            Ok(())
        }
        Command::Ca { command } => match command {
            CaCommand::Init { dir, trust_domain } => {
                pki::init_ca(&dir, &trust_domain)?;
                println!(
                    "created workload and database-client CAs in {}",
                    dir.display()
                );
                Ok(())
            }
            CaCommand::Issue {
                dir,
                spiffe_id,
                out,
                ttl,
            } => {
                let id = SpiffeId::parse(&spiffe_id)?;
                let td = std::fs::read_to_string(dir.join("trust-domain")).unwrap_or_default();
                if !td.trim().is_empty() && td.trim() != id.trust_domain {
                    anyhow::bail!(
                        "{spiffe_id} is not in this CA's trust domain {:?}",
                        td.trim()
                    );
                }
                let (cert, key) = workload_ca(&dir)?.issue(&LeafSpec::workload(&id), ttl)?;
                write_pair(&out, &cert, &key)
            }
            CaCommand::IssueNode {
                dir,
                node_name,
                out,
                ttl,
            } => {
                let td = std::fs::read_to_string(dir.join("trust-domain"))
                    .with_context(|| format!("{} holds no CA", dir.display()))?;
                let (cert, key) =
                    workload_ca(&dir)?.issue(&LeafSpec::node(td.trim(), &node_name), ttl)?;
                write_pair(&out, &cert, &key)
            }
            CaCommand::Rotate { step, dir } => {
                use gateway::pki::rotate;
                let (done, next) = match step {
                    RotateStep::Prepare => (
                        rotate::prepare(&dir)?,
                        "publish the bundle to every verifier (proxy tls.client_ca, node proxy.ca and interception.ca.ca, the trust-bundle ConfigMap), wait until all have reloaded it, then run `activate`",
                    ),
                    RotateStep::Activate => (
                        rotate::activate(&dir)?,
                        "the new root signs now; issue the proxy's and the CA's server certificates again, and run `finish` once the longest certificate lifetime has passed",
                    ),
                    RotateStep::Finish => (
                        rotate::finish(&dir)?,
                        "publish the bundle again; the old root is trusted nowhere once every verifier has reloaded it",
                    ),
                };
                println!(
                    "{} holds {} root(s): {next}",
                    done.bundle.display(),
                    done.roots_in_bundle
                );
                Ok(())
            }
            CaCommand::Serve(opts) => gateway::ca::run(*opts),
            CaCommand::Token {
                command:
                    TokenCommand::Create {
                        tokens,
                        node_name,
                        ttl,
                        one_time,
                    },
            } => {
                let token = gateway::ca::join::token::create(&tokens, &node_name, ttl, one_time)?;
                println!("{token}");
                Ok(())
            }
            CaCommand::IssueServer {
                dir,
                dns,
                ip,
                out,
                ttl,
            } => {
                if dns.is_empty() && ip.is_empty() {
                    anyhow::bail!("give at least one --dns or --ip for the server certificate");
                }
                let (cert, key) = workload_ca(&dir)?.issue(&LeafSpec::server(dns, ip), ttl)?;
                write_pair(&out, &cert, &key)
            }
        },
        Command::Aws {
            command:
                AwsCommand::RdsToken {
                    host,
                    port,
                    user,
                    region,
                    at,
                },
        } => {
            let key = gateway::upstream::rds_iam::TokenKey {
                host,
                port,
                user,
                region,
            };
            let token = gateway::upstream::rds_iam::cli_token(&key, at)?;
            println!("{token}");
            Ok(())
        }
        #[cfg(feature = "harness")]
        Command::Up { keep, explicit } => gateway::harness::run(keep, explicit),
    }
}
