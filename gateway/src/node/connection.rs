//! One application connection's life at the node, hop by hop:
//!
//! 1. **route**: an explicit listener knows its route; a transparent connection asks the
//!    kernel and the resolver first ([`Transparent::decide`]), since the route picks the
//!    protocol;
//! 2. **negotiate** (`postgres` routes): `GSSENCRequest` answered `N`; `SSLRequest` `S` on
//!    a route with client TLS (then a rustls server handshake, `client_tls`), `N`
//!    otherwise; the startup packet read within `startup_timeout`;
//! 3. **target**: the identity to tunnel as: the listener's certificate, or the workload's
//!    from the certificate cache;
//! 4. **tunnel**: a warm one of that identity (`tunnel_pool`) or a fresh mTLS dial to the
//!    proxy within `connect_timeout`;
//! 5. **preamble**: route, node, client and pod facts, then the client's first bytes;
//! 6. **relay** both ways until either side ends (`relay`).
//!
//! A hop that fails before the client received anything from the proxy ends the connection
//! with a [`NodeError`]; [`refuse`] is the one place that counts it and tells the client (an
//! `ErrorResponse`, or a close on a `tcp` route).
//!
//! Each data-plane thread accepts on its own socket and serves the connection on that
//! thread: no queue and, on the explicit path, no lock of the node's between accept and
//! relay. A transparent connection reads shared state through read locks only (resolver,
//! certificate cache); a certificate miss waits for the control runtime.

use std::cell::{Cell, OnceCell};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio_uring::net::{TcpListener, TcpStream};

use super::client_tls::{self, AppTls};
use super::error::NodeError;
use super::relay::{self, Budget};
use super::startup::{self, Negotiated};
use super::tls::{ConnectError, TlsConn};
use super::transparent::{Decided, Transparent};
use super::tunnel_pool;
use crate::admin;
use crate::config::DataPlaneConfig;
use crate::pod::PodMeta;
use crate::route::Protocol;
use crate::telemetry::node as telemetry;
use crate::tunnel::Preamble;

/// What every connection accepted on one explicit listener shares.
pub struct Listener {
    pub listen: SocketAddr,
    pub route: String,
    pub protocol: Protocol,
    pub pod: PodMeta,
    /// The tunnel's client settings; swapped when the certificate files change
    /// (`listener_certs`).
    pub tls: Arc<ArcSwap<ClientConfig>>,
    pub identity_cert: PathBuf,
    /// Client TLS with the listener's server certificate (`None`: `SSLRequest` gets `N`).
    pub client_tls: Option<Arc<ArcSwap<ServerConfig>>>,
}

impl Listener {
    pub fn clone_with_listen(&self, listen: SocketAddr) -> Self {
        Self {
            listen,
            route: self.route.clone(),
            protocol: self.protocol,
            pod: self.pod.clone(),
            tls: self.tls.clone(),
            identity_cert: self.identity_cert.clone(),
            client_tls: self.client_tls.clone(),
        }
    }
}

/// Node-wide settings for the data plane.
pub struct Plane {
    pub node_name: String,
    pub proxy_addr: SocketAddr,
    /// `proxy.replicas`: where cancel requests go (`cancel.rs`).
    pub cancel_replicas: super::cancel::Replicas,
    pub proxy_name: ServerName<'static>,
    pub dp: DataPlaneConfig,
    pub budget: Budget,
    pub warm: Arc<tunnel_pool::Dialer>,
    /// Application connections open now, all threads (`data_plane.max_connections`).
    pub open: std::sync::atomic::AtomicUsize,
}

/// An accept loop's kind.
#[derive(Clone)]
pub enum Endpoint {
    Explicit(Arc<Listener>),
    Transparent(Arc<Transparent>),
}

/// One connection's place under `data_plane.max_connections`, given back on drop (also
/// when its task ends early).
struct OpenSlot(Arc<Plane>);

impl OpenSlot {
    fn take(plane: &Arc<Plane>) -> Self {
        plane.open.fetch_add(1, Ordering::Relaxed);
        Self(plane.clone())
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn accept_loop(listener: TcpListener, endpoint: Endpoint, plane: Arc<Plane>) {
    loop {
        let (endpoint, plane) = (endpoint.clone(), plane.clone());
        match listener.accept().await {
            Ok((stream, peer)) => {
                metrics::counter!(telemetry::CONNECTIONS_TOTAL).increment(1);
                if plane.open.load(Ordering::Relaxed) >= plane.dp.max_connections {
                    // Closed before any work: what a full agent can afford.
                    metrics::counter!(telemetry::CONNECTION_REFUSALS_TOTAL).increment(1);
                    tracing::debug!(%peer, max = plane.dp.max_connections, "connection refused: data_plane.max_connections");
                    drop(stream);
                    continue;
                }
                let slot = OpenSlot::take(&plane);
                tokio_uring::spawn(async move {
                    let _slot = slot;
                    serve(stream, peer, endpoint, plane).await
                });
            }
            Err(e) => {
                metrics::counter!(telemetry::ACCEPT_ERRORS_TOTAL).increment(1);
                tracing::warn!(%e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection, accepted on `endpoint`, from start to end.
pub async fn serve(app: TcpStream, peer: SocketAddr, endpoint: Endpoint, plane: Arc<Plane>) {
    let _active = admin::GaugeHeld::new(telemetry::ACTIVE_CONNECTIONS);
    let _ = app.set_nodelay(true);
    let routed = route(&endpoint, peer).await;
    let protocol = routed.protocol();
    // Behind an `Rc` at once: both relay directions share it, and a 1.1 KiB value kept in
    // this future would stay in the task for the session's life.
    let app = Rc::new(app);
    // Set once the client's TLS is up: from then on everything to the client is sealed.
    let secured = OnceCell::new();
    if let Err(e) = life(&app, &secured, peer, routed, &plane).await {
        match secured.get() {
            Some(tls) => {
                metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => e.kind()).increment(1);
                client_tls::refuse(tls, &e.to_client(&plane.node_name)).await;
            }
            None => refuse(&app, protocol, &e, &plane.node_name).await,
        }
    }
}

/// Hops 2 to 6; `Ok` also when the client left before its startup packet.
async fn life(
    app: &Rc<TcpStream>,
    secured: &OnceCell<Rc<AppTls>>,
    peer: SocketAddr,
    routed: Routed<'_>,
    plane: &Plane,
) -> Result<(), NodeError> {
    let initial = match routed.protocol() {
        // Boxed: the TLS handshake's future is large and done before the relay starts.
        Protocol::Postgres => match Box::pin(negotiate(app, secured, &routed, plane)).await? {
            Some(bytes) => bytes,
            None => return Ok(()),
        },
        // Plain bytes: nothing to negotiate, the tunnel opens at once.
        Protocol::Tcp => Vec::new(),
    };
    let target = target(routed, peer).await?;
    let started = Instant::now();
    let replica = plane.cancel_replicas.for_cancel(&initial);
    let tunnel = tunnel(&target, plane, replica).await?;
    if tunnel.dialled {
        metrics::histogram!(telemetry::TUNNEL_HANDSHAKE_SECONDS)
            .record(started.elapsed().as_secs_f64());
    }
    let tunnel = tunnel.conn;
    preamble(&tunnel, &target, peer, &initial, plane).await?;
    relay(app, secured.get(), tunnel, &target, peer, plane).await
}

/// Hop 1: the route, and so the protocol to speak (and to refuse in).
enum Routed<'a> {
    Explicit(&'a Arc<Listener>),
    /// Boxed: like the refusal, kept out of the task of every explicit connection (the
    /// certificate lookup after it needs no box, so a transparent connection allocates
    /// as before).
    Transparent(&'a Transparent, Box<Decided>),
    /// The kernel's facts refused it; told to the client after negotiating in `Protocol`
    /// (`postgres` while the route is not known), so it gets its encryption answer first.
    Refused(Box<NodeError>, Protocol),
}

impl Routed<'_> {
    /// Whether `SSLRequest` gets `S` (and a ClientHello is taken): a `postgres` route with
    /// client TLS. A refused connection is told in the clear.
    fn offers_tls(&self) -> bool {
        match self {
            Self::Explicit(l) => l.client_tls.is_some(),
            Self::Transparent(_, d) => d.client_tls.is_some(),
            Self::Refused(..) => false,
        }
    }

    /// The server certificate for this connection: the listener's, or the CA's for the
    /// (route, dialled IP) from the cache (a miss waits for the control runtime).
    async fn server_config(&self) -> Result<Arc<ServerConfig>, NodeError> {
        match self {
            Self::Explicit(l) => l.client_tls.as_ref().map(|c| c.load_full()).ok_or_else(|| {
                NodeError::ServerCertificate {
                    destination: l.listen.to_string(),
                    reason: "the listener has no client_tls certificate".into(),
                }
            }),
            Self::Transparent(t, d) => {
                let Some(names) = &d.client_tls else {
                    return Err(NodeError::ServerCertificate {
                        destination: d.orig.dst.to_string(),
                        reason: "client TLS is off on this route".into(),
                    });
                };
                t.server_certs
                    .config_for(&d.route, d.orig.dst.ip(), names)
                    .await
                    .map_err(|e| NodeError::ServerCertificate {
                        destination: d.orig.dst.to_string(),
                        reason: e.to_string(),
                    })
            }
            Self::Refused(e, _) => Err(NodeError::ServerCertificate {
                destination: "a refused connection".into(),
                reason: e.to_string(),
            }),
        }
    }

    fn protocol(&self) -> Protocol {
        match self {
            Self::Explicit(l) => l.protocol,
            Self::Transparent(_, d) => d.protocol,
            Self::Refused(_, p) => *p,
        }
    }
}

async fn route(endpoint: &Endpoint, peer: SocketAddr) -> Routed<'_> {
    match endpoint {
        Endpoint::Explicit(l) => Routed::Explicit(l),
        // Boxed: resolving may wait for the pod directory; its future is done before the
        // relay starts and would otherwise stay part of this connection's task.
        Endpoint::Transparent(t) => match Box::pin(t.decide(peer)).await {
            Ok(d) => Routed::Transparent(t, Box::new(d)),
            Err((e, p)) => Routed::Refused(Box::new(e), p),
        },
    }
}

/// Hop 2: the client's first packets, in the clear or inside the TLS it asked for (then
/// `secured` holds it); `None` if the client left or its TLS failed. All of it within
/// `startup_timeout`.
async fn negotiate(
    app: &Rc<TcpStream>,
    secured: &OnceCell<Rc<AppTls>>,
    routed: &Routed<'_>,
    plane: &Plane,
) -> Result<Option<Vec<u8>>, NodeError> {
    let timeout = plane.dp.startup_timeout;
    let deadline = Instant::now() + timeout;
    fn by<F: std::future::Future>(deadline: Instant, f: F) -> tokio::time::Timeout<F> {
        tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), f)
    }
    let offers_tls = routed.offers_tls();
    let first = match by(deadline, startup::negotiate(app, offers_tls)).await {
        Ok(r) => r.map_err(NodeError::BadStartup)?,
        Err(_) => return Err(NodeError::StartupTimeout(timeout)),
    };
    let (early, direct) = match first {
        None => return Ok(None),
        Some(Negotiated::Plain(bytes)) => return Ok(Some(bytes)),
        Some(Negotiated::SslRequest) => (Vec::new(), false),
        Some(Negotiated::Direct(early)) => (early, true),
    };
    let config = match by(deadline, routed.server_config()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            client_tls::count_failure("no_certificate");
            // After an SSLRequest the client reads an ErrorResponse in the clear, as from
            // a server that cannot serve TLS; a direct client only understands TLS.
            if direct {
                tracing::info!(reason = %e, "direct TLS refused: no server certificate");
                let _ = app.shutdown(std::net::Shutdown::Both);
                return Ok(None);
            }
            return Err(e);
        }
        Err(_) => return Err(NodeError::StartupTimeout(timeout)),
    };
    if !direct {
        let (res, _) = app.write_all(b"S".to_vec()).await;
        if res.is_err() {
            return Ok(None);
        }
    }
    let Some((tls, plain)) = client_tls::accept(app, config, &early, direct, deadline).await else {
        return Ok(None);
    };
    let tls = secured.get_or_init(|| tls);
    match by(deadline, client_tls::read_startup(tls, plain)).await {
        Ok(r) => r.map_err(NodeError::BadStartup),
        Err(_) => Err(NodeError::StartupTimeout(timeout)),
    }
}

/// Where the connection goes and as whom.
enum Target<'a> {
    Explicit(&'a Listener),
    Transparent {
        decided: Box<Decided>,
        tls: Arc<ClientConfig>,
    },
}

impl Target<'_> {
    fn tls(&self) -> Arc<ClientConfig> {
        match self {
            Self::Explicit(l) => l.tls.load_full(),
            Self::Transparent { tls, .. } => tls.clone(),
        }
    }

    fn protocol(&self) -> Protocol {
        match self {
            Self::Explicit(l) => l.protocol,
            Self::Transparent { decided, .. } => decided.protocol,
        }
    }

    /// Names the identity's source in error hints (certificate file or SPIFFE ID).
    fn identity_source(&self) -> String {
        match self {
            Self::Explicit(l) => format!("workload certificate {}", l.identity_cert.display()),
            Self::Transparent { decided, .. } => {
                format!("workload certificate for {}", decided.workload.spiffe_id)
            }
        }
    }

    fn tunnel_tls(&self, proxy: SocketAddr, source: std::io::Error) -> NodeError {
        NodeError::TunnelTls {
            proxy,
            source,
            identity: self.identity_source(),
        }
    }
}

/// Hop 3: the identity, from the listener or the certificate cache.
async fn target(routed: Routed<'_>, peer: SocketAddr) -> Result<Target<'_>, NodeError> {
    match routed {
        Routed::Explicit(l) => Ok(Target::Explicit(l)),
        Routed::Refused(e, _) => {
            tracing::info!(%peer, reason = %e, "transparent connection refused");
            Err(*e)
        }
        Routed::Transparent(t, decided) => match t.certs.config_for(&decided.workload).await {
            Ok(tls) => Ok(Target::Transparent { decided, tls }),
            Err(e) => Err(NodeError::Certificate {
                spiffe_id: decided.workload.spiffe_id,
                reason: e.to_string(),
            }),
        },
    }
}

struct Tunnel {
    conn: Rc<TlsConn>,
    /// Not from the warm pool: a handshake was made for this connection.
    dialled: bool,
}

/// Hop 4: a warm tunnel of this identity, or a new one; a cancel request for a given
/// proxy replica (`replica`, from `cancel.rs`) always dials that replica.
async fn tunnel(
    target: &Target<'_>,
    plane: &Plane,
    replica: Option<SocketAddr>,
) -> Result<Tunnel, NodeError> {
    let tls = target.tls();
    if replica.is_none() {
        let warm = tunnel_pool::take(&tls, plane.dp.warm_tunnel_idle);
        // Whether a warm tunnel was there or not, the next session of this identity should
        // find one.
        tunnel_pool::refill(&tls, &plane.warm);
        if let Some(conn) = warm {
            return Ok(Tunnel {
                conn,
                dialled: false,
            });
        }
    }
    let proxy = replica.unwrap_or(plane.proxy_addr);
    // Boxed: the handshake's future is large and would otherwise stay part of this
    // connection's task for its whole life.
    let dial = Box::pin(TlsConn::connect(
        proxy,
        tls.clone(),
        plane.proxy_name.clone(),
    ));
    match tokio::time::timeout(plane.dp.connect_timeout, dial).await {
        Ok(Ok(conn)) => {
            tunnel_pool::handshake_done(&conn);
            Ok(Tunnel {
                conn: Rc::new(conn),
                dialled: true,
            })
        }
        Ok(Err(ConnectError::Tcp(source))) => Err(NodeError::ProxyUnreachable { proxy, source }),
        Ok(Err(ConnectError::Tls(source))) => Err(target.tunnel_tls(proxy, source)),
        Err(_) => Err(NodeError::ProxyTimeout {
            proxy,
            timeout: plane.dp.connect_timeout,
        }),
    }
}

/// Hop 5: the preamble and the client's first bytes, in one write.
async fn preamble(
    tunnel: &TlsConn,
    target: &Target<'_>,
    peer: SocketAddr,
    initial: &[u8],
    plane: &Plane,
) -> Result<(), NodeError> {
    let (route, original_dst, pod) = match target {
        Target::Explicit(l) => (&l.route, l.listen, &l.pod),
        Target::Transparent { decided, .. } => {
            (&decided.route, decided.orig.dst, &decided.workload.pod)
        }
    };
    let preamble = Preamble {
        route: route.clone(),
        node: plane.node_name.clone(),
        client_addr: peer,
        original_dst: Some(original_dst),
        pod: pod.clone(),
        protocol: target.protocol(),
    };
    let mut first = preamble.encode();
    first.extend_from_slice(initial);
    tunnel
        .send(&first)
        .await
        .map_err(|e| target.tunnel_tls(plane.proxy_addr, e))
}

/// Hop 6: both directions until either side ends. A failure before the client received
/// anything is still the tunnel's (the proxy refused us after the handshake: TLS 1.3 sends
/// the verdict on the client certificate with the first records) and is told to the
/// client; later ones are only counted.
async fn relay(
    app: &Rc<TcpStream>,
    secured: Option<&Rc<AppTls>>,
    tunnel: Rc<TlsConn>,
    target: &Target<'_>,
    peer: SocketAddr,
    plane: &Plane,
) -> Result<(), NodeError> {
    let delivered = Cell::new(false);
    let (up, down) = match secured {
        None => {
            let up = tokio_uring::spawn(relay::app_to_proxy(
                app.clone(),
                tunnel.clone(),
                plane.budget,
                plane.dp.max_flush_delay,
            ));
            let down = relay::proxy_to_app(app.clone(), tunnel, plane.budget, &delivered).await;
            (up, down)
        }
        Some(tls) => {
            let up = tokio_uring::spawn(client_tls::app_to_proxy(
                tls.clone(),
                tunnel.clone(),
                plane.budget,
            ));
            let down =
                client_tls::proxy_to_app(tls.clone(), tunnel, plane.budget, &delivered).await;
            (up, down)
        }
    };
    up.abort();
    match down {
        Ok(_) => Ok(()),
        Err(e) if !delivered.get() => Err(target.tunnel_tls(plane.proxy_addr, e)),
        Err(e) => {
            metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "relay").increment(1);
            tracing::debug!(%e, %peer, "relay from proxy ended with an error");
            Ok(())
        }
    }
}

/// Ends a connection that cannot be served, the one place that does: counts it by kind; a
/// PostgreSQL client gets the `ErrorResponse`; a `tcp` route's client (which would not
/// understand one) gets a close, and the reason goes to the log.
async fn refuse(app: &TcpStream, protocol: Protocol, e: &NodeError, node: &str) {
    metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => e.kind()).increment(1);
    let r = e.to_client(node);
    match protocol {
        Protocol::Postgres => {
            let _ = app.write_all(r.encode()).await;
            let _ = app.shutdown(std::net::Shutdown::Write);
        }
        Protocol::Tcp => {
            tracing::info!(code = %r.sqlstate, reason = %r.message, "tcp connection refused");
            let _ = app.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    use crate::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};
    use crate::tunnel::PREAMBLE_HEADER_LEN;

    const NODE: &str = "node-t";
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    fn startup_packet() -> Vec<u8> {
        let body = b"\x00\x03\x00\x00user\0app\0\0";
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend_from_slice(body);
        p
    }

    /// A CA, and certificates from it: (roots, chain, key) per leaf.
    struct Pki {
        ca: CertificateAuthority,
        roots: Vec<CertificateDer<'static>>,
    }

    impl Pki {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("dbgw-conn-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            pki::init_ca(&dir, "td").unwrap();
            let ca = CertificateAuthority::load(
                &dir.join(pki::WORKLOAD_CA_CERT),
                &dir.join(pki::WORKLOAD_CA_KEY),
            )
            .unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            let roots = vec![CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()];
            Self { ca, roots }
        }

        fn leaf(&self, spec: &LeafSpec) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let (cert, key) = self.ca.issue(spec, Duration::from_secs(600)).unwrap();
            (
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
        }
    }

    /// A listener whose identity is `team-a/api` from `workload`'s CA, trusting `proxy_ca`.
    fn listener(protocol: Protocol, workload: &Pki, proxy_ca: &Pki) -> Arc<Listener> {
        let (chain, key) =
            workload.leaf(&LeafSpec::workload(&SpiffeId::new("td", "team-a", "api")));
        Arc::new(Listener {
            listen: "127.0.0.1:15432".parse().unwrap(),
            route: "app".into(),
            protocol,
            pod: PodMeta {
                name: Some("api-0".into()),
                ..PodMeta::default()
            },
            tls: Arc::new(arc_swap::ArcSwap::from_pointee(
                crate::tunnel::client_config(chain, key, &proxy_ca.roots).unwrap(),
            )),
            identity_cert: "/etc/dbgw/api.crt".into(),
            client_tls: None,
        })
    }

    fn plane(proxy_addr: SocketAddr, startup_timeout: Duration) -> Arc<Plane> {
        let dp = DataPlaneConfig {
            startup_timeout,
            connect_timeout: Duration::from_secs(5),
            ..DataPlaneConfig::default()
        };
        Arc::new(Plane {
            node_name: NODE.into(),
            proxy_addr,
            cancel_replicas: Default::default(),
            proxy_name: ServerName::try_from("gateway-proxy").unwrap(),
            budget: Budget::new(dp.buffer_budget),
            // No warm tunnels: every connection dials, so each test sees its own handshake.
            warm: Arc::new(tunnel_pool::Dialer {
                proxy_addr,
                proxy_name: ServerName::try_from("gateway-proxy").unwrap(),
                connect_timeout: dp.connect_timeout,
                keep: 0,
            }),
            dp,
            open: Default::default(),
        })
    }

    /// A loopback port with nothing listening.
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// Serves one connection on a real loopback socket (on an io_uring runtime, as in the
    /// node) while `client` runs on a thread of its own; returns what the client returned.
    fn run<T: Send + 'static>(
        endpoint: Endpoint,
        plane: Arc<Plane>,
        client: impl FnOnce(std::net::TcpStream) -> T + Send + 'static,
    ) -> T {
        tokio_uring::start(async move {
            let ls = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = ls.local_addr().unwrap();
            let client = std::thread::spawn(move || {
                let s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                client(s)
            });
            let (app, peer) = ls.accept().await.unwrap();
            serve(app, peer, endpoint, plane).await;
            client.join().unwrap()
        })
    }

    /// SSLRequest (expects `N`), the startup packet, then everything until EOF.
    fn postgres_client(mut s: std::net::TcpStream) -> Vec<u8> {
        s.write_all(&SSL_REQUEST).unwrap();
        let mut n = [0u8; 1];
        s.read_exact(&mut n).unwrap();
        assert_eq!(&n, b"N");
        s.write_all(&startup_packet()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    }

    fn future_size<F>(_f: impl Fn(TcpStream, SocketAddr, Endpoint, Arc<Plane>) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open connection keeps its task (this future) for its whole life: 10 000 idle
    /// connections hold 10 000 of them. Before the split (rustc 1.95) an explicit
    /// connection's was 1736 bytes and a transparent one's 2480.
    #[test]
    fn a_connection_task_is_no_larger_than_before_the_split() {
        let size = future_size(serve);
        assert!(size <= 1736, "a connection's future grew to {size} bytes");
    }

    #[test]
    fn a_postgres_client_gets_the_error_when_the_proxy_is_unreachable() {
        let (pki, proxy) = (Pki::new("unreach-pg"), closed_port());
        let got = run(
            Endpoint::Explicit(listener(Protocol::Postgres, &pki, &pki)),
            plane(proxy, Duration::from_secs(5)),
            postgres_client,
        );
        let want = NodeError::ProxyUnreachable {
            proxy,
            source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
        }
        .to_client(NODE);
        assert_eq!(
            want.sqlstate,
            crate::pg::sqlstate::UNABLE_TO_ESTABLISH_CONNECTION
        );
        assert_eq!(got, want.encode());
    }

    #[test]
    fn a_tcp_client_gets_a_close_not_an_error() {
        let (pki, proxy) = (Pki::new("unreach-tcp"), closed_port());
        let got = run(
            Endpoint::Explicit(listener(Protocol::Tcp, &pki, &pki)),
            plane(proxy, Duration::from_secs(5)),
            |mut s| {
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                out
            },
        );
        assert!(got.is_empty(), "a tcp client got bytes: {got:?}");
    }

    #[test]
    fn a_silent_client_gets_the_startup_timeout() {
        let pki = Pki::new("timeout");
        let got = run(
            Endpoint::Explicit(listener(Protocol::Postgres, &pki, &pki)),
            plane(closed_port(), Duration::from_millis(200)),
            |mut s| {
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                out
            },
        );
        assert_eq!(
            got,
            NodeError::StartupTimeout(Duration::from_millis(200))
                .to_client(NODE)
                .encode()
        );
    }

    #[test]
    fn a_client_that_is_no_postgres_client_gets_bad_startup() {
        let pki = Pki::new("bad");
        let got = run(
            Endpoint::Explicit(listener(Protocol::Postgres, &pki, &pki)),
            plane(closed_port(), Duration::from_secs(5)),
            |mut s| {
                s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                out
            },
        );
        assert_eq!(got[0], b'E');
        assert!(
            got.windows(7).any(|w| w == b"C08P01\0"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }

    /// A stand-in proxy on a thread: mTLS 1.3 with `ca` trusted for clients; reads the
    /// preamble and the client's startup packet, answers `hello` and closes.
    fn proxy(
        pki: &Pki,
        client_ca: &Pki,
    ) -> (SocketAddr, std::thread::JoinHandle<Option<Preamble>>) {
        let (chain, key) = pki.leaf(&LeafSpec::server(vec!["gateway-proxy".into()], vec![]));
        let cfg = Arc::new(crate::tunnel::server_config(chain, key, &client_ca.roots).unwrap());
        let ls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ls.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (tcp, _) = ls.accept().unwrap();
            let conn = rustls::ServerConnection::new(cfg).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut header = [0u8; PREAMBLE_HEADER_LEN];
            s.read_exact(&mut header).ok()?;
            let mut body = vec![0u8; Preamble::body_len(&header).unwrap()];
            s.read_exact(&mut body).unwrap();
            let mut startup = vec![0u8; startup_packet().len()];
            s.read_exact(&mut startup).unwrap();
            assert_eq!(startup, startup_packet());
            s.write_all(b"hello").unwrap();
            s.conn.send_close_notify();
            s.flush().unwrap();
            Some(Preamble::decode_body(&body).unwrap())
        });
        (addr, h)
    }

    #[test]
    fn an_explicit_connection_tunnels_its_preamble_and_relays() {
        let pki = Pki::new("relay");
        let (addr, proxy) = proxy(&pki, &pki);
        let l = listener(Protocol::Postgres, &pki, &pki);
        let got = run(
            Endpoint::Explicit(l.clone()),
            plane(addr, Duration::from_secs(5)),
            |s| {
                let me = s.local_addr().unwrap();
                (me, postgres_client(s))
            },
        );
        assert_eq!(got.1, b"hello");
        let p = proxy.join().unwrap().expect("a preamble");
        assert_eq!(
            p,
            Preamble {
                route: "app".into(),
                node: NODE.into(),
                client_addr: got.0,
                original_dst: Some(l.listen),
                pod: l.pod.clone(),
                protocol: Protocol::Postgres,
            }
        );
    }

    #[test]
    fn a_proxy_that_refuses_our_certificate_is_a_tunnel_tls_error() {
        // The proxy trusts another CA than the one that issued the workload certificate.
        let (pki, other) = (Pki::new("tls"), Pki::new("tls-other"));
        let (addr, proxy) = proxy(&pki, &other);
        let got = run(
            Endpoint::Explicit(listener(Protocol::Postgres, &pki, &pki)),
            plane(addr, Duration::from_secs(5)),
            postgres_client,
        );
        assert!(proxy.join().unwrap().is_none());
        let text = String::from_utf8_lossy(&got);
        assert_eq!(got[0], b'E');
        assert!(got.windows(7).any(|w| w == b"C08006\0"), "{text}");
        assert!(
            text.contains(&format!(
                "Mdb-gateway node {NODE}: TLS with the proxy at {addr} failed: "
            )),
            "{text}"
        );
        assert!(
            text.contains("Check the workload certificate /etc/dbgw/api.crt (issued by"),
            "{text}"
        );
    }

    /// `listener` with client TLS: a server certificate for 127.0.0.1 and `db.test`.
    fn tls_listener(workload: &Pki, proxy_ca: &Pki) -> Arc<Listener> {
        let l = listener(Protocol::Postgres, workload, proxy_ca);
        let (chain, key) = workload.leaf(&LeafSpec::server(
            vec!["db.test".into()],
            vec!["127.0.0.1".parse().unwrap()],
        ));
        let mut l = Arc::try_unwrap(l).ok().unwrap();
        l.client_tls = Some(Arc::new(arc_swap::ArcSwap::from_pointee(
            client_tls::server_config(chain, key).unwrap(),
        )));
        Arc::new(l)
    }

    /// A client's TLS config trusting `pki`, offering `alpn`.
    fn tls_client(pki: &Pki, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.roots[0].clone()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(crate::tunnel::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    }

    /// TLS on `s` (after `S`, or direct), verifying `name`; the startup packet inside it,
    /// then everything until the server closes.
    fn tls_session(
        s: std::net::TcpStream,
        cfg: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> std::io::Result<Vec<u8>> {
        let conn =
            rustls::ClientConnection::new(cfg, ServerName::try_from(name.to_owned()).unwrap())
                .unwrap();
        let mut t = rustls::StreamOwned::new(conn, s);
        t.write_all(&startup_packet())?;
        let mut out = Vec::new();
        t.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Issue 20: `SSLRequest` gets `S` on a route with client TLS; the startup packet goes
    /// to the proxy from inside TLS and the proxy's answer comes back sealed.
    #[test]
    fn issue_20_ssl_request_gets_s_and_the_session_runs_inside_tls() {
        let pki = Pki::new("ctls");
        let (addr, proxy) = proxy(&pki, &pki);
        let cfg = tls_client(&pki, &[]);
        let got = run(
            Endpoint::Explicit(tls_listener(&pki, &pki)),
            plane(addr, Duration::from_secs(5)),
            move |mut s| {
                s.write_all(&SSL_REQUEST).unwrap();
                let mut a = [0u8; 1];
                s.read_exact(&mut a).unwrap();
                assert_eq!(&a, b"S");
                tls_session(s, cfg, "db.test").unwrap()
            },
        );
        assert_eq!(got, b"hello");
        assert!(proxy.join().unwrap().is_some());
    }

    /// Issue 20: PostgreSQL 17's direct TLS: a ClientHello with ALPN `postgresql` as the
    /// first bytes is served; without ALPN the node closes, as PostgreSQL does.
    #[test]
    fn issue_20_direct_tls_needs_alpn_postgresql() {
        let pki = Pki::new("ctls-direct");
        let (addr, proxy) = proxy(&pki, &pki);
        let cfg = tls_client(&pki, &[b"postgresql"]);
        let got = run(
            Endpoint::Explicit(tls_listener(&pki, &pki)),
            plane(addr, Duration::from_secs(5)),
            move |s| tls_session(s, cfg, "127.0.0.1").unwrap(),
        );
        assert_eq!(got, b"hello");
        assert!(proxy.join().unwrap().is_some());

        let cfg = tls_client(&pki, &[]);
        let got = run(
            Endpoint::Explicit(tls_listener(&pki, &pki)),
            plane(closed_port(), Duration::from_secs(5)),
            move |s| tls_session(s, cfg, "127.0.0.1"),
        );
        assert!(
            got.map(|b| b.is_empty()).unwrap_or(true),
            "no ALPN, no session"
        );
    }

    /// Issue 20: garbage after `S`, or a client that stops mid-handshake, is closed within
    /// the startup timeout; `GSSENCRequest` still gets `N`.
    #[test]
    fn issue_20_bad_or_stalled_tls_is_closed_in_time() {
        let pki = Pki::new("ctls-bad");
        for garbage in [
            &b"\x16\x03\x01\x00\x05hello-not-tls"[..],
            &b"\x16\x03\x01\x02\x00"[..],
        ] {
            let t0 = std::time::Instant::now();
            let got = run(
                Endpoint::Explicit(tls_listener(&pki, &pki)),
                plane(closed_port(), Duration::from_millis(500)),
                move |mut s| {
                    const GSSENC: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
                    s.write_all(&GSSENC).unwrap();
                    let mut a = [0u8; 1];
                    s.read_exact(&mut a).unwrap();
                    assert_eq!(&a, b"N");
                    s.write_all(&SSL_REQUEST).unwrap();
                    s.read_exact(&mut a).unwrap();
                    assert_eq!(&a, b"S");
                    s.write_all(garbage).unwrap();
                    let mut out = Vec::new();
                    let _ = s.read_to_end(&mut out);
                    out
                },
            );
            assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
            // At most a TLS alert, never a PostgreSQL message in the clear.
            assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
        }
    }

    /// A listener without client TLS answers `N`, as before.
    #[test]
    fn issue_20_without_client_tls_ssl_request_gets_n() {
        let pki = Pki::new("ctls-off");
        let (addr, proxy) = proxy(&pki, &pki);
        let got = run(
            Endpoint::Explicit(listener(Protocol::Postgres, &pki, &pki)),
            plane(addr, Duration::from_secs(5)),
            postgres_client,
        );
        assert_eq!(got, b"hello");
        assert!(proxy.join().unwrap().is_some());
    }
}
