//! One tunnel from a node: TLS, identity, preamble, PostgreSQL startup, policy, upstream
//! login, relay, audit. Every failure a client can cause ends in an `ErrorResponse` that
//! says what was wrong and what is allowed, and in exactly one pair of audit events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use super::Shared;
use super::cancel::{CancelKey, CancelTarget};
use super::relay::{self, ClientEnd, Counters, End};
use super::reuse;
use crate::admin::GaugeHeld;
use crate::audit::{Outcome, SessionInfo};
use crate::config::{Protocol, ReuseConfig};
use crate::pg::{self, ErrorResponse, StartupMessage, StartupRequest, sqlstate};
use crate::pki::{SpiffeId, spiffe_id_of};
use crate::tunnel::{PREAMBLE_HEADER_LEN, Preamble};
use crate::upstream::{Login, ServerStream};

type Client = TlsStream<TcpStream>;

/// Why a session could not start, as the client and the audit log see it.
struct Refusal {
    error: ErrorResponse,
    denied: bool,
}

impl From<ErrorResponse> for Refusal {
    fn from(error: ErrorResponse) -> Self {
        Self {
            error,
            denied: false,
        }
    }
}

/// `gateway_proxy_active_sessions` counts tunnels that sent a preamble, until they end;
/// warm tunnels waiting for one are `gateway_proxy_waiting_tunnels`.
const ACTIVE_SESSIONS: &str = "gateway_proxy_active_sessions";
const WAITING_TUNNELS: &str = "gateway_proxy_waiting_tunnels";

pub(super) fn error_counter(code: &str) {
    metrics::counter!("gateway_proxy_errors_total", "sqlstate" => code.to_owned()).increment(1);
}

/// A tunnel that passed the TLS handshake and sent its preamble. Phases take it boxed:
/// what a future takes by value stays in it for its whole life.
pub(super) struct Opened {
    pub(super) client: Client,
    pub(super) identity: SpiffeId,
    pub(super) info: SessionInfo,
    pub(super) preamble: Preamble,
    /// When the preamble arrived (a warm tunnel may have waited before it).
    pub(super) started: Instant,
    pub(super) active: GaugeHeld,
}

pub async fn handle(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    drain: watch::Receiver<bool>,
) {
    // Each phase runs in its own boxed future, freed when it is done: a task's allocation
    // is its largest state, so otherwise every relaying session would keep the room of the
    // steps before it, and a tcp session the room of a PostgreSQL one (16 KiB per
    // connection, measured with -Zprint-type-sizes, where 4 KiB are used).
    let Some(opened) = Box::pin(open(&shared, tcp, peer, &drain)).await else {
        return;
    };
    match opened.preamble.protocol {
        Protocol::Tcp => Box::pin(super::tcp::handle(&shared, opened, drain)).await,
        Protocol::Postgres => {
            let Some(session) = Box::pin(postgres_start(&shared, opened)).await else {
                return;
            };
            Box::pin(postgres_run(&shared, session, drain)).await
        }
    }
}

/// TLS handshake, identity, preamble.
async fn open(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    drain: &watch::Receiver<bool>,
) -> Option<Box<Opened>> {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let timeout = shared.cfg.startup_timeout;
    // Boxed, like every large set-up step: freed as soon as it is done.
    let accept = Box::pin(shared.acceptor.accept(tcp));
    let tls = match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = handshake_failure_reason(&e);
            metrics::counter!("gateway_proxy_tls_handshake_failures_total", "reason" => reason)
                .increment(1);
            tracing::info!(%peer, %e, reason, "tls handshake refused");
            return None;
        }
        Err(_) => {
            metrics::counter!("gateway_proxy_tls_handshake_failures_total", "reason" => "timeout")
                .increment(1);
            return None;
        }
    };
    metrics::histogram!("gateway_proxy_tls_handshake_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("gateway_proxy_connections_total").increment(1);

    let mut client = tls;
    let identity = match peer_identity(&client, &shared.cfg.trust_domain) {
        Ok(id) => id,
        Err(e) => {
            // The certificate chains to our CA but carries no usable workload identity.
            metrics::counter!("gateway_proxy_tls_handshake_failures_total", "reason" => "no_identity").increment(1);
            tracing::warn!(%peer, error = %e.message, "client certificate has no usable identity");
            send_error(&mut client, &e).await;
            return None;
        }
    };

    let mut info = SessionInfo {
        session_id: new_session_id(),
        identity: identity.to_string(),
        node: None,
        pod: None,
        database_route: None,
        protocol: Protocol::Postgres,
        requested_user: None,
        requested_database: None,
        db_user: None,
        db_name: None,
        role: None,
        client_addr: None,
        node_addr: peer.to_string(),
        upstream_addr: None,
        upstream_reused: false,
    };

    // A node's warm tunnel sends its preamble only when an application connects: wait up
    // to `tunnel_idle_timeout` for it (the handshake already proved the identity), and
    // not past a drain.
    let mut drain_seen = drain.clone();
    let waiting = GaugeHeld::new(WAITING_TUNNELS);
    let preamble = tokio::select! {
        r = tokio::time::timeout(
            shared.cfg.tunnel_idle_timeout,
            Box::pin(read_preamble(&mut client)),
        ) => r,
        () = async { let _ = drain_seen.wait_for(|d| *d).await; } => {
            let _ = client.shutdown().await;
            return None;
        }
    };
    drop(waiting);
    let preamble = match preamble {
        Ok(Ok(p)) => p,
        Ok(Err(Failure::Client(refusal))) => {
            finish_refused(shared, &mut client, &info, refusal, started).await;
            return None;
        }
        Ok(Err(Failure::Gone)) => return None,
        Err(_) => {
            metrics::counter!("gateway_proxy_idle_tunnels_closed_total").increment(1);
            let _ = client.shutdown().await;
            return None;
        }
    };
    info.node = Some(preamble.node.clone());
    info.pod = Some(preamble.pod.clone());
    info.database_route = Some(preamble.route.clone());
    info.client_addr = Some(preamble.client_addr.to_string());
    info.protocol = preamble.protocol;
    Some(Box::new(Opened {
        client,
        identity,
        info,
        preamble,
        started: Instant::now(),
        active: GaugeHeld::new(ACTIVE_SESSIONS),
    }))
}

/// A PostgreSQL session's start: startup packet, policy, upstream login (or a kept server
/// session), the greeting to send. `None` when it was refused (answered and audited).
async fn postgres_start(shared: &Arc<Shared>, opened: Box<Opened>) -> Option<Box<Session<'_>>> {
    let Opened {
        mut client,
        identity,
        mut info,
        preamble,
        started,
        active,
    } = *opened;
    let timeout = shared.cfg.startup_timeout;
    if shared.policy.database(&preamble.route).map(|d| d.protocol) == Some(Protocol::Tcp) {
        let e = ErrorResponse::fatal(
            sqlstate::CONNECTION_EXCEPTION,
            format!("db-gateway: route \"{}\" is a tcp route, but the node sent a PostgreSQL connection", preamble.route),
        )
        .with_hint("Set protocol: tcp on the node listener or interception route for this route, or point it at a postgres route.");
        finish_refused(shared, &mut client, &info, e.into(), started).await;
        return None;
    }

    let remaining = timeout.saturating_sub(started.elapsed());
    let startup = tokio::time::timeout(
        remaining,
        Box::pin(read_startup(&mut client, &identity, shared)),
    )
    .await;
    let startup = match startup {
        Ok(Ok(Some(x))) => x,
        // A cancel request: served, no session.
        Ok(Ok(None)) => return None,
        Ok(Err(Failure::Client(refusal))) => {
            // Not even a startup message: still one start/end pair so the attempt is seen.
            finish_refused(shared, &mut client, &info, refusal, started).await;
            return None;
        }
        Ok(Err(Failure::Gone)) => return None,
        Err(_) => {
            let e = ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "db-gateway: timeout waiting for the startup packet",
            )
            .with_hint(format!(
                "The client must send its startup message within {timeout:?}."
            ));
            finish_refused(shared, &mut client, &info, e.into(), started).await;
            return None;
        }
    };
    info.requested_user = startup.param("user").map(str::to_owned);
    info.requested_database = startup.param("database").map(str::to_owned);

    let decision = match shared.policy.decide(
        &identity,
        &preamble.route,
        startup.param("user"),
        startup.param("database"),
    ) {
        Ok(d) => d,
        Err(error) => {
            tracing::info!(session = %info.session_id, %identity, route = %preamble.route, reason = %error.message, "session denied");
            finish_refused(
                shared,
                &mut client,
                &info,
                Refusal {
                    error,
                    denied: true,
                },
                started,
            )
            .await;
            return None;
        }
    };
    info.db_user = Some(decision.db_user.clone());
    info.db_name = Some(decision.db_name.clone());
    info.role = Some(decision.role.clone());

    let reuse = decision.database.upstream.reuse.clone().map(|cfg| {
        let key = reuse::Key::new(
            &decision.database.name,
            &decision.db_user,
            &decision.db_name,
            &startup.params,
        );
        (key, cfg)
    });
    let (login, born) = match reuse.as_ref().and_then(|(key, _)| reuse::take(key)) {
        Some(kept) => {
            info.upstream_reused = true;
            kept
        }
        None => {
            let login_started = Instant::now();
            let login = Box::pin(shared.upstreams.login(
                &decision.database,
                &decision.db_user,
                &decision.db_name,
                &startup.params,
                shared.cfg.upstream_connect_timeout,
            ))
            .await;
            match login {
                Ok(l) => {
                    metrics::histogram!("gateway_proxy_upstream_login_seconds")
                        .record(login_started.elapsed().as_secs_f64());
                    (l, login_started)
                }
                Err(e) => {
                    tracing::warn!(session = %info.session_id, route = %preamble.route, user = %decision.db_user, %e, "upstream login failed");
                    let error = e.to_client(&preamble.route, &decision.db_user);
                    finish_refused(shared, &mut client, &info, error.into(), started).await;
                    return None;
                }
            }
        }
    };
    info.upstream_addr = Some(login.addr.to_string());

    // Greet the client as the server would, with our own cancel key.
    let cancel_key = login.backend_key.map(|(pid, secret)| {
        shared.cancels.register(CancelTarget {
            upstream: login.addr,
            pid,
            secret,
            identity: identity.clone(),
        })
    });
    let mut hello = Vec::with_capacity(512);
    if startup.needs_negotiation() {
        pg::negotiate_protocol_version(&mut hello, &startup.protocol_options());
    }
    pg::authentication_ok(&mut hello);
    hello.extend_from_slice(&login.greeting);
    if let Some(k) = &cancel_key {
        pg::backend_key_data(&mut hello, k.key.0, k.key.1);
    }
    hello.extend_from_slice(&login.ready);
    let outcome = Outcome::default();
    shared.audit.session_start(&info, &outcome);
    metrics::counter!("gateway_proxy_sessions_total", "result" => "success").increment(1);
    tracing::info!(session = %info.session_id, %identity, route = %preamble.route, user = %decision.db_user, db = %decision.db_name, "session started");
    Some(Box::new(Session {
        client,
        login,
        born,
        info,
        started,
        hello,
        cancel_key,
        reuse,
        _active: active,
    }))
}

/// A started PostgreSQL session, between login and relay.
struct Session<'a> {
    client: Client,
    login: Login,
    /// When its server session logged in (it may be a kept one).
    born: Instant,
    info: SessionInfo,
    started: Instant,
    /// `AuthenticationOk` … `ReadyForQuery`, as the client is to get it.
    hello: Vec<u8>,
    cancel_key: Option<CancelKey<'a>>,
    reuse: Option<(reuse::Key, ReuseConfig)>,
    _active: GaugeHeld,
}

/// A PostgreSQL session's life after login: greeting, relay, audit, and keeping the
/// server session when `upstream.reuse` allows.
async fn postgres_run(
    shared: &Arc<Shared>,
    session: Box<Session<'_>>,
    drain: watch::Receiver<bool>,
) {
    let Session {
        client,
        login,
        born,
        info,
        started,
        hello,
        cancel_key,
        reuse,
        _active,
    } = *session;
    let counters = Counters::at_ready();
    let Login {
        stream,
        addr,
        greeting,
        backend_key,
        ready,
        rest,
    } = login;
    let keep = reuse.is_some() && rest.is_empty();
    // Split here, not in the relay: what a future takes by value stays in it for its whole
    // life, and the two TLS streams are 2.3 KiB (the halves are pointers).
    let (end, kept) = Box::pin(relay_session(
        tokio::io::split(client),
        tokio::io::split(stream),
        hello,
        &rest,
        &counters,
        drain.clone(),
        keep,
    ))
    .await;
    drop(cancel_key);
    let outcome = match &end {
        End::Closed => Outcome::default(),
        End::Drained => Outcome {
            error_code: Some(sqlstate::ADMIN_SHUTDOWN.into()),
            error_message: Some("ended by proxy drain".into()),
            denied: false,
        },
        End::Protocol(m) => Outcome {
            error_code: Some(sqlstate::PROTOCOL_VIOLATION.into()),
            error_message: Some(m.clone()),
            denied: false,
        },
    };
    shared.audit.session_end(
        &info,
        &outcome,
        counters.client_to_server(),
        counters.server_to_client(),
        started.elapsed(),
    );
    tracing::info!(session = %info.session_id, ?end, "session ended");
    if let (Some(stream), Some((key, cfg))) = (kept, reuse) {
        if *drain.borrow() {
            let mut stream = stream;
            let _ = stream.write_all(&pg::TERMINATE).await;
            let _ = stream.shutdown().await;
            return;
        }
        let login = Login {
            stream,
            addr,
            greeting,
            backend_key,
            ready,
            rest: Vec::new(),
        };
        Box::pin(reuse::keep(
            key,
            &cfg,
            login,
            born,
            shared.cfg.upstream_connect_timeout,
        ))
        .await;
    }
}

/// Greets the client (`hello`), then relays until the session ends. With `keep`, a clean client end while the server is
/// idle returns the server session (for [`reuse::keep`]) instead of closing it.
async fn relay_session(
    client: (ReadHalf<Client>, WriteHalf<Client>),
    upstream: (ReadHalf<ServerStream>, WriteHalf<ServerStream>),
    hello: Vec<u8>,
    first: &[u8],
    counters: &Counters,
    drain: watch::Receiver<bool>,
    keep: bool,
) -> (End, Option<ServerStream>) {
    let (client_r, mut client_w) = client;
    let (mut up_r, mut up_w) = upstream;
    if client_w
        .write_all(&hello)
        .await
        .and(client_w.flush().await)
        .is_err()
    {
        return (End::Closed, None);
    }
    drop(hello);
    let end = {
        let c2s = relay::client_to_server(client_r, &mut up_w, counters, keep);
        let s2c = relay::server_to_client(&mut up_r, &mut client_w, counters, first, drain);
        tokio::pin!(c2s, s2c);
        tokio::select! {
            c = &mut c2s => match c {
                // Both directions stop here: the server-to-client one waits in a read
                // with nothing taken (that is what idle means), so dropping it loses
                // no byte.
                ClientEnd::Keep => None,
                ClientEnd::Done => Some(s2c.await),
            },
            end = &mut s2c => Some(end),
        }
    };
    let Some(end) = end else {
        let _ = client_w.shutdown().await;
        return (End::Closed, Some(up_r.unsplit(up_w)));
    };
    if end == End::Drained {
        // Tell the server goodbye properly so it logs no "unexpected EOF".
        let _ = up_w.write_all(&pg::terminate()).await;
    }
    let _ = up_w.shutdown().await;
    let _ = client_w.shutdown().await;
    (end, None)
}

enum Failure {
    Client(Refusal),
    /// The peer went away or broke TLS; nobody to answer.
    Gone,
}

impl From<ErrorResponse> for Failure {
    fn from(e: ErrorResponse) -> Self {
        Failure::Client(e.into())
    }
}

/// Reads the node's preamble: route, pod metadata, protocol (never the identity).
async fn read_preamble(client: &mut Client) -> Result<Preamble, Failure> {
    let mut header = [0u8; PREAMBLE_HEADER_LEN];
    client
        .read_exact(&mut header)
        .await
        .map_err(|_| Failure::Gone)?;
    let bad_preamble = |e: crate::tunnel::TunnelError| {
        ErrorResponse::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("db-gateway proxy: {e}"),
        )
        .with_hint("Connect through the db-gateway node agent, not to the proxy directly.")
    };
    let len = Preamble::body_len(&header).map_err(bad_preamble)?;
    let mut body = vec![0u8; len];
    client
        .read_exact(&mut body)
        .await
        .map_err(|_| Failure::Gone)?;
    Ok(Preamble::decode_body(&body).map_err(bad_preamble)?)
}

/// Reads the startup packet; `Ok(None)` after serving a cancel request.
async fn read_startup(
    client: &mut Client,
    identity: &SpiffeId,
    shared: &Shared,
) -> Result<Option<StartupMessage>, Failure> {
    // The node answers SSLRequest/GSSENCRequest itself; we still accept them so an older
    // or simpler node works.
    for _ in 0..3 {
        let packet = read_startup_packet(client).await?;
        match pg::parse_startup_packet(&packet) {
            Ok(StartupRequest::Ssl) | Ok(StartupRequest::GssEnc) => {
                client.write_all(b"N").await.map_err(|_| Failure::Gone)?;
                client.flush().await.map_err(|_| Failure::Gone)?;
            }
            Ok(StartupRequest::Cancel { pid, secret }) => {
                serve_cancel(shared, identity, pid, secret).await;
                return Ok(None);
            }
            Ok(StartupRequest::Startup(m)) => return Ok(Some(m)),
            Err(e) => {
                let hint = if e.sqlstate == sqlstate::FEATURE_NOT_SUPPORTED {
                    "Use a PostgreSQL client that speaks protocol 3.0 (any libpq since 7.4)."
                } else {
                    "The client sent a malformed startup packet; is it a PostgreSQL client?"
                };
                return Err(ErrorResponse::fatal(e.sqlstate, e.message)
                    .with_hint(hint)
                    .into());
            }
        }
    }
    Err(
        ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, "too many encryption requests")
            .with_hint("Send SSLRequest or GSSENCRequest at most once each.")
            .into(),
    )
}

async fn read_startup_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, Failure> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).await.map_err(|_| Failure::Gone)?;
    let len = pg::startup_packet_len(header).map_err(|e| {
        ErrorResponse::fatal(e.sqlstate, e.message).with_hint(format!(
            "A startup packet is 8 to {} bytes long.",
            pg::MAX_STARTUP_PACKET_LENGTH
        ))
    })?;
    let mut packet = vec![0u8; len];
    packet[..4].copy_from_slice(&header);
    r.read_exact(&mut packet[4..]).await.map_err(|_| {
        Failure::from(
            ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, "incomplete startup packet")
                .with_hint("The client closed the connection in the middle of its startup packet."),
        )
    })?;
    Ok(packet)
}

async fn serve_cancel(shared: &Shared, identity: &SpiffeId, pid: i32, secret: i32) {
    let result = match shared.cancels.lookup((pid, secret), identity) {
        Some(t) => {
            match crate::upstream::cancel(t.upstream, t.pid, t.secret, Duration::from_secs(5)).await
            {
                Ok(()) => "forwarded",
                Err(e) => {
                    tracing::warn!(%e, upstream = %t.upstream, "cancel request failed");
                    "upstream_error"
                }
            }
        }
        // Unknown keys are dropped silently, as PostgreSQL does, so keys cannot be probed.
        None => "unknown_key",
    };
    metrics::counter!("gateway_proxy_cancel_requests_total", "result" => result).increment(1);
    tracing::info!(%identity, result, "cancel request");
}

/// Answers and audits a refused session. Boxed here rather than at each call: a refusal
/// is rare, and inline its future would enlarge every session's task.
fn finish_refused<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    info: &'a SessionInfo,
    refusal: Refusal,
    started: Instant,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(finish_refused_now(shared, client, info, refusal, started))
}

async fn finish_refused_now(
    shared: &Shared,
    client: &mut Client,
    info: &SessionInfo,
    refusal: Refusal,
    started: Instant,
) {
    error_counter(&refusal.error.sqlstate);
    let outcome = Outcome {
        error_code: Some(refusal.error.sqlstate.clone()),
        error_message: Some(refusal.error.message.clone()),
        denied: refusal.denied,
    };
    metrics::counter!("gateway_proxy_sessions_total", "result" => if refusal.denied { "denied" } else { "error" }).increment(1);
    shared.audit.session_start(info, &outcome);
    send_error(client, &refusal.error).await;
    shared
        .audit
        .session_end(info, &outcome, 0, 0, started.elapsed());
}

async fn send_error(client: &mut Client, e: &ErrorResponse) {
    let _ = client.write_all(&e.encode()).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

fn peer_identity(client: &Client, trust_domain: &str) -> Result<SpiffeId, ErrorResponse> {
    let refuse = |why: String| {
        ErrorResponse::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, format!("db-gateway: {why}"))
            .with_hint(format!("Workload certificates must carry one SPIFFE ID spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>."))
    };
    let cert = client
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| refuse("no client certificate".into()))?;
    let id = spiffe_id_of(cert).map_err(|e| refuse(e.to_string()))?;
    if id.trust_domain != trust_domain {
        return Err(refuse(format!(
            "identity {id} is not in trust domain {trust_domain}"
        )));
    }
    Ok(id)
}

fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        // A TCP probe or a peer that gave up: not a certificate problem.
        return "eof";
    }
    let text = e.to_string();
    if text.contains("peer sent no certificates") || text.contains("NoCertificatesPresented") {
        "no_client_certificate"
    } else if text.contains("Expired") || text.contains("expired") {
        "certificate_expired"
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        "unknown_issuer"
    } else {
        "handshake_error"
    }
}

pub(super) fn new_session_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}
