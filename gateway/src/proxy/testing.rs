//! Helpers for the proxy's unit tests: a scratch directory, certificates made with
//! [`crate::pki`] as `gateway up` makes them, a [`Shared`] built by [`super::prepare`] from
//! a real configuration, and the node's end of a tunnel (real TLS on loopback).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::Shared;
use super::opened::Client;
use crate::audit::SessionInfo;
use crate::config::ProxyConfig;
use crate::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};
use crate::route::Protocol;

pub(super) const TRUST_DOMAIN: &str = "unit.test";
pub(super) const PROXY_NAME: &str = "proxy.unit.test";

/// A directory removed when dropped.
pub(super) struct Scratch(PathBuf);

impl Scratch {
    pub(super) fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dbgw-proxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Both CAs of a trust domain (`pki::init_ca`), in a scratch directory.
pub(super) struct Pki {
    pub(super) dir: Scratch,
    pub(super) workload_ca: CertificateAuthority,
    n: AtomicUsize,
}

impl Pki {
    pub(super) fn new(trust_domain: &str) -> Self {
        let dir = Scratch::new();
        pki::init_ca(&dir.path().join("ca"), trust_domain).unwrap();
        let workload_ca = CertificateAuthority::load(
            &dir.path().join("ca").join(pki::WORKLOAD_CA_CERT),
            &dir.path().join("ca").join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        Self {
            dir,
            workload_ca,
            n: AtomicUsize::new(0),
        }
    }

    pub(super) fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("ca").join(name)
    }

    /// Issues `leaf` and writes it: returns the certificate and key files.
    pub(super) fn issue(&self, leaf: &LeafSpec) -> (PathBuf, PathBuf) {
        let (cert, key) = self
            .workload_ca
            .issue(leaf, Duration::from_secs(3600))
            .unwrap();
        let n = self.n.fetch_add(1, Ordering::SeqCst);
        let c = self.dir.path().join(format!("leaf{n}.crt"));
        let k = self.dir.path().join(format!("leaf{n}.key"));
        pki::write_public(&c, &cert).unwrap();
        pki::write_secret(&k, &key).unwrap();
        (c, k)
    }

    /// A node's client end for workload `id` (certificate from this PKI), trusting the
    /// proxy certificate of `proxy`'s.
    pub(super) fn node_connector(&self, id: &SpiffeId, proxy: &Pki) -> TlsConnector {
        let (c, k) = self.issue(&LeafSpec::workload(id));
        let cfg = crate::tunnel::client_config(
            pki::load_certs(&c).unwrap(),
            pki::load_key(&k).unwrap(),
            &pki::load_certs(&proxy.ca_file(pki::WORKLOAD_CA_CERT)).unwrap(),
        )
        .unwrap();
        TlsConnector::from(Arc::new(cfg))
    }
}

/// A proxy's shared state from a real configuration: a `tcp` route `kv` to `tcp_upstream`,
/// a `postgres` route `pg` (nothing listening), and a role letting namespace `apps` use
/// both. The audit log is `<pki dir>/audit.log`.
pub(super) fn shared(pki: &Pki, tcp_upstream: SocketAddr) -> Arc<Shared> {
    let (cert, key) = pki.issue(&LeafSpec::server(vec![PROXY_NAME.into()], vec![]));
    let workload_ca = pki.ca_file(pki::WORKLOAD_CA_CERT);
    let yaml = format!(
        r#"
listen: 127.0.0.1:0
trust_domain: {TRUST_DOMAIN}
tls: {{ cert: "{}", key: "{}", client_ca: "{}" }}
db_client_ca: {{ cert: "{}", key: "{}" }}
audit: {{ path: "{}" }}
startup_timeout: 5s
tunnel_idle_timeout: 5s
upstream_connect_timeout: 2s
databases:
  - name: kv
    protocol: tcp
    upstream: {{ address: "{tcp_upstream}" }}
  - name: pg
    upstream: {{ address: "127.0.0.1:1", auth: cert, ca: "{}" }}
roles:
  - name: apps
    match: {{ namespace: apps }}
    databases: {{ names: [kv, pg] }}
    db_users: [u]
    db_names: [d]
"#,
        cert.display(),
        key.display(),
        workload_ca.display(),
        pki.ca_file(pki::DB_CLIENT_CA_CERT).display(),
        pki.ca_file(pki::DB_CLIENT_CA_KEY).display(),
        audit_path(pki).display(),
        workload_ca.display(),
    );
    let cfg: ProxyConfig = serde_norway::from_str(&yaml).unwrap();
    Arc::new(super::prepare(cfg, "127.0.0.1:0".parse().unwrap()).unwrap())
}

pub(super) fn audit_path(pki: &Pki) -> PathBuf {
    pki.dir.path().join("audit.log")
}

/// The audit log's events so far (what `log` queued is written first).
pub(super) fn audit_events(log: &crate::audit::AuditLog, path: &Path) -> Vec<serde_json::Value> {
    log.flush();
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A loopback listener and a connection to it: (accepted end, dialling end).
pub(super) async fn tcp_pair() -> (TcpStream, SocketAddr, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dial = TcpStream::connect(l.local_addr().unwrap());
    let (accepted, dialled) = tokio::join!(l.accept(), dial);
    let (accepted, peer) = accepted.unwrap();
    (accepted, peer, dialled.unwrap())
}

/// The node's end: a TLS client on `tcp` to the proxy named [`PROXY_NAME`].
pub(super) async fn node_tls(
    connector: &TlsConnector,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    connector
        .connect(ServerName::try_from(PROXY_NAME).unwrap(), tcp)
        .await
}

/// A handshaked tunnel: the proxy's end (as `accept` would hand it on) and the node's.
pub(super) async fn tunnel(
    shared: &Shared,
    connector: &TlsConnector,
) -> (Client, tokio_rustls::client::TlsStream<TcpStream>) {
    let (accepted, _, dialled) = tcp_pair().await;
    let (server, client) = tokio::join!(
        shared.acceptor().accept(accepted),
        node_tls(connector, dialled)
    );
    (server.unwrap(), client.unwrap())
}

/// A session as `accept` records it before a decision.
pub(super) fn info(identity: &SpiffeId, route: &str, protocol: Protocol) -> SessionInfo {
    SessionInfo {
        session_id: "0123456789abcdef0123456789abcdef".into(),
        identity: identity.to_string(),
        node: Some("node-1".into()),
        node_verified: false,
        pod: None,
        database_route: Some(route.into()),
        protocol,
        requested_user: None,
        requested_database: None,
        db_user: None,
        db_name: None,
        role: None,
        client_addr: Some("10.0.0.1:40000".into()),
        node_addr: "127.0.0.1:1".into(),
        upstream_addr: None,
        upstream_reused: false,
    }
}
