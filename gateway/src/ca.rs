//! `gateway ca serve`: the workload CA as a service. A node agent authenticates with its
//! own certificate (`spiffe://<td>/node/<name>`), names a pod by UID and sends a CSR; the CA
//! signs a workload certificate for that pod's namespace and service account only if its
//! pod directory places the pod on that very node. A compromised node can therefore mint
//! identities only for pods that run on it.
//!
//! Wire: HTTP/1.1 over mutual TLS 1.3, `POST /v1/workload-certificates` with JSON
//! `{"pod_uid": "...", "csr": "<PEM>"}` → `200 {"certificate": "<PEM>", "spiffe_id": "..."}`
//! or `403`/`400` `{"error": "..."}`.
//!
//! - `ca/wire.rs`: the path and the JSON bodies, shared by both ends;
//! - `ca/service.rs`: the signing decision ([`service::CaService::issue`]) and the HTTP
//!   server;
//! - `ca/client.rs`: the client the node agent asks with ([`client::CaClient`]);
//! - `ca/reload.rs`: the signing root, root bundle and server certificate, reloaded when
//!   their files change (a root rotation needs no restart);
//! - here: [`run`], the wiring of `gateway ca serve`.
//!
//! Imports the ground floor (`pki`, `pod`, `identity::inventory`, `tunnel`'s TLS settings,
//! `admin`, `telemetry`); nothing imports the CA but `main` and the node's use of the
//! client.

pub mod client;
pub mod join;
pub mod rate_limit;
pub mod reload;
pub mod server_names;
pub mod service;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use self::service::{CaService, serve};

/// What `gateway ca serve` needs: its command-line flags, each with a `GATEWAY_*`
/// environment fallback.
#[derive(Debug, clap::Args)]
pub struct ServeOptions {
    #[arg(long, env = "GATEWAY_CA_DIR")]
    pub dir: std::path::PathBuf,
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:7444")]
    pub listen: SocketAddr,
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "127.0.0.1:9103")]
    pub admin_listen: SocketAddr,
    /// The CA service's server certificate (e.g. from `gateway ca issue-server`).
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: std::path::PathBuf,
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: std::path::PathBuf,
    /// Static pod inventory: which pod runs on which node as whom (bare hosts, tests).
    #[arg(
        long,
        env = "GATEWAY_INVENTORY",
        required_unless_present = "kubernetes_pods",
        conflicts_with = "kubernetes_pods"
    )]
    pub inventory: Option<std::path::PathBuf>,
    /// Learn pods from the Kubernetes API (a watch of every pod, as the in-cluster service
    /// account or $KUBECONFIG; needs `get`, `list`, `watch` on pods): a node gets workload
    /// certificates only for pods the API server places on it.
    #[arg(long, env = "GATEWAY_KUBERNETES_PODS")]
    pub kubernetes_pods: bool,
    /// Lifetime of workload certificates (renewed by nodes at half-life).
    #[arg(long, env = "GATEWAY_CERT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// What server certificates (client TLS at the nodes) may name: IPs, CIDRs, DNS names,
    /// `*.suffix`, comma-separated. Empty (the default) issues none.
    #[arg(long, env = "GATEWAY_SERVER_NAMES", default_value = "")]
    pub server_names: String,
    /// Certificate requests per second one node may make in the long run (`429` beyond).
    #[arg(long, env = "GATEWAY_NODE_RATE", default_value_t = 20.0)]
    pub node_rate: f64,
    /// Certificate requests one node may make at once (a node starting many pods).
    #[arg(long, env = "GATEWAY_NODE_BURST", default_value_t = 200)]
    pub node_burst: u32,
    /// Node joins (`ca::join`).
    #[command(flatten)]
    pub join: join::JoinOptions,
}

/// `gateway ca serve`: runs until SIGTERM/SIGINT.
pub fn run(opts: ServeOptions) -> anyhow::Result<()> {
    use anyhow::Context;
    let metrics = crate::admin::install_metrics()?;
    crate::telemetry::ca::describe();
    // A Kubernetes directory records the watch's metrics.
    crate::telemetry::identity::describe();
    let readiness = crate::admin::Readiness::default();
    let admin_addr = crate::admin::spawn(opts.admin_listen, metrics, readiness.clone())?;
    let trust_domain = std::fs::read_to_string(opts.dir.join("trust-domain"))
        .with_context(|| format!("{} holds no CA (run `gateway ca init`)", opts.dir.display()))?
        .trim()
        .to_owned();
    let files = reload::CaFiles {
        dir: opts.dir.clone(),
        tls_cert: opts.tls_cert.clone(),
        tls_key: opts.tls_key.clone(),
    };
    let stamps = files.stamps();
    let live = reload::Live::new(files.load()?);
    let server_names =
        self::server_names::ServerNames::parse(&opts.server_names).context("--server-names")?;
    let joins = opts.join.build(&live.signing, &trust_domain)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pods = pod_directory(&opts, &rt, &readiness)?;
    let svc = Arc::new(CaService {
        ca: live.signing.clone(),
        trust_domain,
        ttl: opts.ttl,
        pods,
        server_names,
        limits: rate_limit::NodeLimits::new(opts.node_rate, opts.node_burst),
    });
    rt.block_on(async move {
        let listener = TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("failed to bind CA listen address {}", opts.listen))?;
        let local = listener.local_addr()?;
        if let (Some(joins), Some(addr)) = (joins, opts.join.join_listen) {
            let local = join::spawn(joins, addr, live.join_tls.clone()).await?;
            println!("JOIN {local}");
        }
        tracing::info!(listen = %local, admin = %admin_addr, "CA service ready");
        println!("ADMIN {admin_addr}");
        println!("LISTENING {local}");
        tokio::spawn(reload::watch(files, live.clone(), stamps));
        tokio::select! {
            _ = serve(svc, listener, live.tls.clone()) => {}
            _ = crate::admin::shutdown_signal() => tracing::info!("shutdown signal: CA service exiting"),
        }
        anyhow::Ok(())
    })
}

/// The CA's pod directory: the static inventory, or a watch of every pod of the cluster.
/// The watch keeps `/readyz` failing until its first complete list is in (before that
/// every pod is unknown and every request would be refused).
fn pod_directory(
    opts: &ServeOptions,
    rt: &tokio::runtime::Runtime,
    readiness: &crate::admin::Readiness,
) -> anyhow::Result<Box<dyn crate::pod::PodDirectory>> {
    use anyhow::Context;
    if let Some(path) = &opts.inventory {
        return Ok(Box::new(crate::identity::inventory::Inventory::load(path)?));
    }
    let client = rt.block_on(kube::Client::try_default()).context(
        "Kubernetes client for --kubernetes-pods (in-cluster service account or $KUBECONFIG)",
    )?;
    let pods = crate::identity::kube::KubePods::spawn_cluster(client, rt.handle());
    let blocked = readiness.block("pod list from the Kubernetes API");
    let watch = Arc::clone(&pods);
    rt.spawn(async move {
        while !watch.is_ready() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(pods = watch.len(), "pod directory ready");
        drop(blocked);
    });
    Ok(Box::new(pods))
}
