//! The first bytes of a PostgreSQL connection, handled at the node: encryption requests
//! are answered `N` (the tunnel to the proxy is the encryption, and the application talks
//! to a local listener), the startup packet's length is checked with PostgreSQL's limits,
//! and everything else is left for the proxy to decide.

use tokio_uring::net::TcpStream;

use crate::pg::{self, ErrorResponse, StartupRequest, sqlstate};

/// At most one `SSLRequest` and one `GSSENCRequest` precede the startup packet.
const MAX_ENCRYPTION_REQUESTS: usize = 2;

/// Reads until one whole startup packet (or cancel request) is buffered and returns all
/// bytes read (any pipelined bytes after it included); `None` if the client left.
pub async fn negotiate(app: &TcpStream) -> Result<Option<Vec<u8>>, ErrorResponse> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut requests = 0;
    loop {
        let len = loop {
            if buf.len() >= 4 {
                let header = [buf[0], buf[1], buf[2], buf[3]];
                let len = pg::startup_packet_len(header).map_err(|e| {
                    ErrorResponse::fatal(e.sqlstate, format!("db-gateway: {}", e.message)).with_hint(format!(
                        "A PostgreSQL startup packet is 8 to {} bytes long; is this a PostgreSQL client?",
                        pg::MAX_STARTUP_PACKET_LENGTH
                    ))
                })?;
                if buf.len() >= len {
                    break len;
                }
            }
            if !read_more(app, &mut buf).await {
                return Ok(None);
            }
        };
        match pg::parse_startup_packet(&buf[..len]) {
            Ok(StartupRequest::Ssl | StartupRequest::GssEnc) => {
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
                let (res, _) = app.write_all(b"N".to_vec()).await;
                if res.is_err() {
                    return Ok(None);
                }
                buf.clear();
            }
            // Startup and cancel packets go to the proxy as they are; it answers errors in
            // the protocol itself (unknown versions, bad parameters).
            _ => return Ok(Some(buf)),
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
