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

/// Checks the preamble against the certificate ([`check_preamble`]) and the node's
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
    let e = match (protocol, shared.policy.database(route).map(|d| d.protocol)) {
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
    let accept = Box::pin(shared.acceptor.accept(tcp));
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
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::pg::{self, Severity};
    use crate::proxy::testing::{self, Pki, TRUST_DOMAIN};

    fn app() -> SpiffeId {
        SpiffeId::new(TRUST_DOMAIN, "apps", "web")
    }

    fn preamble(route: &str, protocol: Protocol) -> Vec<u8> {
        Preamble {
            route: route.into(),
            node: "node-1".into(),
            client_addr: "10.0.0.1:40000".parse().unwrap(),
            original_dst: None,
            pod: Default::default(),
            protocol,
        }
        .encode()
    }

    /// Runs `open` on one connection while the node's end sends `first` and then reads
    /// to the end (with `read_after`): the opened tunnel and what the node read.
    async fn open_one(
        shared: &Arc<Shared>,
        connector: &TlsConnector,
        first: &[u8],
        read_after: bool,
    ) -> (Option<Box<Opened>>, std::io::Result<Vec<u8>>) {
        let (accepted, peer, dialled) = testing::tcp_pair().await;
        let (_drain_tx, drain) = watch::channel(false);
        let node = async {
            let mut tls = testing::node_tls(connector, dialled).await?;
            tls.write_all(first).await?;
            tls.flush().await?;
            let mut got = Vec::new();
            if read_after {
                tls.read_to_end(&mut got).await?;
            }
            Ok(got)
        };
        tokio::join!(open(shared, accepted, peer, &drain), node)
    }

    /// One whole tunnel through [`handle`]: what the node read after sending `sent`.
    async fn session(shared: &Arc<Shared>, connector: &TlsConnector, sent: &[u8]) -> Vec<u8> {
        let (accepted, peer, dialled) = testing::tcp_pair().await;
        let (_drain_tx, drain) = watch::channel(false);
        let proxy = tokio::spawn(handle(shared.clone(), accepted, peer, drain));
        let mut tls = testing::node_tls(connector, dialled).await.unwrap();
        tls.write_all(sent).await.unwrap();
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        proxy.await.unwrap();
        got
    }

    #[tokio::test]
    async fn a_workload_certificate_is_accepted_with_its_spiffe_id() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let connector = pki.node_connector(&app(), &pki);
        let (opened, node) =
            open_one(&shared, &connector, &preamble("kv", Protocol::Tcp), false).await;
        node.unwrap();
        let opened = opened.expect("a valid workload certificate opens a tunnel");
        assert_eq!(opened.identity, app());
        assert_eq!(opened.info.identity, "spiffe://unit.test/ns/apps/sa/web");
        assert_eq!(opened.preamble.route, "kv");
        assert_eq!(opened.info.database_route.as_deref(), Some("kv"));
        assert_eq!(opened.info.protocol, Protocol::Tcp);
        assert_eq!(opened.info.node.as_deref(), Some("node-1"));
        assert_eq!(opened.info.session_id.len(), 32);
        // Nothing is audited before a session kind decides.
        assert!(testing::audit_events(&testing::audit_path(&pki)).is_empty());
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let stranger = Pki::new(TRUST_DOMAIN);
        // Trusts the proxy, but presents a certificate the proxy's CA did not sign.
        let connector = stranger.node_connector(&app(), &pki);

        let (opened, node) =
            open_one(&shared, &connector, &preamble("kv", Protocol::Tcp), true).await;
        assert!(opened.is_none());
        assert!(node.is_err(), "the node must see the refusal: {node:?}");
        assert!(testing::audit_events(&testing::audit_path(&pki)).is_empty());

        // The handshake error is counted as an unknown issuer.
        let (accepted, _, dialled) = testing::tcp_pair().await;
        let (server, _) = tokio::join!(
            shared.acceptor.accept(accepted),
            testing::node_tls(&connector, dialled)
        );
        let Err(e) = server else {
            panic!("the proxy must refuse the handshake");
        };
        assert_eq!(handshake_failure_reason(&e), "unknown_issuer");
    }

    #[tokio::test]
    async fn an_identity_outside_the_trust_domain_gets_an_error_response() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let foreign = SpiffeId::new("other.test", "apps", "web");
        let connector = pki.node_connector(&foreign, &pki);
        let (opened, node) =
            open_one(&shared, &connector, &preamble("kv", Protocol::Tcp), true).await;
        assert!(opened.is_none());
        let expected = ErrorResponse::fatal(
            "28000",
            "db-gateway: identity spiffe://other.test/ns/apps/sa/web is not in trust domain unit.test",
        )
        .with_hint("Workload certificates must carry one SPIFFE ID spiffe://unit.test/ns/<namespace>/sa/<service-account>.");
        assert_eq!(node.unwrap(), expected.encode());
        assert!(testing::audit_events(&testing::audit_path(&pki)).is_empty());
    }

    #[tokio::test]
    async fn a_bad_preamble_is_refused_and_audited() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let connector = pki.node_connector(&app(), &pki);
        let (opened, node) = open_one(
            &shared,
            &connector,
            b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n",
            true,
        )
        .await;
        assert!(opened.is_none());
        let expected = ErrorResponse::fatal(
            "08P01",
            "db-gateway proxy: bad preamble: missing DBGW magic: the peer is not a db-gateway node",
        )
        .with_hint("Connect through the db-gateway node agent, not to the proxy directly.");
        assert_eq!(node.unwrap(), expected.encode());
        let events = testing::audit_events(&testing::audit_path(&pki));
        assert_eq!(events.len(), 2, "{events:?}");
        for (e, name) in events.iter().zip(["db.session.start", "db.session.end"]) {
            assert_eq!(e["event"], name);
            assert_eq!(e["result"], "error");
            assert_eq!(e["error_code"], "08P01");
            assert_eq!(e["error_message"], expected.message.as_str());
            assert_eq!(e["identity"], "spiffe://unit.test/ns/apps/sa/web");
        }
    }

    #[tokio::test]
    async fn a_tcp_session_relays_after_accept() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, echo_addr);
        let connector = pki.node_connector(&app(), &pki);

        let (accepted, peer, dialled) = testing::tcp_pair().await;
        let (_drain_tx, drain) = watch::channel(false);
        let proxy = tokio::spawn(handle(shared.clone(), accepted, peer, drain));
        let mut tls = testing::node_tls(&connector, dialled).await.unwrap();
        tls.write_all(&preamble("kv", Protocol::Tcp)).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        tls.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.unwrap();
        proxy.await.unwrap();

        let events = testing::audit_events(&testing::audit_path(&pki));
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0]["result"], "success");
        assert_eq!(events[0]["role"], "apps");
        assert_eq!(events[0]["protocol"], "tcp");
        assert_eq!(events[1]["bytes_client_to_server"], 4);
        assert_eq!(events[1]["bytes_server_to_client"], 4);
    }

    #[tokio::test]
    async fn a_postgres_tunnel_on_a_tcp_route_gets_an_error_response() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let connector = pki.node_connector(&app(), &pki);
        let got = session(&shared, &connector, &preamble("kv", Protocol::Postgres)).await;
        let expected = ErrorResponse::fatal(
            "08000",
            "db-gateway: route \"kv\" is a tcp route, but the node sent a PostgreSQL connection",
        )
        .with_hint("Set protocol: tcp on the node listener or interception route for this route, or point it at a postgres route.");
        assert_eq!(got, expected.encode());
        let events = testing::audit_events(&testing::audit_path(&pki));
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[1]["error_code"], "08000");
        assert_eq!(events[1]["protocol"], "postgres");
    }

    #[tokio::test]
    async fn a_tcp_tunnel_on_a_postgres_or_unknown_route_is_closed_and_audited() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let connector = pki.node_connector(&app(), &pki);
        for (route, code, message) in [
            (
                "pg",
                "08000",
                "route \"pg\" is a postgres route, but the node sent a tcp connection",
            ),
            (
                "nope",
                "3D000",
                "route \"nope\" is not configured on the proxy",
            ),
        ] {
            let got = session(&shared, &connector, &preamble(route, Protocol::Tcp)).await;
            assert!(
                got.is_empty(),
                "a tcp client gets no ErrorResponse: {got:?}"
            );
            let events = testing::audit_events(&testing::audit_path(&pki));
            let last = &events[events.len() - 2..];
            for e in last {
                assert_eq!(e["result"], "error");
                assert_eq!(e["error_code"], code);
                assert_eq!(e["error_message"], message);
                assert_eq!(e["database_route"], route);
            }
        }
    }

    #[tokio::test]
    async fn a_postgres_session_is_decided_by_policy_then_logs_in() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let connector = pki.node_connector(&app(), &pki);

        // A user the role does not allow: denied, with what is allowed.
        let mut sent = preamble("pg", Protocol::Postgres);
        sent.extend(pg::encode_startup(&[("user", "x"), ("database", "d")]));
        let got = session(&shared, &connector, &sent).await;
        let expected = ErrorResponse::fatal(
            "28000",
            "db-gateway: identity spiffe://unit.test/ns/apps/sa/web may not log in to \"pg\" as database user \"x\"",
        )
        .with_hint("Allowed database users: \"u\".");
        assert_eq!(got, expected.encode());
        let events = testing::audit_events(&testing::audit_path(&pki));
        assert_eq!(events[1]["result"], "denied");
        assert_eq!(events[1]["requested_user"], "x");

        // An allowed one: the login fails (nothing listens), and says so.
        let mut sent = preamble("pg", Protocol::Postgres);
        sent.extend(pg::encode_startup(&[("user", "u"), ("database", "d")]));
        let got = session(&shared, &connector, &sent).await;
        let (kind, fields) = error_fields(&got);
        assert_eq!(kind, Severity::Fatal);
        assert_eq!(fields[&b'C'], "08001");
        assert!(
            fields[&b'M'].starts_with(
                "db-gateway: database \"pg\" is unreachable: cannot connect to 127.0.0.1:1"
            ),
            "{fields:?}"
        );
        let events = testing::audit_events(&testing::audit_path(&pki));
        assert_eq!(events.len(), 4);
        assert_eq!(events[3]["result"], "error");
        assert_eq!(events[3]["db_user"], "u");
    }

    /// The severity and fields of one encoded `ErrorResponse`.
    fn error_fields(b: &[u8]) -> (Severity, std::collections::HashMap<u8, String>) {
        assert_eq!(b[0], b'E', "{b:?}");
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(b.len(), 1 + len);
        let mut fields = std::collections::HashMap::new();
        let mut rest = &b[5..];
        while rest[0] != 0 {
            let end = rest.iter().position(|&c| c == 0).unwrap();
            fields.insert(rest[0], String::from_utf8(rest[1..end].to_vec()).unwrap());
            rest = &rest[end + 1..];
        }
        let sev = if fields[&b'S'] == "FATAL" {
            Severity::Fatal
        } else {
            Severity::Error
        };
        (sev, fields)
    }

    /// The size of the future `f` returns (never called).
    fn future_size<A, F: Future>(_: &impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every session's task holds `handle`, then one boxed phase at a time. The bounds are
    /// the sizes before the proxy was split into these files (rustc 1.95; `open` 24 bytes
    /// more, a transient phase): a change that grows a session's memory fails here.
    #[tokio::test]
    async fn session_futures_stay_small() {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let (_tx, drain) = watch::channel(false);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let s = &shared;
        let handle = |t: TcpStream| handle(shared.clone(), t, peer, drain.clone());
        let open = |t: TcpStream| open(s, t, peer, &drain);
        let start = |o: Box<Opened>| postgres::start(s, o);
        let run = |x: Box<postgres::Session<'static>>| postgres::run(s, x, drain.clone());
        let tcp = |o: Box<Opened>| tcp::handle(s, o, drain.clone());
        let sizes = [
            ("handle", future_size(&handle), 136),
            ("open", future_size(&open), 2760),
            ("postgres::start", future_size(&start), 5136),
            ("postgres::run", future_size(&run), 4656),
            ("tcp::handle", future_size(&tcp), 2424),
        ];
        for (what, size, bound) in sizes {
            assert!(size <= bound, "{what}: {size} bytes, was {bound}");
        }
    }

    #[test]
    fn accept_errors_map_to_what_the_client_reads() {
        let hint = "Workload certificates must carry one SPIFFE ID spiffe://td/ns/<namespace>/sa/<service-account>.";
        let e = AcceptError::NoCertificate.to_client("td").unwrap();
        assert_eq!(
            e,
            ErrorResponse::fatal("28000", "db-gateway: no client certificate").with_hint(hint)
        );
        let bad = || PkiError::BadSpiffeId {
            id: "spiffe://td/x".into(),
            reason: "no sa".into(),
        };
        let e = AcceptError::NoSpiffeId(bad()).to_client("td").unwrap();
        assert_eq!(e.sqlstate, "28000");
        assert_eq!(
            e.message,
            "db-gateway: invalid SPIFFE ID \"spiffe://td/x\": no sa"
        );
        assert_eq!(e.hint.as_deref(), Some(hint));
        let e = AcceptError::BadPreamble(TunnelError::BadPreamble("x".into()))
            .to_client("td")
            .unwrap();
        assert_eq!(e.sqlstate, "08P01");
        assert_eq!(e.message, "db-gateway proxy: bad preamble: x");
        assert!(AcceptError::Gone.to_client("td").is_none());
        let e = AcceptError::RouteIsPostgres("r".into())
            .to_client("td")
            .unwrap();
        assert_eq!(
            e,
            ErrorResponse::fatal(
                "08000",
                "route \"r\" is a postgres route, but the node sent a tcp connection"
            )
        );
        let e = AcceptError::UnknownTcpRoute("r".into())
            .to_client("td")
            .unwrap();
        assert_eq!(
            e,
            ErrorResponse::fatal("3D000", "route \"r\" is not configured on the proxy")
        );
    }
}
