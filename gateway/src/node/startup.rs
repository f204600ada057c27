//! The first bytes of a PostgreSQL connection, handled at the node: `GSSENCRequest` is
//! answered `N`; `SSLRequest` too on a route without client TLS, and on one with it the
//! caller answers (`S` once it has a certificate, see `client_tls`), as it takes over a
//! TLS ClientHello sent as the first bytes (PostgreSQL 17's direct TLS). The startup
//! packet's length is checked with PostgreSQL's limits, and everything else is left for
//! the proxy to decide.

use tokio_uring::net::TcpStream;

use crate::pg::{self, ErrorResponse, StartupRequest, sqlstate};

/// At most one `SSLRequest` and one `GSSENCRequest` precede the startup packet.
const MAX_ENCRYPTION_REQUESTS: usize = 2;

/// The first byte of a TLS handshake record: a client that starts with it wants direct TLS.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// How the client began.
#[derive(Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// The startup packet (or cancel request) with any pipelined bytes after it.
    Plain(Vec<u8>),
    /// `SSLRequest` on a route with client TLS; not answered yet.
    SslRequest,
    /// A TLS record as the first bytes (direct TLS): the bytes read so far.
    Direct(Vec<u8>),
}

/// The length of the startup packet at the start of `buf`, once all of it is there.
pub fn whole_packet(buf: &[u8]) -> Result<Option<usize>, ErrorResponse> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let header = [buf[0], buf[1], buf[2], buf[3]];
    let len = pg::startup_packet_len(header).map_err(|e| {
        ErrorResponse::fatal(e.sqlstate, format!("db-gateway: {}", e.message)).with_hint(format!(
            "A PostgreSQL startup packet is 8 to {} bytes long; is this a PostgreSQL client?",
            pg::MAX_STARTUP_PACKET_LENGTH
        ))
    })?;
    Ok((buf.len() >= len).then_some(len))
}

/// Reads until one whole startup packet (or cancel request) is buffered, or the client asks
/// for TLS on a route that offers it (`tls`); `None` if the client left.
pub async fn negotiate(app: &TcpStream, tls: bool) -> Result<Option<Negotiated>, ErrorResponse> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut requests = 0;
    loop {
        let len = loop {
            if tls && requests == 0 && buf.first() == Some(&TLS_HANDSHAKE) {
                return Ok(Some(Negotiated::Direct(buf)));
            }
            if let Some(len) = whole_packet(&buf)? {
                break len;
            }
            if !read_more(app, &mut buf).await {
                return Ok(None);
            }
        };
        match pg::parse_startup_packet(&buf[..len]) {
            Ok(request @ (StartupRequest::Ssl | StartupRequest::GssEnc)) => {
                requests += 1;
                if requests > MAX_ENCRYPTION_REQUESTS {
                    return Err(ErrorResponse::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "db-gateway: too many encryption requests",
                    )
                    .with_hint("Send SSLRequest or GSSENCRequest at most once each."));
                }
                if buf.len() > len {
                    // PostgreSQL treats bytes sent before the answer as an attack
                    // (CVE-2021-23222): refuse rather than forward them.
                    return Err(ErrorResponse::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "db-gateway: received unencrypted data after encryption request",
                    )
                    .with_hint("Wait for the server's answer to SSLRequest before sending more."));
                }
                if tls && request == StartupRequest::Ssl {
                    return Ok(Some(Negotiated::SslRequest));
                }
                let (res, _) = app.write_all(b"N".to_vec()).await;
                if res.is_err() {
                    return Ok(None);
                }
                buf.clear();
            }
            // Startup and cancel packets go to the proxy as they are; it answers errors in
            // the protocol itself (unknown versions, bad parameters).
            _ => return Ok(Some(Negotiated::Plain(buf))),
        }
    }
}

async fn read_more(app: &TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = Vec::with_capacity(pg::MAX_STARTUP_PACKET_LENGTH);
    let (res, c) = app.read(chunk).await;
    chunk = c;
    match res {
        Ok(0) | Err(_) => false,
        Ok(_) => {
            buf.extend_from_slice(&chunk);
            true
        }
    }
}
