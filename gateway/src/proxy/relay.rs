//! The proxy's byte relay after login. Both directions run until the session ends; the
//! server-to-client direction follows message boundaries so that a drain can end a session
//! exactly after a `ReadyForQuery` with status `I` (idle, no transaction open).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::pg::{BackendScanner, ErrorResponse, sqlstate};
use crate::tunnel::is_normal_close;

/// One TLS record of plaintext: reads this large coalesce naturally under load.
const CHUNK: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A side closed (EOF, reset, broken pipe: all normal ends of a TCP session).
    Closed,
    /// Drain ended the session at a transaction boundary.
    Drained,
    /// The server sent something that is not PostgreSQL framing.
    Protocol(String),
}

/// Byte counts, shared between the two directions of one session. Both run in the same
/// task, so relaxed atomics are only there to keep the session future `Send`.
#[derive(Default)]
pub struct Counters {
    client_to_server: AtomicU64,
    server_to_client: AtomicU64,
    /// The last server bytes ended at `ReadyForQuery` `I` and the client sent nothing since.
    idle: AtomicBool,
}

impl Counters {
    pub fn client_to_server(&self) -> u64 {
        self.client_to_server.load(Relaxed)
    }

    pub fn server_to_client(&self) -> u64 {
        self.server_to_client.load(Relaxed)
    }
}

/// Client → server: plain copy.
pub async fn client_to_server<R, W>(mut from: R, to: &mut W, counters: &Counters) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    // Registered once per connection: a lookup per message showed up in profiles.
    let bytes_metric =
        metrics::counter!("gateway_proxy_bytes_total", "direction" => "client_to_server");
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if is_normal_close(&e) => break,
            Err(e) => {
                tracing::debug!(%e, "client read failed");
                break;
            }
        };
        counters.idle.store(false, Relaxed);
        if let Err(e) = to.write_all(&buf[..n]).await.and(to.flush().await) {
            if !is_normal_close(&e) {
                tracing::debug!(%e, "server write failed");
            }
            return End::Closed;
        }
        counters.client_to_server.fetch_add(n as u64, Relaxed);
        bytes_metric.increment(n as u64);
    }
    // Pass the client's EOF on (TLS close_notify + FIN) so the server ends the session.
    let _ = to.shutdown().await;
    End::Closed
}

/// Server → client, watching message boundaries and the drain signal.
pub async fn server_to_client<R, W>(
    mut from: R,
    to: &mut W,
    counters: &Counters,
    first: &[u8],
    mut drain: watch::Receiver<bool>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scanner = BackendScanner::default();
    let mut draining = *drain.borrow();
    let mut buf = vec![0u8; CHUNK];
    // `first` holds any server bytes read together with the login's ReadyForQuery.
    counters.idle.store(true, Relaxed);
    if !first.is_empty() {
        if let Err(e) = scanner.feed(first) {
            return End::Protocol(e.message);
        }
        if to.write_all(first).await.is_err() {
            return End::Closed;
        }
        counters
            .idle
            .store(scanner.ready_status() == Some(b'I'), Relaxed);
    }
    // Registered once per connection: a lookup per message showed up in profiles.
    let bytes_metric =
        metrics::counter!("gateway_proxy_bytes_total", "direction" => "server_to_client");
    loop {
        if draining && counters.idle.load(Relaxed) {
            let e = ErrorResponse::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            )
            .with_detail("The db-gateway proxy is shutting down.")
            .with_hint("Reconnect: another proxy replica will serve the new connection.");
            let _ = to.write_all(&e.encode()).await;
            let _ = to.shutdown().await;
            return End::Drained;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) => return End::Closed,
                Ok(n) => n,
                Err(e) => {
                    if !is_normal_close(&e) {
                        tracing::debug!(%e, "server read failed");
                    }
                    return End::Closed;
                }
            },
            // A dropped sender means the process is going away: drain too.
            _ = drain.changed(), if !draining => {
                draining = true;
                continue;
            }
        };
        if let Err(e) = scanner.feed(&buf[..n]) {
            return End::Protocol(e.message);
        }
        if to.write_all(&buf[..n]).await.and(to.flush().await).is_err() {
            return End::Closed;
        }
        counters.server_to_client.fetch_add(n as u64, Relaxed);
        bytes_metric.increment(n as u64);
        counters
            .idle
            .store(scanner.ready_status() == Some(b'I'), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg;

    fn ready(status: u8) -> Vec<u8> {
        vec![b'Z', 0, 0, 0, 5, status]
    }

    #[tokio::test]
    async fn drain_waits_for_idle_ready_for_query() {
        let (mut server, server_side) = tokio::io::duplex(1024);
        let (client_side, mut client) = tokio::io::duplex(1024);
        let (tx, rx) = watch::channel(false);
        let counters = Counters::default();
        let mut client_w = client_side;
        let relay = server_to_client(server_side, &mut client_w, &counters, &[], rx);
        let driver = async {
            // A transaction is open ('T'): drain must wait.
            server.write_all(&ready(b'T')).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(true).unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            server.write_all(&ready(b'I')).await.unwrap();
        };
        let (end, ()) = tokio::join!(relay, driver);
        assert_eq!(end, End::Drained);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..12], &[ready(b'T'), ready(b'I')].concat()[..]);
        let (tag, body, _) = pg::split_message(&got[12..], 1 << 16).unwrap().unwrap();
        assert_eq!(tag, b'E');
        assert_eq!(ErrorResponse::parse(body).unwrap().sqlstate, "57P01");
    }
}
