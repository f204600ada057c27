//! `accept`'s unit tests: real TLS on loopback with certificates from `proxy::testing`.

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
    let (opened, node) = open_one(&shared, &connector, &preamble("kv", Protocol::Tcp), false).await;
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
    assert!(testing::audit_events(&shared.audit, &testing::audit_path(&pki)).is_empty());
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
    let pki = Pki::new(TRUST_DOMAIN);
    let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
    let stranger = Pki::new(TRUST_DOMAIN);
    // Trusts the proxy, but presents a certificate the proxy's CA did not sign.
    let connector = stranger.node_connector(&app(), &pki);

    let (opened, node) = open_one(&shared, &connector, &preamble("kv", Protocol::Tcp), true).await;
    assert!(opened.is_none());
    assert!(node.is_err(), "the node must see the refusal: {node:?}");
    assert!(testing::audit_events(&shared.audit, &testing::audit_path(&pki)).is_empty());

    // The handshake error is counted as an unknown issuer.
    let (accepted, _, dialled) = testing::tcp_pair().await;
    let (server, _) = tokio::join!(
        shared.acceptor().accept(accepted),
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
    let (opened, node) = open_one(&shared, &connector, &preamble("kv", Protocol::Tcp), true).await;
    assert!(opened.is_none());
    let expected = ErrorResponse::fatal(
        "28000",
        "db-gateway: identity spiffe://other.test/ns/apps/sa/web is not in trust domain unit.test",
    )
    .with_hint("Workload certificates must carry one SPIFFE ID spiffe://unit.test/ns/<namespace>/sa/<service-account>.");
    assert_eq!(node.unwrap(), expected.encode());
    assert!(testing::audit_events(&shared.audit, &testing::audit_path(&pki)).is_empty());
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
    let events = testing::audit_events(&shared.audit, &testing::audit_path(&pki));
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

    let events = testing::audit_events(&shared.audit, &testing::audit_path(&pki));
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
    let events = testing::audit_events(&shared.audit, &testing::audit_path(&pki));
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
        let events = testing::audit_events(&shared.audit, &testing::audit_path(&pki));
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
    let events = testing::audit_events(&shared.audit, &testing::audit_path(&pki));
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
    let events = testing::audit_events(&shared.audit, &testing::audit_path(&pki));
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
