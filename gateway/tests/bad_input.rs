//! Every bad input a client or a peer can produce gets a precise answer: the exact
//! `ErrorResponse` (SQLSTATE, message, hint) or a refused TLS handshake that is counted;
//! never a panic, a hang or a leaked connection.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use gateway::harness::{DEMO_TRUST_DOMAIN, PROXY_SERVER_NAME, Stack};
use gateway::pg;
use gateway::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};
use gateway::pod::PodMeta;
use gateway::tunnel::Preamble;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bad_stack() -> Stack {
    let mut spec = spec();
    spec.data_plane.startup_timeout = Duration::from_secs(1);
    Stack::start(spec).expect("stack")
}

fn startup_with_version(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut p = pg::encode_startup(params);
    p[4..8].copy_from_slice(&version.to_be_bytes());
    p
}

#[test]
fn malformed_startup_packets_get_protocol_errors() {
    let s = bad_stack();
    let node = s.listeners[TEAM_A_API];

    let e = only_error(&raw_exchange(node, &10_001u32.to_be_bytes()));
    assert_eq!(e.sqlstate, "08P01");
    assert_eq!(
        e.message,
        "db-gateway: invalid length of startup packet: 10001 bytes (must be between 8 and 10000)"
    );
    assert!(
        e.hint
            .unwrap()
            .starts_with("A PostgreSQL startup packet is 8 to 10000 bytes long")
    );

    let e = only_error(&raw_exchange(node, &4u32.to_be_bytes()));
    assert_eq!(e.sqlstate, "08P01");
    assert!(
        e.message
            .contains("invalid length of startup packet: 4 bytes")
    );

    // Parameters without the final terminator.
    let mut p = pg::encode_startup(&[("user", "api")]);
    p.pop();
    let len = p.len() as u32;
    p[..4].copy_from_slice(&len.to_be_bytes());
    let e = only_error(&raw_exchange(node, &p));
    assert_eq!(e.sqlstate, "08P01");
    assert_eq!(
        e.message,
        "invalid startup packet layout: expected terminator as last byte"
    );

    // Protocol 2.0 (and anything not 3.x).
    let e = only_error(&raw_exchange(
        node,
        &startup_with_version(2 << 16, &[("user", "api")]),
    ));
    assert_eq!(e.sqlstate, "0A000");
    assert_eq!(
        e.message,
        "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"
    );
    assert!(e.hint.unwrap().contains("protocol 3.0"));

    // Bytes pipelined after SSLRequest before the answer (CVE-2021-23222 pattern).
    let mut p = pg::encode_ssl_request().to_vec();
    p.extend_from_slice(&pg::encode_startup(&[("user", "api")]));
    let e = only_error(&raw_exchange(node, &p));
    assert_eq!(
        e.message,
        "db-gateway: received unencrypted data after encryption request"
    );
}

#[test]
fn newer_protocol_minor_gets_negotiate_protocol_version_then_login() {
    let s = bad_stack();
    let mut p = startup_with_version(
        (3 << 16) | 2,
        &[("user", "api"), ("database", "app"), ("_pq_.fancy", "1")],
    );
    // Terminate right after, so the exchange ends once the login is through.
    p.extend_from_slice(&pg::terminate());
    let msgs = messages(&raw_exchange(s.listeners[TEAM_A_API], &p));
    assert_eq!(msgs[0].0, b'v', "{msgs:?}");
    let body = &msgs[0].1;
    assert_eq!(
        &body[..4],
        &(3u32 << 16).to_be_bytes(),
        "newest minor we speak: 3.0"
    );
    assert_eq!(&body[4..8], &1u32.to_be_bytes());
    assert_eq!(&body[8..], b"_pq_.fancy\0");
    assert_eq!((msgs[1].0, &msgs[1].1[..]), (b'R', &0u32.to_be_bytes()[..]));
    assert_eq!(msgs.last().unwrap().0, b'Z');
}

#[test]
fn policy_refusals_name_identity_and_allowed_values() {
    let s = bad_stack();
    let e = only_error(&raw_exchange(
        s.listeners[TEAM_A_API],
        &pg::encode_startup(&[("user", "api"), ("database", "postgres")]),
    ));
    assert_eq!(e.sqlstate, "3D000");
    assert_eq!(
        e.message,
        "db-gateway: identity spiffe://demo.db-gateway.local/ns/team-a/sa/api may not connect to database name \"postgres\" on \"main\""
    );
    assert_eq!(e.hint.as_deref(), Some("Allowed database names: \"app\"."));

    let e = only_error(&raw_exchange(
        s.listeners[TEAM_A_API],
        &pg::encode_startup(&[("user", "root"), ("database", "app")]),
    ));
    assert_eq!(e.sqlstate, "28000");
    assert_eq!(
        e.message,
        "db-gateway: identity spiffe://demo.db-gateway.local/ns/team-a/sa/api may not log in to \"main\" as database user \"root\""
    );
    assert_eq!(
        e.hint.as_deref(),
        Some("Allowed database users: \"api\", \"ghost\".")
    );
}

#[test]
fn upstream_unreachable_and_auth_failure() {
    let s = bad_stack();
    let e = only_error(&raw_exchange(
        s.listeners[DOWN_ROUTE],
        &pg::encode_startup(&[("user", "worker"), ("database", "app")]),
    ));
    assert_eq!(e.sqlstate, "08001");
    assert!(
        e.message.starts_with(
            "db-gateway: database \"down\" is unreachable: cannot connect to 127.0.0.1:"
        ),
        "{}",
        e.message
    );
    assert!(
        e.hint
            .unwrap()
            .contains("could not open a connection to the database server")
    );

    // "ghost" is allowed by policy but does not exist in the database.
    let e = only_error(&raw_exchange(
        s.listeners[TEAM_A_API],
        &pg::encode_startup(&[("user", "ghost"), ("database", "app")]),
    ));
    assert_eq!(e.sqlstate, "28000");
    assert_eq!(
        e.message,
        "db-gateway: database \"main\" refused login as \"ghost\": role \"ghost\" does not exist"
    );
    assert!(e.hint.unwrap().contains("must have a role \"ghost\""));
}

#[test]
fn proxy_unreachable_is_reported_by_the_node() {
    let mut s = bad_stack();
    let mut proxy = s.terminate_proxy().expect("proxy running");
    proxy.wait().unwrap();
    let e = only_error(&raw_exchange(
        s.listeners[TEAM_A_API],
        &pg::encode_startup(&[("user", "api"), ("database", "app")]),
    ));
    assert_eq!(e.sqlstate, "08001");
    assert!(
        e.message.starts_with(&format!(
            "db-gateway node demo-node: cannot reach the proxy at {}",
            s.proxy_addr
        )),
        "{}",
        e.message
    );
    assert!(e.hint.unwrap().contains("proxy.address"));
}

#[test]
fn silent_client_times_out_instead_of_hanging() {
    let s = bad_stack();
    let t0 = Instant::now();
    let e = only_error(&raw_exchange(s.listeners[TEAM_A_API], &[]));
    assert_eq!(e.sqlstate, "08P01");
    assert_eq!(
        e.message,
        "db-gateway: timeout waiting for the startup packet"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// A TLS client to the proxy with the given client identity (or none).
fn tls_client(
    s: &Stack,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> tokio_rustls::TlsConnector {
    let ca = pki::load_certs(&s.ca_dir.join(pki::WORKLOAD_CA_CERT)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca[0].clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(gateway::tunnel::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn pair(pem: (String, String)) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        vec![CertificateDer::from_pem_slice(pem.0.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(pem.1.as_bytes()).unwrap(),
    )
}

/// Connects, sends a valid preamble and startup, and returns what came back (or the error).
async fn try_session(
    s: &Stack,
    connector: tokio_rustls::TlsConnector,
    preamble: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let tcp = tokio::net::TcpStream::connect(s.proxy_addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from(PROXY_SERVER_NAME).unwrap(), tcp)
        .await?;
    let mut bytes = preamble;
    bytes.extend_from_slice(&pg::encode_startup(&[("user", "api"), ("database", "app")]));
    // Terminate right away: a granted session then ends by itself.
    bytes.extend_from_slice(&pg::terminate());
    // A refusing proxy may close before taking everything; its answer is still readable.
    let _ = tls.write_all(&bytes).await;
    let _ = tls.flush().await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .expect("proxy answers or closes")?;
    Ok(out)
}

fn good_preamble() -> Vec<u8> {
    Preamble {
        route: "main".into(),
        node: "test".into(),
        client_addr: "127.0.0.1:1".parse().unwrap(),
        original_dst: None,
        pod: PodMeta::default(),
        protocol: Default::default(),
    }
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_missing_foreign_and_expired_client_certificates() {
    let s = bad_stack();
    let id = SpiffeId::new(DEMO_TRUST_DOMAIN, "team-a", "api");
    let ca = CertificateAuthority::load(
        &s.ca_dir.join(pki::WORKLOAD_CA_CERT),
        &s.ca_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap();

    // Control: a valid certificate gets a session.
    let ok = try_session(
        &s,
        tls_client(
            &s,
            Some(pair(
                ca.issue(&LeafSpec::workload(&id), Duration::from_secs(600))
                    .unwrap(),
            )),
        ),
        good_preamble(),
    )
    .await
    .unwrap();
    assert_eq!(messages(&ok)[0].0, b'R', "valid certificate logs in");

    let other_dir = s.dir.join("other-ca");
    pki::init_ca(&other_dir, DEMO_TRUST_DOMAIN).unwrap();
    let other = CertificateAuthority::load(
        &other_dir.join(pki::WORKLOAD_CA_CERT),
        &other_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap();
    let now = SystemTime::now();
    let cases = [
        ("no_client_certificate", None),
        (
            "unknown_issuer",
            Some(pair(
                other
                    .issue(&LeafSpec::workload(&id), Duration::from_secs(600))
                    .unwrap(),
            )),
        ),
        (
            "certificate_expired",
            Some(pair(
                ca.issue_between(
                    &LeafSpec::workload(&id),
                    now - Duration::from_secs(7200),
                    now - Duration::from_secs(3600),
                )
                .unwrap(),
            )),
        ),
    ];
    for (reason, client) in cases {
        let got = try_session(&s, tls_client(&s, client), good_preamble()).await;
        match got {
            Err(_) => {}
            Ok(bytes) => assert!(
                bytes.is_empty(),
                "{reason}: proxy sent data: {:?}",
                messages(&bytes)
            ),
        }
        // The proxy counts after the client already saw the refusal: poll briefly.
        let label = format!("reason=\"{reason}\"");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = scrape(s.proxy_admin);
            let n = metric_with(&m, "gateway_proxy_tls_handshake_failures_total", &label);
            if n == Some(1.0) {
                break;
            }
            assert!(Instant::now() < deadline, "{reason}: {n:?}\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_preamble_is_refused_with_protocol_violation() {
    let s = bad_stack();
    let ca = CertificateAuthority::load(
        &s.ca_dir.join(pki::WORKLOAD_CA_CERT),
        &s.ca_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap();
    let id = SpiffeId::new(DEMO_TRUST_DOMAIN, "team-a", "api");
    let connector = tls_client(
        &s,
        Some(pair(
            ca.issue(&LeafSpec::workload(&id), Duration::from_secs(600))
                .unwrap(),
        )),
    );
    let out = try_session(&s, connector, b"GET / HTTP/1.1\r\n\r\n".to_vec())
        .await
        .unwrap();
    let e = only_error(&out);
    assert_eq!(e.sqlstate, "08P01");
    assert_eq!(
        e.message,
        "db-gateway proxy: bad preamble: missing DBGW magic: the peer is not a db-gateway node"
    );
}

#[test]
fn no_connection_is_leaked_after_bad_inputs() {
    let s = bad_stack();
    let node = s.listeners[TEAM_A_API];
    for bytes in [
        10_001u32.to_be_bytes().to_vec(),
        startup_with_version(2 << 16, &[("user", "api")]),
        pg::encode_startup(&[("user", "root"), ("database", "app")]),
        pg::encode_startup(&[("user", "ghost"), ("database", "app")]),
        b"\x00\x00\x00\x10garbage".to_vec(),
    ] {
        let _ = raw_exchange(node, &bytes);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (n, p) = (scrape(s.node_admin), scrape(s.proxy_admin));
        let active = (
            metric(&n, "gateway_node_active_connections"),
            metric(&p, "gateway_proxy_active_sessions"),
        );
        if active == (Some(0.0), Some(0.0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections still open: {active:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The preamble is the node's word about pod metadata; identity and authorisation come only
/// from the client certificate. A peer that forges a preamble claiming another workload's
/// pod gains nothing: the proxy refuses a preamble whose namespace or service account is
/// not the certificate's (issue 18, item 3) and audits the certificate's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_preamble_cannot_change_identity() {
    let s = bad_stack();
    let ca = CertificateAuthority::load(
        &s.ca_dir.join(pki::WORKLOAD_CA_CERT),
        &s.ca_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap();
    let id = SpiffeId::new(DEMO_TRUST_DOMAIN, "intruder", "x");
    let connector = tls_client(
        &s,
        Some(pair(
            ca.issue(&LeafSpec::workload(&id), Duration::from_secs(600))
                .unwrap(),
        )),
    );
    let forged = Preamble {
        route: "main".into(),
        node: "demo-node".into(),
        client_addr: "127.0.0.1:1".parse().unwrap(),
        original_dst: None,
        pod: PodMeta {
            namespace: Some("team-a".into()),
            service_account: Some("api".into()),
            name: Some("api-0".into()),
            ..PodMeta::default()
        },
        protocol: Default::default(),
    }
    .encode();
    let out = try_session(&s, connector, forged).await.unwrap();
    let e = only_error(&out);
    assert_eq!(e.sqlstate, "08P01");
    assert_eq!(
        e.message,
        "db-gateway proxy: preamble does not match the client certificate: pod namespace \"team-a\", but the certificate is spiffe://demo.db-gateway.local/ns/intruder/sa/x (pod namespace \"intruder\")"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let start = loop {
        let ev = s.audit_events();
        if let Some(e) = ev.into_iter().find(|e| e["event"] == "db.session.start") {
            break e;
        }
        assert!(Instant::now() < deadline, "no audit event");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        start["identity"],
        "spiffe://demo.db-gateway.local/ns/intruder/sa/x"
    );
    assert_eq!(start["result"], "error");
    assert_eq!(start["error_code"], "08P01");
}
