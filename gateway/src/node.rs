//! The node agent's data plane: thread-per-core io_uring runtimes, each with its own
//! SO_REUSEPORT listener per configured address, so the kernel spreads connections across
//! cores and no lock or queue sits between accept and relay.
//!
//! Per connection: answer `SSLRequest`/`GSSENCRequest` with `N` (the tunnel is the
//! encryption), open an mTLS tunnel to the proxy as the listener's workload identity, send
//! the preamble and the client's startup packet, then relay both ways.

mod relay;
mod startup;
mod tls;

use std::cell::Cell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::Context;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use socket2::{Domain, Protocol, Socket, Type};
use tokio_uring::net::{TcpListener, TcpStream};

use crate::admin::{self, Readiness};
use crate::config::{DataPlaneConfig, NodeConfig};
use crate::pg::{ErrorResponse, sqlstate};
use crate::pki;
use crate::tunnel::{PodMeta, Preamble};

use relay::Budget;
use tls::{ConnectError, TlsConn};

/// What every connection accepted on one listener shares.
struct Listener {
    listen: SocketAddr,
    route: String,
    pod: PodMeta,
    tls: Arc<ClientConfig>,
    identity_cert: std::path::PathBuf,
}

/// Node-wide settings for the data plane.
struct Plane {
    node_name: String,
    proxy_addr: SocketAddr,
    proxy_name: ServerName<'static>,
    dp: DataPlaneConfig,
    budget: Budget,
}

/// `gateway node` in explicit mode; runs until SIGTERM/SIGINT.
pub fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let metrics = admin::install_metrics()?;
    let readiness = Readiness::default();
    let not_ready = readiness.block("listeners bound");
    let admin_addr = admin::spawn(cfg.admin_listen, metrics, readiness)?;

    let proxy_addr = cfg
        .proxy
        .address
        .to_socket_addrs()
        .with_context(|| format!("proxy.address {:?} does not resolve", cfg.proxy.address))?
        .next()
        .with_context(|| format!("proxy.address {:?} has no address", cfg.proxy.address))?;
    let proxy_name = ServerName::try_from(cfg.proxy.server_name.clone()).with_context(|| {
        format!(
            "proxy.server_name {:?} is not a DNS name or IP",
            cfg.proxy.server_name
        )
    })?;
    let proxy_ca = pki::load_certs(&cfg.proxy.ca).context("proxy.ca")?;

    let mut listeners = Vec::new();
    for (i, l) in cfg.listeners.iter().enumerate() {
        let chain = pki::load_certs(&l.identity.cert)
            .with_context(|| format!("listeners[{i}].identity.cert"))?;
        let key = pki::load_key(&l.identity.key)
            .with_context(|| format!("listeners[{i}].identity.key"))?;
        let id = pki::spiffe_id_of(&chain[0])
            .with_context(|| format!("listeners[{i}].identity.cert"))?;
        let tls = crate::tunnel::client_config(chain, key, &proxy_ca)
            .with_context(|| format!("listeners[{i}]"))?;
        tracing::info!(listen = %l.listen, route = %l.route, identity = %id, "listener");
        listeners.push(Arc::new(Listener {
            listen: l.listen,
            route: l.route.clone(),
            pod: l.pod.clone(),
            tls: Arc::new(tls),
            identity_cert: l.identity.cert.clone(),
        }));
    }

    let threads = match cfg.data_plane.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    // Bind every socket here so that a bad address fails start-up, not a thread; a port of
    // 0 is fixed by the first socket so all threads share it.
    let mut sockets: Vec<Vec<std::net::TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    for l in &mut listeners {
        let mut addr = l.listen;
        for per_thread in sockets.iter_mut() {
            let s =
                reuseport_listener(addr).with_context(|| format!("failed to listen on {addr}"))?;
            addr = s.local_addr()?;
            per_thread.push(s);
        }
        if addr != l.listen {
            *l = Arc::new(l.clone_with_listen(addr));
        }
    }
    let plane = Arc::new(Plane {
        node_name: cfg.node_name.clone(),
        proxy_addr,
        proxy_name,
        budget: Budget::new(cfg.data_plane.buffer_budget),
        dp: cfg.data_plane.clone(),
    });

    let (bound_tx, bound_rx) = mpsc::channel::<anyhow::Result<()>>();
    for (t, socks) in sockets.into_iter().enumerate() {
        let plane = plane.clone();
        let listeners = listeners.clone();
        let bound_tx = bound_tx.clone();
        std::thread::Builder::new()
            .name(format!("uring-{t}"))
            .spawn(move || {
                tokio_uring::start(async move {
                    for (sock, l) in socks.into_iter().zip(listeners) {
                        let listener = TcpListener::from_std(sock);
                        tokio_uring::spawn(accept_loop(listener, l, plane.clone()));
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
    // Machine-readable start-up lines (the demo and the tests bind port 0 and read them).
    println!("ADMIN {admin_addr}");
    for l in &listeners {
        println!("LISTENING {} route={}", l.listen, l.route);
    }
    tracing::info!(threads, admin = %admin_addr, proxy = %plane.proxy_addr, "node agent ready");
    drop(not_ready);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        admin::shutdown_signal().await;
        tracing::info!("shutdown signal: node agent exiting");
        anyhow::Ok(())
    })
}

impl Listener {
    fn clone_with_listen(&self, listen: SocketAddr) -> Self {
        Self {
            listen,
            route: self.route.clone(),
            pod: self.pod.clone(),
            tls: self.tls.clone(),
            identity_cert: self.identity_cert.clone(),
        }
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

async fn accept_loop(listener: TcpListener, l: Arc<Listener>, plane: Arc<Plane>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                metrics::counter!("gateway_node_connections_total").increment(1);
                tokio_uring::spawn(serve(stream, peer, l.clone(), plane.clone()));
            }
            Err(e) => {
                metrics::counter!("gateway_node_accept_errors_total").increment(1);
                tracing::warn!(%e, listen = %l.listen, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

struct ActiveGuard;

impl ActiveGuard {
    fn new() -> Self {
        metrics::gauge!("gateway_node_active_connections").increment(1.0);
        Self
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        metrics::gauge!("gateway_node_active_connections").decrement(1.0);
    }
}

fn node_error(kind: &'static str) {
    metrics::counter!("gateway_node_errors_total", "kind" => kind).increment(1);
}

async fn send_error(app: &TcpStream, e: ErrorResponse) {
    let _ = app.write_all(e.encode()).await;
    let _ = app.shutdown(std::net::Shutdown::Write);
}

async fn serve(app: TcpStream, peer: SocketAddr, l: Arc<Listener>, plane: Arc<Plane>) {
    let _active = ActiveGuard::new();
    let _ = app.set_nodelay(true);
    let initial =
        match tokio::time::timeout(plane.dp.startup_timeout, startup::negotiate(&app)).await {
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                node_error("bad_startup");
                send_error(&app, e).await;
                return;
            }
            Err(_) => {
                node_error("startup_timeout");
                send_error(
                    &app,
                    ErrorResponse::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "db-gateway: timeout waiting for the startup packet",
                    )
                    .with_hint(format!(
                        "Send the startup message within {:?}.",
                        plane.dp.startup_timeout
                    )),
                )
                .await;
                return;
            }
        };

    let started = Instant::now();
    let dial = TlsConn::connect(plane.proxy_addr, l.tls.clone(), plane.proxy_name.clone());
    let tunnel = match tokio::time::timeout(plane.dp.connect_timeout, dial).await {
        Ok(Ok(t)) => t,
        Ok(Err(ConnectError::Tcp(e))) => {
            node_error("proxy_unreachable");
            send_error(
                &app,
                ErrorResponse::fatal(
                    sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                    format!("db-gateway node {}: cannot reach the proxy at {}: {e}", plane.node_name, plane.proxy_addr),
                )
                .with_hint("Check that the gateway proxy is running and that proxy.address in the node configuration points at it."),
            )
            .await;
            return;
        }
        Ok(Err(ConnectError::Tls(e))) => {
            node_error("tunnel_tls");
            send_error(&app, tunnel_tls_error(&plane, &l, &e.to_string())).await;
            return;
        }
        Err(_) => {
            node_error("proxy_timeout");
            send_error(
                &app,
                ErrorResponse::fatal(
                    sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                    format!(
                        "db-gateway node {}: timeout connecting to the proxy at {} after {:?}",
                        plane.node_name, plane.proxy_addr, plane.dp.connect_timeout
                    ),
                )
                .with_hint("The proxy is not answering; check its health and the network path from this node."),
            )
            .await;
            return;
        }
    };
    metrics::histogram!("gateway_node_tunnel_handshake_seconds")
        .record(started.elapsed().as_secs_f64());

    let preamble = Preamble {
        route: l.route.clone(),
        node: plane.node_name.clone(),
        client_addr: peer,
        original_dst: Some(l.listen),
        pod: l.pod.clone(),
    };
    let mut first = preamble.encode();
    first.extend_from_slice(&initial);
    if let Err(e) = tunnel.send(&first).await {
        node_error("tunnel_tls");
        send_error(&app, tunnel_tls_error(&plane, &l, &e.to_string())).await;
        return;
    }

    let app = Rc::new(app);
    let tunnel = Rc::new(tunnel);
    let up = tokio_uring::spawn(relay::app_to_proxy(
        app.clone(),
        tunnel.clone(),
        plane.budget,
        plane.dp.max_flush_delay,
    ));
    let delivered = Cell::new(false);
    let down = relay::proxy_to_app(app.clone(), tunnel.clone(), plane.budget, &delivered).await;
    if let Err(e) = &down {
        if !delivered.get() {
            // The proxy refused us after the handshake (TLS 1.3 sends the verdict on the
            // client certificate with the first records).
            node_error("tunnel_tls");
            send_error(&app, tunnel_tls_error(&plane, &l, &e.to_string())).await;
        } else {
            node_error("relay");
            tracing::debug!(%e, %peer, "relay from proxy ended with an error");
        }
    }
    up.abort();
}

fn tunnel_tls_error(plane: &Plane, l: &Listener, e: &str) -> ErrorResponse {
    ErrorResponse::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!("db-gateway node {}: TLS with the proxy at {} failed: {e}", plane.node_name, plane.proxy_addr),
    )
    .with_hint(format!(
        "Check the workload certificate {} (issued by the proxy's workload CA, not expired) and that proxy.ca and proxy.server_name match the proxy's certificate.",
        l.identity_cert.display()
    ))
}
