//! The proxy's byte relay after login. Both directions run until the session ends; the
//! server-to-client direction follows message boundaries so that a drain can end a session
//! exactly after a `ReadyForQuery` with status `I` (idle, no transaction open).

//!
//! Read buffers come from the per-thread [`buffer_pool`] and are held only while a read has data:
//! `poll_read` leaves nothing in the buffer when it returns `Pending`, so the buffer goes
//! back to the pool at once. An idle session holds no relay buffer at all (10 000 idle
//! connections would otherwise pin 320 MiB here), and a busy one never allocates or zeroes
//! per message.

use std::future::poll_fn;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::buffer_pool;
use crate::pg::{ErrorResponse, MessageScanner, sqlstate};
use crate::telemetry::proxy::BYTES_TOTAL;
use crate::tunnel::is_normal_close;

/// Four TLS records of plaintext: a bulk transfer (COPY) moves several of the server's
/// records per read and write (profiled: fewer operations per GB), while a read that
/// finds less returns what there is at once. A chunk is held only from a read to the end
/// of its write, never by a waiting session.
const CHUNK: usize = 64 * 1024;
/// Bytes of one read, in a pooled buffer that returns to the pool when dropped.
pub struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        buffer_pool::give(std::mem::take(&mut self.buf));
    }
}

/// Reads once into a pooled buffer; an empty chunk is the end of the stream.
pub async fn read_chunk<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Chunk> {
    poll_fn(|cx| {
        let mut buf = buffer_pool::take_filled(CHUNK);
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let len = rb.filled().len();
                Poll::Ready(Ok(Chunk { buf, len }))
            }
            Poll::Ready(Err(e)) => {
                buffer_pool::give(buf);
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                buffer_pool::give(buf);
                Poll::Pending
            }
        }
    })
    .await
}

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
    pub(super) client_to_server: AtomicU64,
    pub(super) server_to_client: AtomicU64,
    /// The last server bytes ended at `ReadyForQuery` `I` and the client sent nothing since.
    idle: AtomicBool,
}

impl Counters {
    /// For a session whose server just sent `ReadyForQuery` `I` (after login or reset).
    /// Set before the relay starts, not by it: the two directions start in either order.
    pub fn at_ready() -> Self {
        Self {
            idle: AtomicBool::new(true),
            ..Self::default()
        }
    }

    /// The server is idle outside a transaction, everything it sent was delivered, and
    /// the client sent nothing since.
    pub fn idle(&self) -> bool {
        self.idle.load(Relaxed)
    }

    pub fn client_to_server(&self) -> u64 {
        self.client_to_server.load(Relaxed)
    }

    pub fn server_to_client(&self) -> u64 {
        self.server_to_client.load(Relaxed)
    }
}

/// How the client's side of a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEnd {
    /// The client ended cleanly (`Terminate`, or EOF after whole messages) while the
    /// server was idle outside a transaction: nothing of the end was passed on, so the
    /// server session can be reset and kept.
    Keep,
    /// The end was passed on (`Terminate`, EOF), or the copy failed.
    Done,
}

/// Client → server: a copy that follows message boundaries, so that with `keep` a clean
/// end leaves the server session open for reuse ([`ClientEnd::Keep`]). Otherwise the
/// client's `Terminate` and EOF are passed on (TLS close_notify + FIN) so the server ends
/// the session.
pub async fn client_to_server<R, W>(
    mut from: R,
    to: &mut W,
    counters: &Counters,
    keep: bool,
) -> ClientEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Registered once per connection: a lookup per message showed up in profiles.
    let bytes_metric = metrics::counter!(BYTES_TOTAL, "direction" => "client_to_server");
    let mut scanner = MessageScanner::default();
    let mut framed = keep;
    let mut terminate: &[u8] = &[];
    loop {
        let chunk = match read_chunk(&mut from).await {
            Ok(c) if c.is_empty() => break,
            Ok(c) => c,
            Err(e) if is_normal_close(&e) => break,
            Err(e) => {
                tracing::debug!(%e, "client read failed");
                framed = false;
                break;
            }
        };
        // Bad framing is the server's to refuse: keep copying, only never keep.
        framed = framed && scanner.feed(&chunk).is_ok();
        let terminate_at = if framed {
            scanner.ends_with(b'X')
        } else {
            None
        };
        let forward = &chunk[..terminate_at.unwrap_or(chunk.len())];
        if !forward.is_empty() {
            counters.idle.store(false, Relaxed);
            if let Err(e) = to.write_all(forward).await.and(to.flush().await) {
                if !is_normal_close(&e) {
                    tracing::debug!(%e, "server write failed");
                }
                return ClientEnd::Done;
            }
            counters
                .client_to_server
                .fetch_add(forward.len() as u64, Relaxed);
            bytes_metric.increment(forward.len() as u64);
        }
        if terminate_at.is_some() {
            terminate = &crate::pg::TERMINATE;
            break;
        }
    }
    if framed && scanner.at_boundary() && counters.idle() {
        return ClientEnd::Keep;
    }
    if !terminate.is_empty() && to.write_all(terminate).await.is_ok() {
        counters
            .client_to_server
            .fetch_add(terminate.len() as u64, Relaxed);
    }
    let _ = to.shutdown().await;
    ClientEnd::Done
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
    let mut scanner = MessageScanner::default();
    let mut draining = *drain.borrow();
    // `first` holds any server bytes read together with the login's ReadyForQuery.
    if !first.is_empty() {
        counters.idle.store(false, Relaxed);
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
    let bytes_metric = metrics::counter!(BYTES_TOTAL, "direction" => "server_to_client");
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
        let chunk = tokio::select! {
            r = read_chunk(&mut from) => match r {
                Ok(c) if c.is_empty() => return End::Closed,
                Ok(c) => c,
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
        let n = chunk.len();
        // Not idle while these bytes are on their way: the session can only be kept while
        // this direction waits for the server with nothing read.
        counters.idle.store(false, Relaxed);
        if let Err(e) = scanner.feed(&chunk) {
            return End::Protocol(e.message);
        }
        if to.write_all(&chunk).await.and(to.flush().await).is_err() {
            return End::Closed;
        }
        counters.server_to_client.fetch_add(n as u64, Relaxed);
        bytes_metric.increment(n as u64);
        counters
            .idle
            .store(scanner.ready_status() == Some(b'I'), Relaxed);
    }
}

/// One direction of a `tcp` route: bytes as they come, then the end passed on (FIN, or
/// close_notify + FIN on the TLS side) so half-closing protocols work.
pub async fn copy_plain<R, W>(
    mut from: R,
    mut to: W,
    count: &AtomicU64,
    bytes_metric: metrics::Counter,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let chunk = match read_chunk(&mut from).await {
            Ok(c) if c.is_empty() => break,
            Ok(c) => c,
            Err(e) if is_normal_close(&e) => break,
            Err(e) => return Err(e),
        };
        to.write_all(&chunk).await?;
        to.flush().await?;
        count.fetch_add(chunk.len() as u64, Relaxed);
        bytes_metric.increment(chunk.len() as u64);
    }
    let _ = to.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg;
    use tokio::io::AsyncReadExt;

    fn ready(status: u8) -> Vec<u8> {
        vec![b'Z', 0, 0, 0, 5, status]
    }

    #[tokio::test]
    async fn drain_waits_for_idle_ready_for_query() {
        let (mut server, server_side) = tokio::io::duplex(1024);
        let (client_side, mut client) = tokio::io::duplex(1024);
        let (tx, rx) = watch::channel(false);
        let counters = Counters::at_ready();
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
