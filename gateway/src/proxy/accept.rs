//! The first hop of every tunnel from a node: the TLS handshake (the client certificate is
//! the workload's identity), the preamble (route, pod, protocol), and the dispatch to
//! [`postgres`] or [`tcp`] by protocol. The one check that the node's protocol is the
//! route's is here, so neither session kind repeats it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::limits::{LimitError, Slot};
use super::opened::{Active, Client, Opened};
use super::refuse::{self, Answer};
use super::{Shared, postgres, tcp};
use crate::admin::GaugeHeld;
use crate::audit::SessionInfo;
use crate::pg::{ErrorResponse, sqlstate};
use crate::pki::{self, PkiError, SpiffeId, check_validity, spiffe_id_of};
use crate::route::Protocol;
use crate::telemetry::proxy::{
    ACTIVE_SESSIONS, CONNECTIONS_TOTAL, IDLE_TUNNELS_CLOSED_TOTAL, TLS_HANDSHAKE_FAILURES_TOTAL,
    TLS_HANDSHAKE_SECONDS, WAITING_TUNNELS,
};
use crate::tunnel::{PREAMBLE_HEADER_LEN, Preamble, TunnelError};

/// Why a tunnel got no session, before either session kind saw it.
#[derive(Debug, thiserror::Error)]
pub(super) enum AcceptError {
    /// The certificate chains to our CA (the handshake checked that) but names no workload.
    #[error("no client certificate")]
    NoCertificate,
    #[error("{0}")]
    NoSpiffeId(PkiError),
    #[error("identity {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain { id: SpiffeId, trust_domain: String },
    /// Checked on every handshake: a resumed one restores the stored certificate unchecked.
    /// The identity and why (kept as text: a `PkiError` would make every result large).
    #[error("client certificate of {0}")]
    CertificateNotValid(String),
    #[error("{0}")]
    BadPreamble(TunnelError),
    /// The preamble's pod metadata or node is not what the certificate says.
    #[error("preamble does not match the client certificate: {0}")]
    PreambleMismatch(String),
    /// The node went away or broke TLS: nobody to answer.
    #[error("the node closed the tunnel")]
    Gone,
    #[error("route \"{0}\" is a tcp route, but the node sent a PostgreSQL connection")]
    RouteIsTcp(String),
    #[error("route \"{0}\" is a postgres route, but the node sent a tcp connection")]
    RouteIsPostgres(String),
    #[error("route \"{0}\" is not configured on the proxy")]
    UnknownTcpRoute(String),
    /// `max_sessions_per_identity` or `max_sessions_per_route`.
    #[error("{0}")]
    TooMany(LimitError),
    /// The audit log's queue is more than half full (`audit.when_full: refuse-new-sessions`).
    #[error("the audit log is not keeping up; new sessions are refused until it does")]
    AuditBehind,
}

impl AcceptError {
    /// The error the client (or, on a `tcp` route, the audit log) gets; `None` when
    /// nobody is there to get one.
    pub(super) fn to_client(&self, trust_domain: &str) -> Option<ErrorResponse> {
        Some(match self {
            AcceptError::NoCertificate
            | AcceptError::NoSpiffeId(_)
            | AcceptError::ForeignTrustDomain { .. } => ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway: {self}"),
            )
            .with_hint(format!("Workload certificates must carry one SPIFFE ID spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>.")),
            AcceptError::CertificateNotValid(_) => ErrorResponse::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway: {self}"),
            )
            .with_hint("The node renews workload certificates at half-life; check that it reaches the CA and that its clock is right."),
            AcceptError::PreambleMismatch(_) => ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("db-gateway proxy: {self}"),
            )
            .with_hint("The node must send the pod metadata and node name of the workload certificate it tunnels with."),
            AcceptError::BadPreamble(_) => ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("db-gateway proxy: {self}"),
            )
            .with_hint("Connect through the db-gateway node agent, not to the proxy directly."),
            AcceptError::Gone => return None,
            AcceptError::RouteIsTcp(_) => ErrorResponse::fatal(
                sqlstate::CONNECTION_EXCEPTION,
                format!("db-gateway: {self}"),
            )
            .with_hint("Set protocol: tcp on the node listener or interception route for this route, or point it at a postgres route."),
            // Only audited: a tcp client reads no ErrorResponse.
            AcceptError::RouteIsPostgres(_) => {
                ErrorResponse::fatal(sqlstate::CONNECTION_EXCEPTION, self.to_string())
            }
            AcceptError::UnknownTcpRoute(_) => {
                ErrorResponse::fatal(sqlstate::INVALID_CATALOG_NAME, self.to_string())
            }
            AcceptError::TooMany(e) => ErrorResponse::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("db-gateway: {self}"),
            )
            .with_hint(e.hint()),
            AcceptError::AuditBehind => ErrorResponse::fatal(
                sqlstate::INSUFFICIENT_RESOURCES,
                format!("db-gateway: {self}"),
            )
            .with_hint("Sessions that are not recorded are not admitted; the proxy's audit sink (file system or stdout reader) is stalled. Try again later."),
        })
    }
}

/// One tunnel, from the accepted TCP connection to its end.
pub(super) async fn handle(
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
        Protocol::Tcp => Box::pin(tcp::handle(&shared, opened, drain)).await,
        Protocol::Postgres => {
            let Some(session) = Box::pin(postgres::start(&shared, opened)).await else {
                return;
            };
            Box::pin(postgres::run(&shared, session, drain)).await
        }
    }
}

/// Checks that the client certificate is still valid, the preamble against the certificate
/// ([`check_preamble`]) and the node's
/// protocol against the route's, then takes the session's slot under the identity and
/// route caps ([`admit`]); on a refusal, the answer to await (`None` inside: nobody to
/// answer). One await point for all of them keeps `open`'s future small. An unknown
/// route is left to a PostgreSQL session's policy decision (which names the routes the
/// identity may use); a tcp session has no later point to refuse it at.
fn check_and_admit<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    info: &'a mut SessionInfo,
    preamble: &Preamble,
    identity: &SpiffeId,
    started: Instant,
) -> Result<Slot, Option<Refusing<'a>>> {
    let route = &preamble.route;
    let protocol = preamble.protocol;
    // A warm tunnel may have waited past its certificate's end: the certificate must be
    // valid when a session uses it, not only at the handshake.
    if let Err(e) = peer_identity(client, &shared.cfg.trust_domain) {
        tracing::warn!(session = %info.session_id, identity = %info.identity, reason = %e, "session refused");
        let answer = Answer::for_protocol(protocol);
        return Err(refusal(shared, client, info, e, answer, started));
    }
    let cert_node = issued_to_node_of(client, &shared.cfg.trust_domain);
    match check_preamble(preamble, identity, cert_node.as_deref()) {
        Ok(verified) => info.node_verified = verified,
        Err(e) => {
            tracing::warn!(session = %info.session_id, identity = %info.identity, reason = %e, "preamble refused");
            let answer = Answer::for_protocol(protocol);
            return Err(refusal(shared, client, info, e, answer, started));
        }
    }
    let info: &'a SessionInfo = info;
    let e = match (
        protocol,
        shared.policy.load().database(route).map(|d| d.protocol),
    ) {
        (Protocol::Postgres, Some(Protocol::Tcp)) => AcceptError::RouteIsTcp(route.clone()),
        (Protocol::Tcp, Some(Protocol::Postgres)) => AcceptError::RouteIsPostgres(route.clone()),
        (Protocol::Tcp, None) => AcceptError::UnknownTcpRoute(route.clone()),
        (Protocol::Postgres, _) | (Protocol::Tcp, Some(Protocol::Tcp)) => {
            return admit(shared, client, info, preamble, started);
        }
    };
    tracing::info!(session = %info.session_id, identity = %info.identity, reason = %e, "session refused");
    let answer = Answer::for_protocol(protocol);
    Err(refusal(shared, client, info, e, answer, started))
}

/// The session's slot under the identity and route caps; past one, the refusal to await
/// (`53300`; audited, and told to a PostgreSQL client).
fn admit<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    info: &'a SessionInfo,
    preamble: &Preamble,
    started: Instant,
) -> Result<Slot, Option<Refusing<'a>>> {
    if !shared.audit.admits() {
        tracing::warn!(session = %info.session_id, identity = %info.identity, "session refused: audit queue full");
        let answer = Answer::for_protocol(preamble.protocol);
        return Err(refusal(
            shared,
            client,
            info,
            AcceptError::AuditBehind,
            answer,
            started,
        ));
    }
    shared
        .limits
        .admit(&info.identity, &preamble.route)
        .map_err(|e| {
            tracing::warn!(session = %info.session_id, identity = %info.identity, route = %preamble.route, reason = %e, "session refused");
            let answer = Answer::for_protocol(preamble.protocol);
            refusal(shared, client, info, AcceptError::TooMany(e), answer, started)
        })
}

/// A refusal being answered and audited (boxed, see [`refuse::refuse`]).
type Refusing<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The refusal for `e`, if anybody is there to get one. Not async, and taking `e` by
/// value: an error kept in scope across the answer's `await` would enlarge the future
/// of every tunnel, refused or not.
fn refusal<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    info: &'a SessionInfo,
    e: AcceptError,
    answer: Answer,
    started: Instant,
) -> Option<Refusing<'a>> {
    let error = e.to_client(&shared.cfg.trust_domain)?;
    Some(refuse::refuse(
        &shared.audit,
        client,
        info,
        error.into(),
        answer,
        started,
    ))
}

/// The workload identity of the client certificate; or, counted and logged, what the node
/// is told when there is none (not async, like [`refusal`]).
fn identity_of(
    client: &Client,
    trust_domain: &str,
    peer: SocketAddr,
) -> Result<SpiffeId, Option<ErrorResponse>> {
    peer_identity(client, trust_domain).map_err(|e| {
        let reason = match e {
            AcceptError::CertificateNotValid(_) => "certificate_expired",
            _ => "no_identity",
        };
        metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason).increment(1);
        tracing::warn!(%peer, error = %e, "client certificate has no usable identity");
        e.to_client(trust_domain)
    })
}

/// TLS handshake, identity, preamble, and the route's protocol against the node's.
async fn open(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    drain: &watch::Receiver<bool>,
) -> Option<Box<Opened>> {
    let _ = tcp.set_nodelay(true);
    let mut started = Instant::now();
    let timeout = shared.cfg.tls_handshake_timeout;
    // Boxed, like every large set-up step: freed as soon as it is done.
    let accept = Box::pin(shared.acceptor().accept(tcp));
    let tls = match tokio::time::timeout(timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = handshake_failure_reason(&e);
            metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason).increment(1);
            tracing::info!(%peer, %e, reason, "tls handshake refused");
            return None;
        }
        Err(_) => {
            metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => "timeout").increment(1);
            return None;
        }
    };
    metrics::histogram!(TLS_HANDSHAKE_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::counter!(CONNECTIONS_TOTAL).increment(1);

    let mut client = tls;
    let trust_domain = &shared.cfg.trust_domain;
    let identity = match identity_of(&client, trust_domain, peer) {
        Ok(id) => id,
        Err(Some(error)) => {
            refuse::send_error(&mut client, &error).await;
            return None;
        }
        Err(None) => return None,
    };

    let mut info = SessionInfo {
        session_id: new_session_id(),
        identity: identity.to_string(),
        node: None,
        node_verified: false,
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
        Ok(Err(e)) => {
            let answer = Answer::ErrorResponse;
            if let Some(refused) = refusal(shared, &mut client, &info, e, answer, started) {
                refused.await;
            }
            return None;
        }
        Err(_) => {
            metrics::counter!(IDLE_TUNNELS_CLOSED_TOTAL).increment(1);
            let _ = client.shutdown().await;
            return None;
        }
    };
    info.node = Some(preamble.node.clone());
    info.pod = Some(preamble.pod.clone());
    info.database_route = Some(preamble.route.clone());
    info.client_addr = Some(preamble.client_addr.to_string());
    info.protocol = preamble.protocol;
    // From here on, the session's start (a warm tunnel may have waited for its preamble).
    started = Instant::now();
    let gauge = GaugeHeld::new(ACTIVE_SESSIONS);
    let slot = match check_and_admit(
        shared,
        &mut client,
        &mut info,
        &preamble,
        &identity,
        started,
    ) {
        Ok(slot) => slot,
        Err(refused) => {
            if let Some(refused) = refused {
                refused.await;
            }
            return None;
        }
    };
    let active = Active::new(gauge, slot);
    Some(Box::new(Opened {
        client,
        identity,
        info,
        preamble,
        started,
        active,
    }))
}

/// Reads the node's preamble: route, pod metadata, protocol (never the identity).
async fn read_preamble(client: &mut Client) -> Result<Preamble, AcceptError> {
    let mut header = [0u8; PREAMBLE_HEADER_LEN];
    client
        .read_exact(&mut header)
        .await
        .map_err(|_| AcceptError::Gone)?;
    let len = Preamble::body_len(&header).map_err(AcceptError::BadPreamble)?;
    let mut body = vec![0u8; len];
    client
        .read_exact(&mut body)
        .await
        .map_err(|_| AcceptError::Gone)?;
    Preamble::decode_body(&body).map_err(AcceptError::BadPreamble)
}

/// The workload identity in the client certificate, in our trust domain, while the
/// certificate is valid: checked here for every handshake, since a resumed one restores
/// the certificate stored with the session without verifying it again.
fn peer_identity(client: &Client, trust_domain: &str) -> Result<SpiffeId, AcceptError> {
    let cert = client
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(AcceptError::NoCertificate)?;
    let id = spiffe_id_of(cert).map_err(AcceptError::NoSpiffeId)?;
    if id.trust_domain != trust_domain {
        return Err(AcceptError::ForeignTrustDomain {
            id,
            trust_domain: trust_domain.to_owned(),
        });
    }
    if let Err(source) = check_validity(cert, SystemTime::now()) {
        return Err(AcceptError::CertificateNotValid(format!(
            "{id} is not valid now: {source}"
        )));
    }
    Ok(id)
}

/// The node the CA service issued the client certificate to, if it names one.
fn issued_to_node_of(client: &Client, trust_domain: &str) -> Option<String> {
    let cert = client.get_ref().1.peer_certificates()?.first()?;
    pki::issued_to_node_of(cert, trust_domain)
}

/// The preamble's claims against the certificate. The pod's namespace and service account
/// are the identity's own, so a node cannot write another workload's pod into the audit
/// log; when the certificate names the node it was issued to, the preamble's node must be
/// that one (a node cannot pose as another). What the certificate cannot say (pod name,
/// uid, container) stays the node's claim. `Ok(true)`: the node is the certificate's.
fn check_preamble(
    preamble: &Preamble,
    identity: &SpiffeId,
    cert_node: Option<&str>,
) -> Result<bool, AcceptError> {
    let pod = &preamble.pod;
    let mismatch = |what: &str, claimed: &str, actual: &str| {
        AcceptError::PreambleMismatch(format!(
            "{what} {claimed:?}, but the certificate is {identity} ({what} {actual:?})"
        ))
    };
    if let Some(ns) = pod
        .namespace
        .as_deref()
        .filter(|ns| *ns != identity.namespace)
    {
        return Err(mismatch("pod namespace", ns, &identity.namespace));
    }
    if let Some(sa) = pod
        .service_account
        .as_deref()
        .filter(|sa| *sa != identity.service_account)
    {
        return Err(mismatch("service account", sa, &identity.service_account));
    }
    match cert_node {
        Some(node) if node != preamble.node => Err(AcceptError::PreambleMismatch(format!(
            "node {:?}, but the certificate was issued to node {node:?}",
            preamble.node
        ))),
        Some(_) => Ok(true),
        None => Ok(false),
    }
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

fn new_session_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
