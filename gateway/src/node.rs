//! The node agent's data plane: thread-per-core io_uring runtimes, each with its own
//! SO_REUSEPORT listener per configured address, so the kernel spreads connections across
//! cores and no lock or queue sits between accept and relay.
//!
//! Per connection: answer `SSLRequest`/`GSSENCRequest` with `N` (the tunnel is the
//! encryption), open an mTLS tunnel to the proxy as the listener's workload identity, send
//! the preamble and the client's startup packet, then relay both ways.

mod pool;
mod relay;
mod startup;
mod tls;
mod transparent;
mod warm;

use std::cell::Cell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::Context;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio_uring::net::{TcpListener, TcpStream};

use crate::admin::{self, Readiness};
use crate::config::{DataPlaneConfig, InterceptionConfig, NodeConfig, Protocol, parse_destination};
use crate::ebpf;
use crate::pg::{ErrorResponse, sqlstate};
use crate::pki;
use crate::tunnel::{PodMeta, Preamble};

use relay::Budget;
use tls::{ConnectError, TlsConn};
use transparent::Transparent;

/// What every connection accepted on one listener shares.
struct Listener {
    listen: SocketAddr,
    route: String,
    protocol: Protocol,
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
    warm: Arc<warm::Dialer>,
}

/// `gateway node`: explicit listeners and/or transparent interception; runs until
/// SIGTERM/SIGINT.
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
            protocol: l.protocol,
            pod: l.pod.clone(),
            tls: Arc::new(tls),
            identity_cert: l.identity.cert.clone(),
        }));
    }

    let transparent = match &cfg.interception {
        Some(i) => Some(Arc::new(transparent_setup(&cfg, i, &proxy_ca)?)),
        None => None,
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
    // Bind every socket here so that a bad address fails start-up, not a thread; a port of
    // 0 is fixed by the first socket so all threads share it.
    let mut sockets: Vec<Vec<std::net::TcpListener>> = (0..threads).map(|_| Vec::new()).collect();
    for (listen, endpoint) in &mut endpoints {
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
    let plane = Arc::new(Plane {
        node_name: cfg.node_name.clone(),
        proxy_addr,
        budget: Budget::new(cfg.data_plane.buffer_budget),
        warm: Arc::new(warm::Dialer {
            proxy_addr,
            proxy_name: proxy_name.clone(),
            connect_timeout: cfg.data_plane.connect_timeout,
            keep: cfg.data_plane.warm_tunnels,
        }),
        proxy_name,
        dp: cfg.data_plane.clone(),
    });

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
                        tokio_uring::spawn(accept_loop(listener, endpoint, plane.clone()));
                    }
                    if plane.dp.warm_tunnels > 0 {
                        tokio_uring::spawn(warm::sweep(plane.dp.warm_tunnel_idle));
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
    if let Some(t) = &transparent {
        t.interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_serving(true)?;
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

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(admin::shutdown_signal());
    tracing::info!("shutdown signal: node agent exiting");
    if let Some(t) = &transparent {
        // Pins stay (interception survives restarts); until an agent serves again the
        // configured fail mode applies instead of connects to a closed listener.
        t.interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_serving(false)?;
    }
    Ok(())
}

/// Starts the pod watch on a runtime thread of its own (the data plane never waits for
/// it) and waits for the first complete list.
fn kube_pods(
    node: &str,
    host: Option<crate::identity::inventory::HostIdentity>,
    ready_timeout: std::time::Duration,
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

/// Makes `ip` an address of this host if it is not one yet, on bridge `interface` (no
/// ports: nothing sent to it can leave the node), so pods can reach the agent address.
fn ensure_local_address(interface: &str, ip: std::net::IpAddr) -> anyhow::Result<()> {
    // Binding port 0 succeeds exactly when the address is local.
    if std::net::TcpListener::bind((ip, 0)).is_ok() {
        return Ok(());
    }
    let ip_cmd = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .context("failed to run `ip` (package iproute2) to add the agent address")
    };
    if !ip_cmd(&["link", "show", interface])?.status.success() {
        let o = ip_cmd(&["link", "add", interface, "type", "bridge"])?;
        anyhow::ensure!(
            o.status.success(),
            "failed to create interface {interface} for the agent address: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    // A portless bridge has no carrier, so IPv6 duplicate address detection would never
    // finish and the address would stay unusable: skip it (the address is ours by config).
    let mut add = vec!["addr".to_owned(), "add".into()];
    match ip {
        std::net::IpAddr::V4(_) => add.extend([format!("{ip}/32"), "dev".into(), interface.into()]),
        std::net::IpAddr::V6(_) => add.extend([
            format!("{ip}/128"),
            "dev".into(),
            interface.into(),
            "nodad".into(),
        ]),
    }
    for args in [
        add,
        vec![
            "link".to_owned(),
            "set".into(),
            interface.into(),
            "up".into(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ip_cmd(&args)?;
        anyhow::ensure!(
            o.status.success() || String::from_utf8_lossy(&o.stderr).contains("File exists"),
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    tracing::info!(%ip, interface, "agent address added");
    Ok(())
}

/// An accept loop's kind.
#[derive(Clone)]
enum Endpoint {
    Explicit(Arc<Listener>),
    Transparent(Arc<Transparent>),
}

/// Loads (or adopts) the kernel programs and builds the resolver and certificate source.
fn transparent_setup(
    cfg: &NodeConfig,
    i: &InterceptionConfig,
    proxy_ca: &[rustls_pki_types::CertificateDer<'static>],
) -> anyhow::Result<Transparent> {
    let std::net::SocketAddr::V4(agent_v4) = i.agent_address else {
        anyhow::bail!(
            "interception.agent_address must be IPv4 (got {})",
            i.agent_address
        );
    };
    let agent_v6 = match i.agent_address_v6 {
        None => None,
        Some(std::net::SocketAddr::V6(a)) => Some(a),
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
    let own_cgroup = ebpf::current_cgroup()?;
    let icfg = ebpf::InterceptConfig {
        agent_v4,
        agent_v6,
        ports,
        cidrs,
        agent_cgroup_id: ebpf::cgroup_id(&own_cgroup)?,
        agent_mark: 0,
        fail_open: i.fail_open,
    };
    ensure_local_address(&i.agent_interface, i.agent_address.ip())?;
    if let Some(v6) = i.agent_address_v6 {
        ensure_local_address(&i.agent_interface, v6.ip())?;
    }
    if let Some(parent) = i.pin_dir.parent() {
        ebpf::ensure_bpffs(parent)?;
    }
    let interception = ebpf::Interception::install_or_adopt(&attach_to, &i.pin_dir, &icfg)
        .with_context(|| format!("interception on cgroup {}", attach_to.display()))?;
    tracing::info!(cgroup = %attach_to.display(), pins = %i.pin_dir.display(), adopted = interception.adopted(), "interception attached");

    let cgroups = crate::identity::cgroup::CgroupPaths::new(cgroup2);
    let resolver = match (&i.identity.inventory, &i.identity.kubernetes) {
        (Some(path), _) => crate::identity::Resolver::with_inventory(
            cgroups,
            crate::identity::inventory::Inventory::load(path)?,
            &i.identity.trust_domain,
            &cfg.node_name,
        )?,
        (None, Some(k)) => {
            let host = k
                .host
                .as_ref()
                .map(|h| crate::identity::inventory::HostIdentity {
                    namespace: h.namespace.clone(),
                    service_account: h.service_account.clone(),
                });
            let pods = kube_pods(&cfg.node_name, host.clone(), k.ready_timeout)?;
            crate::identity::Resolver::new(
                cgroups,
                Box::new(pods),
                &i.identity.trust_domain,
                &cfg.node_name,
                host,
            )?
        }
        (None, None) => anyhow::bail!("interception.identity: no pod source configured"),
    };
    let ca_roots = pki::load_certs(&i.ca.ca).context("interception.ca.ca")?;
    let node_tls = crate::tunnel::client_config(
        pki::load_certs(&i.ca.node_cert).context("interception.ca.node_cert")?,
        pki::load_key(&i.ca.node_key).context("interception.ca.node_key")?,
        &ca_roots,
    )?;
    let ca = crate::ca::CaClient {
        addr: i.ca.address,
        server_name: ServerName::try_from(i.ca.server_name.clone())
            .with_context(|| format!("interception.ca.server_name {:?}", i.ca.server_name))?,
        tls: Arc::new(node_tls),
    };
    Ok(Transparent {
        interception: std::sync::Mutex::new(interception),
        resolver,
        routes: Transparent::routes_from(&i.routes)
            .map_err(|e| anyhow::anyhow!("interception.routes: {e}"))?,
        certs: transparent::WorkloadCerts::new(ca, proxy_ca.to_vec()),
        unknown_pod_wait: i.identity.unknown_pod_wait,
    })
}

impl Listener {
    fn clone_with_listen(&self, listen: SocketAddr) -> Self {
        Self {
            listen,
            route: self.route.clone(),
            protocol: self.protocol,
            pod: self.pod.clone(),
            tls: self.tls.clone(),
            identity_cert: self.identity_cert.clone(),
        }
    }
}

async fn accept_loop(listener: TcpListener, endpoint: Endpoint, plane: Arc<Plane>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                metrics::counter!("gateway_node_connections_total").increment(1);
                match &endpoint {
                    Endpoint::Explicit(l) => {
                        tokio_uring::spawn(serve_explicit(stream, peer, l.clone(), plane.clone()))
                    }
                    Endpoint::Transparent(t) => tokio_uring::spawn(serve_transparent(
                        stream,
                        peer,
                        t.clone(),
                        plane.clone(),
                    )),
                };
            }
            Err(e) => {
                metrics::counter!("gateway_node_accept_errors_total").increment(1);
                tracing::warn!(%e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn active_connection() -> admin::GaugeHeld {
    admin::GaugeHeld::new("gateway_node_active_connections")
}

fn node_error(kind: &'static str) {
    metrics::counter!("gateway_node_errors_total", "kind" => kind).increment(1);
}

async fn send_error(app: &TcpStream, e: ErrorResponse) {
    let _ = app.write_all(e.encode()).await;
    let _ = app.shutdown(std::net::Shutdown::Write);
}

/// Ends an application connection that cannot be served: a PostgreSQL client gets the
/// `ErrorResponse`; a `tcp` route's client (which would not understand one) gets a close,
/// and the reason goes to the log.
async fn refuse(app: &TcpStream, protocol: Protocol, e: ErrorResponse) {
    match protocol {
        Protocol::Postgres => send_error(app, e).await,
        Protocol::Tcp => {
            tracing::info!(code = %e.sqlstate, reason = %e.message, "tcp connection refused");
            let _ = app.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Where one application connection goes, and as whom.
struct Target {
    route: String,
    protocol: Protocol,
    pod: PodMeta,
    tls: Arc<ClientConfig>,
    original_dst: SocketAddr,
    /// Names the identity's source in error hints (certificate file or SPIFFE ID).
    identity_source: String,
}

/// Reads the client's first packets; `None` once an error was sent or the client left.
async fn negotiate(app: &TcpStream, plane: &Plane) -> Option<Vec<u8>> {
    match tokio::time::timeout(plane.dp.startup_timeout, startup::negotiate(app)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            node_error("bad_startup");
            send_error(app, e).await;
            None
        }
        Err(_) => {
            node_error("startup_timeout");
            send_error(
                app,
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
            None
        }
    }
}

async fn serve_explicit(app: TcpStream, peer: SocketAddr, l: Arc<Listener>, plane: Arc<Plane>) {
    let _active = active_connection();
    let _ = app.set_nodelay(true);
    let initial = match l.protocol {
        Protocol::Postgres => match negotiate(&app, &plane).await {
            Some(bytes) => bytes,
            None => return,
        },
        // Plain bytes: nothing to negotiate, the tunnel opens at once.
        Protocol::Tcp => Vec::new(),
    };
    let target = Target {
        route: l.route.clone(),
        protocol: l.protocol,
        pod: l.pod.clone(),
        tls: l.tls.clone(),
        original_dst: l.listen,
        identity_source: format!("workload certificate {}", l.identity_cert.display()),
    };
    tunnel_session(app, peer, initial, target, &plane).await;
}

async fn serve_transparent(
    app: TcpStream,
    peer: SocketAddr,
    t: Arc<Transparent>,
    plane: Arc<Plane>,
) {
    let _active = active_connection();
    let _ = app.set_nodelay(true);
    // The kernel's facts first (they pick the route and so the protocol); a PostgreSQL
    // client still gets its encryption answer before any error.
    let decided = Box::pin(t.decide(&plane.node_name, peer)).await;
    let protocol = match &decided {
        Ok(d) => d.protocol,
        Err((_, p)) => *p,
    };
    let initial = match protocol {
        Protocol::Postgres => match negotiate(&app, &plane).await {
            Some(bytes) => bytes,
            None => return,
        },
        Protocol::Tcp => Vec::new(),
    };
    let decided = match decided {
        Ok(d) => d,
        Err((e, protocol)) => {
            node_error("identity");
            tracing::info!(%peer, reason = %e.message, "transparent connection refused");
            refuse(&app, protocol, e).await;
            return;
        }
    };
    // Boxed: a certificate request's future is large and done before the relay starts.
    let tls = match Box::pin(t.certs.config_for(&plane.node_name, &decided.workload)).await {
        Ok(c) => c,
        Err(e) => {
            node_error("certificate");
            refuse(&app, decided.protocol, e).await;
            return;
        }
    };
    let target = Target {
        route: decided.route,
        protocol: decided.protocol,
        pod: decided.workload.pod.clone(),
        tls,
        original_dst: decided.orig.dst,
        identity_source: format!("workload certificate for {}", decided.workload.spiffe_id),
    };
    tunnel_session(app, peer, initial, target, &plane).await;
}

async fn tunnel_session(
    app: TcpStream,
    peer: SocketAddr,
    initial: Vec<u8>,
    target: Target,
    plane: &Plane,
) {
    let started = Instant::now();
    let warm = warm::take(&target.tls, plane.dp.warm_tunnel_idle);
    // Whether a warm tunnel was there or not, the next session of this identity should
    // find one.
    warm::refill(&target.tls, &plane.warm);
    let dialled = warm.is_none();
    // The connection goes behind an `Rc` at once: both relay directions share it, and a
    // 1.1 KiB value kept in this future would stay in the task for the session's life.
    let tunnel = match warm {
        Some(t) => Ok(Ok(t)),
        None => {
            // Boxed: the handshake's future is large and would otherwise stay part of
            // this connection's task for its whole life.
            let dial = Box::pin(TlsConn::connect(
                plane.proxy_addr,
                target.tls.clone(),
                plane.proxy_name.clone(),
            ));
            tokio::time::timeout(plane.dp.connect_timeout, dial)
                .await
                .map(|r| r.map(Rc::new))
        }
    };
    let tunnel = match tunnel {
        Ok(Ok(t)) => t,
        Ok(Err(ConnectError::Tcp(e))) => {
            node_error("proxy_unreachable");
            refuse(
                &app,
                target.protocol,
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
            refuse(
                &app,
                target.protocol,
                tunnel_tls_error(plane, &target, &e.to_string()),
            )
            .await;
            return;
        }
        Err(_) => {
            node_error("proxy_timeout");
            refuse(
                &app,
                target.protocol,
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
    if dialled {
        warm::handshake_done(&tunnel);
        metrics::histogram!("gateway_node_tunnel_handshake_seconds")
            .record(started.elapsed().as_secs_f64());
    }

    let preamble = Preamble {
        route: target.route.clone(),
        node: plane.node_name.clone(),
        client_addr: peer,
        original_dst: Some(target.original_dst),
        pod: target.pod.clone(),
        protocol: target.protocol,
    };
    let mut first = preamble.encode();
    first.extend_from_slice(&initial);
    if let Err(e) = tunnel.send(&first).await {
        node_error("tunnel_tls");
        refuse(
            &app,
            target.protocol,
            tunnel_tls_error(plane, &target, &e.to_string()),
        )
        .await;
        return;
    }

    let app = Rc::new(app);
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
            refuse(
                &app,
                target.protocol,
                tunnel_tls_error(plane, &target, &e.to_string()),
            )
            .await;
        } else {
            node_error("relay");
            tracing::debug!(%e, %peer, "relay from proxy ended with an error");
        }
    }
    up.abort();
}

fn tunnel_tls_error(plane: &Plane, target: &Target, e: &str) -> ErrorResponse {
    ErrorResponse::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!("db-gateway node {}: TLS with the proxy at {} failed: {e}", plane.node_name, plane.proxy_addr),
    )
    .with_hint(format!(
        "Check the {} (issued by the proxy's workload CA, not expired) and that proxy.ca and proxy.server_name match the proxy's certificate.",
        target.identity_source
    ))
}
