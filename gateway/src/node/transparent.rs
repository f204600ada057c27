//! Transparent mode: connections that the kernel programs redirected to the agent address.
//! Per connection ([`Transparent::decide`]) the agent asks the kernel where the application
//! meant to go and from which cgroup, resolves that cgroup to a workload and picks the
//! database route by original destination; the connection then takes that workload's
//! certificate from the cache (`certificates`). The lookups take no process-wide lock: the
//! kernel map is read through `&self`, the resolver and the certificate cache through read
//! locks. A cgroup not seen before is looked up on the identity's lookup thread
//! (`identity::lookup`: one lookup per cgroup id, rate-limited tree walks), a certificate
//! not cached yet on the control runtime: neither a tree walk nor a CA call ever runs on a
//! data-plane thread.
//!
//! Identity comes only from the kernel's record (the cgroup of the connecting socket);
//! nothing the application sends can change it.
//!
//! Set-up ([`setup`], once at start-up): loads or adopts the kernel programs, makes the
//! agent address local (`interface`), starts the pod watch and builds the resolver, the
//! routes and the certificate cache.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls_pki_types::{CertificateDer, ServerName};

use super::certificates::{Certificates, Fetcher};
use super::error::NodeError;
use super::interface::ensure_local_address;
use super::server_certificates::{ServerCertificates, ServerFetcher};
use crate::config::{InterceptionConfig, NodeConfig};
use crate::ebpf::{self, Interception, OrigDst, OrigDsts};
use crate::identity::lookup::Lookups;
use crate::identity::pod_path::KubeletCgroups;
use crate::identity::{IdentityError, Resolver, Workload};
use crate::pod::{HostIdentity, PodDirectory};
use crate::route::{ClientTls, DestinationError, Protocol, RouteTable, parse_destination};
use crate::telemetry::node as telemetry;

/// Everything transparent connections share (one per node, used by every data thread).
pub struct Transparent {
    pub orig_dsts: OrigDsts,
    pub lookups: Lookups,
    pub routes: RouteTable,
    pub certs: Certificates,
    /// Server certificates for client TLS, by (route, dialled IP).
    pub server_certs: ServerCertificates,
    pub unknown_pod_wait: Duration,
}

/// What [`setup`] makes: the data plane's part, and the control side's.
pub struct Setup {
    pub transparent: Transparent,
    /// Kept by `run` to switch serving on and off.
    pub interception: Interception,
    /// To run on the control runtime.
    pub fetcher: Fetcher,
    /// To run on the control runtime too: server certificates for client TLS.
    pub server_fetcher: ServerFetcher,
}

/// A connection's target, decided from kernel facts.
pub struct Decided {
    pub orig: OrigDst,
    pub route: String,
    pub protocol: Protocol,
    pub workload: Workload,
    /// The route's client TLS (`None`: `SSLRequest` gets `N`).
    pub client_tls: Option<Arc<ClientTls>>,
}

impl Transparent {
    pub fn routes_from(
        config: &[crate::config::RouteConfig],
    ) -> Result<RouteTable, DestinationError> {
        let mut table = RouteTable::default();
        for r in config {
            let tls = (r.protocol.is_postgres() && r.client_tls.enabled).then(|| ClientTls {
                server_names: r.client_tls.server_names.clone(),
            });
            table.add_with_tls(
                r.match_destination.iter().map(String::as_str),
                &r.route,
                r.protocol,
                tls,
            )?;
        }
        Ok(table)
    }

    /// Where the connection from `peer` was going, and whose it is. A refusal comes with
    /// the protocol to refuse in (`postgres` while the route is not known).
    pub async fn decide(&self, peer: SocketAddr) -> Result<Decided, (NodeError, Protocol)> {
        let unknown = |e| (e, Protocol::Postgres);
        let orig = self
            .orig_dsts
            .lookup(peer)
            .map_err(NodeError::Lookup)
            .map_err(unknown)?
            .ok_or(NodeError::NotIntercepted(peer))
            .map_err(unknown)?;
        let route = self
            .routes
            .lookup(orig.dst)
            .ok_or(NodeError::NoRoute(orig.dst))
            .map_err(unknown)?;
        let workload = self
            .resolve(orig.cgroup_id)
            .await
            .map_err(|e| (e, route.protocol))?;
        Ok(Decided {
            orig,
            route: route.name.clone(),
            protocol: route.protocol,
            workload,
            client_tls: route.client_tls.clone(),
        })
    }

    /// Resolves, waiting up to `unknown_pod_wait` for a pod the directory has not seen yet.
    async fn resolve(&self, cgroup_id: u64) -> Result<Workload, NodeError> {
        let deadline = Instant::now() + self.unknown_pod_wait;
        loop {
            match self.lookups.resolve(cgroup_id).await {
                Ok(w) => return Ok(w),
                Err(IdentityError::UnknownPod { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    metrics::counter!(telemetry::IDENTITY_FAILURES_TOTAL).increment(1);
                    return Err(NodeError::Unidentified(e));
                }
            }
        }
    }
}

/// Loads (or adopts) the kernel programs and builds the resolver, the routes and the
/// certificate cache. The interception is not serving yet (see `Interception::set_serving`).
pub fn setup(
    cfg: &NodeConfig,
    i: &InterceptionConfig,
    proxy_ca: &[CertificateDer<'static>],
    control: &tokio::runtime::Runtime,
    readiness: &crate::admin::Readiness,
) -> anyhow::Result<Setup> {
    let SocketAddr::V4(agent_v4) = i.agent_address else {
        anyhow::bail!(
            "interception.agent_address must be IPv4 (got {})",
            i.agent_address
        );
    };
    let agent_v6 = match i.agent_address_v6 {
        None => None,
        Some(SocketAddr::V6(a)) => Some(a),
        Some(other) => anyhow::bail!("interception.agent_address_v6 must be IPv6 (got {other})"),
    };
    let mut ports = i.ports.clone();
    let mut cidrs = Vec::new();
    for d in &i.destinations {
        let d =
            parse_destination(d).map_err(|e| anyhow::anyhow!("interception.destinations: {e}"))?;
        match d.net {
            None => ports.push(d.port),
            Some((ip, prefix)) => cidrs.push((ip, prefix, d.port)),
        }
    }
    let cgroup2 = crate::identity::cgroup::cgroup2_mount()?;
    let attach_to = i.cgroup.clone().unwrap_or_else(|| cgroup2.clone());
    let own_cgroup = crate::identity::cgroup::current_cgroup()?;
    let icfg = ebpf::InterceptConfig {
        agent_v4,
        agent_v6,
        ports,
        cidrs,
        agent_cgroup_id: ebpf::cgroup_id(&own_cgroup)?,
        agent_mark: 0,
        fail_open: i.fail_open,
        max_connections: i.max_connections,
        connections_per_cgroup: i.connections_per_cgroup,
    };
    ensure_local_address(&i.agent_interface, i.agent_address.ip())?;
    if let Some(v6) = i.agent_address_v6 {
        ensure_local_address(&i.agent_interface, v6.ip())?;
    }
    if let Some(parent) = i.pin_dir.parent() {
        ebpf::ensure_bpffs(parent)?;
    }
    let interception = Interception::install_or_adopt(&attach_to, &i.pin_dir, &icfg)
        .with_context(|| format!("interception on cgroup {}", attach_to.display()))?;
    tracing::info!(cgroup = %attach_to.display(), pins = %i.pin_dir.display(), adopted = interception.adopted(), "interception attached");
    let orig_dsts = interception
        .orig_dsts()
        .with_context(|| format!("interception on cgroup {}", attach_to.display()))?;

    let cgroups = crate::identity::cgroup::CgroupPaths::new(cgroup2);
    let pods: Arc<dyn PodDirectory> = match (&i.identity.inventory, &i.identity.kubernetes) {
        (Some(path), _) => Arc::new(crate::identity::inventory::Inventory::load(path)?),
        (None, Some(k)) => kube_pods(&cfg.node_name, k.host.clone(), k.ready_timeout)?,
        (None, None) => anyhow::bail!("interception.identity: no pod source configured"),
    };
    let kubelet = KubeletCgroups::new(&i.identity.kubelet_cgroup_roots)?;
    let resolver = Resolver::from_directory(
        cgroups,
        kubelet,
        Box::new(pods.clone()),
        &i.identity.trust_domain,
        &cfg.node_name,
    )?;
    let lookups = Lookups::spawn(resolver, i.identity.cgroup_walk_interval)
        .context("start the cgroup lookup thread")?;
    let node_tls = super::node_certificate::ca_tls(&cfg.node_name, &i.ca, control, readiness)?;
    let ca = crate::ca::client::CaClient {
        addr: i.ca.address.clone(),
        server_name: ServerName::try_from(i.ca.server_name.clone())
            .with_context(|| format!("interception.ca.server_name {:?}", i.ca.server_name))?,
        tls: Arc::new(node_tls),
    };
    let (server_certs, server_fetcher) =
        ServerCertificates::new(ca.clone(), i.ca.timeout, Some(readiness.clone()));
    // Certificates of pods that leave the directory are dropped (revocation by deletion).
    let (certs, fetcher) = Certificates::new(
        ca,
        i.ca.timeout,
        proxy_ca.to_vec(),
        Some(pods),
        Some(readiness.clone()),
    );
    // The bundle that verifies the proxy reloads when its file changes (root rotation).
    let fetcher = fetcher.watch_bundle(cfg.proxy.ca.clone());
    Ok(Setup {
        transparent: Transparent {
            orig_dsts,
            lookups,
            routes: Transparent::routes_from(&i.routes)
                .map_err(|e| anyhow::anyhow!("interception.routes: {e}"))?,
            certs,
            server_certs,
            unknown_pod_wait: i.identity.unknown_pod_wait,
        },
        interception,
        fetcher,
        server_fetcher,
    })
}

/// Starts the pod watch on a runtime thread of its own (the data plane never waits for
/// it) and waits for the first complete list.
fn kube_pods(
    node: &str,
    host: Option<HostIdentity>,
    ready_timeout: Duration,
) -> anyhow::Result<Arc<crate::identity::kube::KubePods>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kube-watch")
        .enable_all()
        .build()?;
    let client = rt
        .block_on(kube::Client::try_default())
        .context("Kubernetes client (in-cluster service account or $KUBECONFIG)")?;
    let pods = crate::identity::kube::KubePods::spawn_with_host(client, node, host, rt.handle());
    // The runtime lives on its own thread as long as the process: the watch keeps the pod
    // map current.
    std::thread::Builder::new()
        .name("kube-watch".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    anyhow::ensure!(
        pods.wait_ready(ready_timeout),
        "no complete pod list from the Kubernetes API within {ready_timeout:?}"
    );
    Ok(pods)
}
