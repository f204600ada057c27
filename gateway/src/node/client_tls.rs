//! Client TLS at the node: the application's own TLS (`sslmode=require`, `verify-full`,
//! PostgreSQL 17's `sslnegotiation=direct`) terminated here, so an application that insists
//! on TLS with its database keeps its connection string. After `SSLRequest` → `S` (or a
//! ClientHello as the first bytes) the node makes a rustls server handshake on the same
//! io_uring socket with the `tls` machinery of the tunnel, reads the startup packet inside
//! TLS and relays plaintext between that TLS and the tunnel.
//!
//! The relay directions here are the plain ones' (`relay`) with the application's side
//! sealed and opened: ciphertext reads in the same adaptive buffers, plaintext in pooled
//! buffers given back after each write, sealed records in the connection's one output
//! buffer, so no allocation is added per read.
//!
//! The certificate comes from the listener's files (explicit mode) or the CA for the
//! (route, dialled IP) (`server_certificates`). ALPN `postgresql` is the server's only
//! protocol: a client offering others is refused by rustls, as PostgreSQL 17 refuses it,
//! and direct TLS without ALPN is refused as PostgreSQL requires.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_uring::net::TcpStream;

use super::relay::{Budget, SMALL_READ};
use super::startup;
use super::tls::TlsConn;
use crate::buffer_pool::{self, AdaptiveBuf};
use crate::pg::{self, ErrorResponse, StartupRequest, sqlstate};
use crate::telemetry::node as telemetry;
use crate::tunnel::is_normal_close;

/// The application's TLS, the node being the server.
pub type AppTls = TlsConn<ServerConnection>;

/// PostgreSQL's ALPN protocol name (PostgreSQL 17, required for direct TLS).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// TLS 1.2 and 1.3 (PostgreSQL's default minimum is 1.2), no client certificate (the
/// workload's identity is the kernel's), ALPN `postgresql`, no session tickets or cache
/// (libpq does not resume; PostgreSQL sends none either).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(crate::tunnel::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}

/// Counts a client TLS handshake that did not finish, by `result`.
pub fn count_failure(result: &'static str) {
    metrics::counter!(telemetry::CLIENT_TLS_HANDSHAKES_TOTAL, "result" => result).increment(1);
}

/// The server handshake on `app`, after `S` or with the ClientHello bytes already read
/// (`early`, direct TLS, which must agree on ALPN `postgresql`), done by `deadline`.
/// Returns the TLS connection and the plaintext that came with the client's last flight;
/// `None` (counted, logged) if the handshake failed: the client gets a TLS alert or a
/// close, never a PostgreSQL message in the clear.
pub async fn accept(
    app: &Rc<TcpStream>,
    config: Arc<ServerConfig>,
    early: &[u8],
    direct: bool,
    deadline: Instant,
) -> Option<(Rc<AppTls>, Vec<u8>)> {
    let started = Instant::now();
    let conn = match ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%e, "client TLS: cannot start a server connection");
            count_failure("error");
            return None;
        }
    };
    let tls = AppTls::accept(app.clone(), conn);
    let mut plain = Vec::new();
    let done = async {
        tls.ingest_early(early)?;
        tls.handshake(&mut plain, "client").await
    };
    match tokio::time::timeout_at(deadline.into(), done).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%e, "client TLS handshake failed");
            count_failure("error");
            let _ = app.shutdown(std::net::Shutdown::Both);
            return None;
        }
        Err(_) => {
            tracing::debug!("client TLS handshake not done within the startup timeout");
            count_failure("timeout");
            let _ = app.shutdown(std::net::Shutdown::Both);
            return None;
        }
    }
    if direct && !tls.alpn_is(ALPN_POSTGRESQL) {
        // PostgreSQL: "direct SSL connection was established without ALPN protocol
        // negotiation extension".
        tracing::debug!("direct TLS without ALPN postgresql: closed");
        count_failure("no_alpn");
        tls.close_write().await;
        let _ = app.shutdown(std::net::Shutdown::Both);
        return None;
    }
    metrics::counter!(telemetry::CLIENT_TLS_HANDSHAKES_TOTAL, "result" => "ok").increment(1);
    metrics::histogram!(telemetry::CLIENT_TLS_HANDSHAKE_SECONDS)
        .record(started.elapsed().as_secs_f64());
    Some((Rc::new(tls), plain))
}

/// Reads inside TLS until one whole startup packet is buffered (`buf` holds what came with
/// the handshake); `None` if the client left. An encryption request inside TLS breaks the
/// protocol.
pub async fn read_startup(
    tls: &AppTls,
    mut buf: Vec<u8>,
) -> Result<Option<Vec<u8>>, ErrorResponse> {
    let mut cipher = Vec::with_capacity(pg::MAX_STARTUP_PACKET_LENGTH);
    loop {
        if let Some(len) = startup::whole_packet(&buf)? {
            if let Ok(StartupRequest::Ssl | StartupRequest::GssEnc) =
                pg::parse_startup_packet(&buf[..len])
            {
                return Err(ErrorResponse::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "db-gateway: encryption request inside TLS",
                )
                .with_hint("Send the startup message once TLS is established."));
            }
            return Ok(Some(buf));
        }
        let (res, c) = tls.recv(cipher, &mut buf).await;
        cipher = c;
        match res {
            Ok((true, _)) => {}
            Ok((false, _)) => return Ok(None),
            Err(e) => {
                tracing::debug!(%e, "client TLS broke before the startup packet");
                tls.shutdown();
                return Ok(None);
            }
        }
    }
}

/// Application (TLS) → proxy until the application closes; then passes the close on.
pub async fn app_to_proxy(app: Rc<AppTls>, tunnel: Rc<TlsConn>, budget: Budget) -> io::Result<u64> {
    let mut ciphers = AdaptiveBuf::new(SMALL_READ, budget.up_read);
    let mut total = 0u64;
    let bytes_metric = metrics::counter!(telemetry::BYTES_TOTAL, "direction" => "app_to_proxy");
    let ended = loop {
        let mut plain = Vec::new();
        let (res, cipher) = app.recv(ciphers.take(), &mut plain).await;
        let read = res.as_ref().map(|(_, n)| *n).unwrap_or(0);
        ciphers.put_back(cipher, read);
        let open = match res {
            Ok((open, _)) => open,
            Err(e) if is_normal_close(&e) => false,
            Err(e) => {
                buffer_pool::give(plain);
                break Err(e);
            }
        };
        if !plain.is_empty() {
            let len = plain.len() as u64;
            let sent = tunnel.send(&plain).await;
            buffer_pool::give(plain);
            if let Err(e) = sent {
                break Err(e);
            }
            total += len;
            bytes_metric.increment(len);
        }
        if app.wants_write() {
            app.flush().await?;
        }
        if !open {
            break Ok(total);
        }
    };
    tunnel.close_write().await;
    ended
}

/// Proxy → application (TLS) until the proxy closes; `delivered` as in `relay`.
pub async fn proxy_to_app(
    app: Rc<AppTls>,
    tunnel: Rc<TlsConn>,
    budget: Budget,
    delivered: &std::cell::Cell<bool>,
) -> io::Result<u64> {
    let mut ciphers = AdaptiveBuf::new(SMALL_READ, budget.down_read);
    let mut total = 0u64;
    let bytes_metric = metrics::counter!(telemetry::BYTES_TOTAL, "direction" => "proxy_to_app");
    loop {
        let mut plain = Vec::new();
        let (res, cipher) = tunnel.recv(ciphers.take(), &mut plain).await;
        let read = res.as_ref().map(|(_, n)| *n).unwrap_or(0);
        ciphers.put_back(cipher, read);
        let (open, _) = match res {
            Ok(r) => r,
            Err(e) => {
                buffer_pool::give(plain);
                return Err(e);
            }
        };
        if !plain.is_empty() {
            let len = plain.len() as u64;
            let sent = app.send(&plain).await;
            buffer_pool::give(plain);
            if let Err(e) = sent {
                return if is_normal_close(&e) {
                    Ok(total)
                } else {
                    Err(e)
                };
            }
            delivered.set(true);
            total += len;
            bytes_metric.increment(len);
        }
        if tunnel.wants_write() {
            tunnel.flush().await?;
        }
        if !open {
            break;
        }
    }
    app.close_write().await;
    Ok(total)
}

/// A refusal inside TLS: the `ErrorResponse`, close_notify, and the write side shut.
pub async fn refuse(app: &AppTls, r: &ErrorResponse) {
    let _ = app.send(&r.encode()).await;
    app.close_write().await;
}
