//! The node agent (`gateway node`): applications connect to it as if it were their
//! database, and it carries each connection to the gateway proxy through an mTLS tunnel
//! whose client certificate is the workload's identity.
//!
//! Two ways in, both optional, both served by the same data plane:
//! - **explicit** listeners (`listeners:` in the configuration): one address per route,
//!   each with a workload certificate from a file;
//! - **transparent** interception (`interception:`): eBPF programs on the cgroup tree send
//!   connections to the configured database destinations to the agent address; the agent
//!   finds the workload by the connecting cgroup and gets its certificate from the CA
//!   (`transparent`, `certificates`).
//!
//! Threads: the data plane is thread-per-core io_uring runtimes (`data_plane.threads`),
//! each with its own SO_REUSEPORT socket per address, so the kernel spreads connections and
//! each is served on the thread that accepted it (`connection`). The main thread becomes the
//! control runtime (current-thread tokio) once the data plane is up: it fetches workload
//! certificates for the data plane (`certificates::Fetcher`) and waits for SIGTERM/SIGINT.
//! The admin server (`/metrics`, `/healthz`, `/readyz`) has a thread of its own, and so does
//! the Kubernetes pod watch when pods come from the API.
//!
//! `run` is wiring only: configuration to listeners, sockets, threads and the control
//! runtime.

mod cancel;
mod certificates;
mod client_tls;
mod connection;
mod error;
mod interface;
mod listener_certs;
mod node_certificate;
mod relay;
mod server_certificates;
mod startup;
mod tls;
mod transparent;
mod tunnel_pool;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, mpsc};

use anyhow::Context;
use rustls_pki_types::ServerName;
use tokio_uring::net::TcpListener;

use crate::admin::{self, Readiness};
use crate::config::NodeConfig;
use crate::{ebpf, pki};

use connection::{Endpoint, Listener, Plane};
use relay::Budget;

/// `gateway node`: explicit listeners and/or transparent interception; runs until
/// SIGTERM/SIGINT.
pub fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let metrics = admin::install_metrics()?;
    crate::telemetry::node::describe();
    let readiness = Readiness::default();
    let not_ready = readiness.block("listeners bound");
    let admin_addr = admin::spawn(cfg.admin_listen, metrics, readiness.clone())?;

    let proxy_addr = cfg
        .proxy
        .address
        .to_socket_addrs()
        .with_context(|| format!("proxy.address {:?} does not resolve", cfg.proxy.address))?
        .next()
        .with_context(|| format!("proxy.address {:?} has no address", cfg.proxy.address))?;
    let cancel_replicas = cancel::Replicas::resolve(&cfg.proxy.replicas)?;
    let proxy_name = ServerName::try_from(cfg.proxy.server_name.clone()).with_context(|| {
        format!(
            "proxy.server_name {:?} is not a DNS name or IP",
            cfg.proxy.server_name
        )
    })?;
    let proxy_ca = pki::load_certs(&cfg.proxy.ca).context("proxy.ca")?;

    let listeners = explicit_listeners(&cfg, &proxy_ca)?;
    // The control runtime exists before any data-plane thread can ask it for a certificate;
    // its tasks run once the main thread blocks on it below.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if !listeners.is_empty() {
        control.spawn(listener_certs::watch(cfg.clone(), listeners.clone()));
    }
    let (transparent, mut interception) = match &cfg.interception {
        Some(i) => {
            let setup = transparent::setup(&cfg, i, &proxy_ca, &control, &readiness)?;
            control.spawn(setup.fetcher.run());
            control.spawn(setup.server_fetcher.run());
            (Some(Arc::new(setup.transparent)), Some(setup.interception))
        }
        None => (None, None),
    };
    let mut endpoints: Vec<(SocketAddr, Endpoint)> = listeners
        .iter()
        .map(|l| (l.listen, Endpoint::Explicit(l.clone())))
        .collect();
    if let (Some(t), Some(i)) = (&transparent, &cfg.interception) {
        endpoints.push((i.agent_address, Endpoint::Transparent(t.clone())));
        if let Some(v6) = i.agent_address_v6 {
            endpoints.push((v6, Endpoint::Transparent(t.clone())));
        }
    }

    let threads = match cfg.data_plane.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let sockets = bind(&mut endpoints, threads)?;
    let plane = Arc::new(Plane {
        node_name: cfg.node_name.clone(),
        proxy_addr,
        cancel_replicas,
        budget: Budget::new(cfg.data_plane.buffer_budget),
        warm: Arc::new(tunnel_pool::Dialer {
            proxy_addr,
            proxy_name: proxy_name.clone(),
            connect_timeout: cfg.data_plane.connect_timeout,
            keep: cfg.data_plane.warm_tunnels,
        }),
        proxy_name,
        dp: cfg.data_plane.clone(),
        open: Default::default(),
    });

    start_data_plane(sockets, &endpoints, &plane)?;
    if let Some(i) = &mut interception {
        i.set_serving(true)?;
    }
    // Machine-readable start-up lines (the demo and the tests bind port 0 and read them).
    println!("ADMIN {admin_addr}");
    for (listen, endpoint) in &endpoints {
        match endpoint {
            Endpoint::Explicit(l) => println!("LISTENING {listen} route={}", l.route),
            Endpoint::Transparent(_) => println!("INTERCEPTING {listen}"),
        }
    }
    tracing::info!(threads, admin = %admin_addr, proxy = %plane.proxy_addr, "node agent ready");
    drop(not_ready);

    // The control runtime: certificate requests from the data plane are served, and the
    // kernel's refusal count exported, while the main thread waits for the signal.
    control.block_on(async {
        let signal = std::pin::pin!(admin::shutdown_signal());
        let export = std::pin::pin!(export_refusals(interception.as_ref()));
        futures_util::future::select(signal, export).await;
    });
    tracing::info!("shutdown signal: node agent exiting");
    if let Some(i) = &mut interception {
        // Pins stay (interception survives restarts); until an agent serves again the
        // configured fail mode applies instead of connects to a closed listener.
        i.set_serving(false)?;
    }
    Ok(())
}

/// How often the kernel's count of over-budget connects is read into
/// `gateway_node_intercept_refusals_total`.
const REFUSALS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps `gateway_node_intercept_refusals_total` equal to the kernel's count (per-CPU
/// values summed; the kernel counts since its maps were made). Never returns.
async fn export_refusals(interception: Option<&ebpf::Interception>) {
    let Some(i) = interception else {
        return std::future::pending().await;
    };
    loop {
        match i.refused_total() {
            Ok(n) => {
                metrics::counter!(crate::telemetry::node::INTERCEPT_REFUSALS_TOTAL).absolute(n)
            }
            Err(e) => tracing::debug!(%e, "cannot read the kernel's refusal count"),
        }
        tokio::time::sleep(REFUSALS_EVERY).await;
    }
}

/// The explicit listeners, each with its workload certificate loaded.
fn explicit_listeners(
    cfg: &NodeConfig,
    proxy_ca: &[rustls_pki_types::CertificateDer<'static>],
) -> anyhow::Result<Vec<Arc<Listener>>> {
    let mut listeners = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let (tls, id) = listener_certs::tunnel_tls(i, l, proxy_ca)?;
        let client_tls =
            listener_certs::client_tls(i, l)?.map(|c| Arc::new(arc_swap::ArcSwap::from_pointee(c)));
        tracing::info!(listen = %l.listen, route = %l.route, identity = %id, "listener");
        listeners.push(Arc::new(Listener {
            listen: l.listen,
            route: l.route.clone(),
            protocol: l.protocol,
            pod: l.pod.clone(),
            tls: Arc::new(arc_swap::ArcSwap::from_pointee(tls)),
            identity_cert: l.identity.cert.clone(),
            client_tls,
        }));
    }
    Ok(listeners)
}

/// Binds every socket here so that a bad address fails start-up, not a thread: one per
/// endpoint and thread. A port of 0 is fixed by the first socket so all threads share it,
/// and the endpoint learns it.
fn bind(
    endpoints: &mut [(SocketAddr, Endpoint)],
    threads: usize,
) -> anyhow::Result<Vec<Vec<std::net::TcpListener>>> {
    let mut sockets: Vec<Vec<std::net::TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    for (listen, endpoint) in endpoints.iter_mut() {
        let mut addr = *listen;
        for per_thread in sockets.iter_mut() {
            let s = crate::net::reuseport_listener(addr, 1024)
                .with_context(|| format!("failed to listen on {addr}"))?;
            addr = s.local_addr()?;
            per_thread.push(s);
        }
        if addr != *listen {
            *listen = addr;
            if let Endpoint::Explicit(l) = endpoint {
                *l = Arc::new(l.clone_with_listen(addr));
            }
        }
    }
    Ok(sockets)
}

/// Starts one io_uring thread per socket set, each accepting on its own sockets, and
/// waits until all of them are up.
fn start_data_plane(
    sockets: Vec<Vec<std::net::TcpListener>>,
    endpoints: &[(SocketAddr, Endpoint)],
    plane: &Arc<Plane>,
) -> anyhow::Result<()> {
    let threads = sockets.len();
    let (bound_tx, bound_rx) = mpsc::channel::<anyhow::Result<()>>();
    for (t, socks) in sockets.into_iter().enumerate() {
        let plane = plane.clone();
        let endpoints: Vec<Endpoint> = endpoints.iter().map(|(_, e)| e.clone()).collect();
        let bound_tx = bound_tx.clone();
        std::thread::Builder::new()
            .name(format!("uring-{t}"))
            .spawn(move || {
                tokio_uring::start(async move {
                    for (sock, endpoint) in socks.into_iter().zip(endpoints) {
                        let listener = TcpListener::from_std(sock);
                        tokio_uring::spawn(connection::accept_loop(
                            listener,
                            endpoint,
                            plane.clone(),
                        ));
                    }
                    if plane.dp.warm_tunnels > 0 {
                        tokio_uring::spawn(tunnel_pool::sweep(plane.dp.warm_tunnel_idle));
                    }
                    let _ = bound_tx.send(Ok(()));
                    std::future::pending::<()>().await;
                });
            })?;
    }
    drop(bound_tx);
    for _ in 0..threads {
        bound_rx
            .recv()
            .context("a data-plane thread died at start-up")??;
    }
    Ok(())
}
