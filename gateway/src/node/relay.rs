//! The node's relay between an application socket and its tunnel to the proxy.
//!
//! Bounded-latency buffering: a read from the application is sealed and written as soon
//! as it completes (io_uring already hands us everything that was ready, up to half the
//! direction's budget), unless `max_flush_delay` is set, in which case a short read may
//! wait that long for more bytes. Each direction holds at most its budget: the next read
//! is issued only after the previous bytes were written, so a slow receiver stops reading
//! from the sender (backpressure) and memory never grows with the peer's speed.

use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use tokio_uring::net::TcpStream;

use super::tls::TlsConn;
use crate::buffer_pool::{self, AdaptiveBuf};
use crate::telemetry::node as telemetry;
use crate::tunnel::is_normal_close;

/// The read an idle connection keeps posted: a PostgreSQL query or an echo fits, and
/// 10 000 idle connections pin 40 MiB of these, not 640 MiB.
pub(super) const SMALL_READ: usize = 2048;

/// How much a direction may hold, derived from the configured budget.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Plaintext read from the application per write (sealed into as many records as it
    /// needs, written with one operation).
    pub up_read: usize,
    /// Ciphertext read from the proxy per write to the application.
    pub down_read: usize,
}

impl Budget {
    pub fn new(per_direction: usize) -> Self {
        Self {
            // Several records per write when the application sends in bulk (fewer
            // operations per byte); a sealed record adds 22 bytes to its plaintext.
            up_read: (per_direction / 2).clamp(1024, 256 * 1024),
            // Plaintext from one ciphertext read is never larger than the read itself, so
            // read + plaintext stays within the budget.
            down_read: (per_direction / 2).clamp(1024, 256 * 1024),
        }
    }
}

/// Application → proxy until the application closes; then passes the close on.
pub async fn app_to_proxy(
    app: Rc<TcpStream>,
    tunnel: Rc<TlsConn>,
    budget: Budget,
    max_flush_delay: Duration,
) -> io::Result<u64> {
    let mut bufs = AdaptiveBuf::new(SMALL_READ, budget.up_read);
    let mut total = 0u64;
    // Registered once per connection: a lookup per message showed up in profiles.
    let bytes_metric = metrics::counter!(telemetry::BYTES_TOTAL, "direction" => "app_to_proxy");
    loop {
        let (res, mut buf) = app.read(bufs.take()).await;
        let n = match res {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if is_normal_close(&e) => break,
            Err(e) => return Err(e),
        };
        if !max_flush_delay.is_zero() && n < budget.up_read {
            tokio::time::sleep(max_flush_delay).await;
            read_ready(&app, &mut buf, budget.up_read);
        }
        let sent = tunnel.send(&buf).await;
        total += buf.len() as u64;
        bytes_metric.increment(buf.len() as u64);
        bufs.put_back(buf, n);
        sent?;
    }
    tunnel.close_write().await;
    Ok(total)
}

/// Appends whatever the socket has ready right now, without waiting (MSG_DONTWAIT).
fn read_ready(app: &TcpStream, buf: &mut Vec<u8>, limit: usize) {
    let start = buf.len();
    if start >= limit {
        return;
    }
    buf.reserve(limit - start);
    // SAFETY: recv writes at most `limit - start` bytes into the reserved spare capacity,
    // and we only extend `len` by what it reports as written.
    let n = unsafe {
        libc::recv(
            app.as_raw_fd(),
            buf.as_mut_ptr().add(start).cast(),
            limit - start,
            libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        // SAFETY: the kernel initialised `n` bytes after `start`.
        unsafe { buf.set_len(start + n as usize) };
    }
}

/// Proxy → application until the proxy closes. `delivered` turns true with the first
/// byte the application receives (until then, a failure is still reported to it as a
/// PostgreSQL error by the caller).
pub async fn proxy_to_app(
    app: Rc<TcpStream>,
    tunnel: Rc<TlsConn>,
    budget: Budget,
    delivered: &std::cell::Cell<bool>,
) -> io::Result<u64> {
    let mut ciphers = AdaptiveBuf::new(SMALL_READ, budget.down_read);
    let mut total = 0u64;
    // Registered once per connection: a lookup per message showed up in profiles.
    let bytes_metric = metrics::counter!(telemetry::BYTES_TOTAL, "direction" => "proxy_to_app");
    loop {
        // No plaintext buffer while waiting: `recv` takes one from the pool once
        // ciphertext has arrived, and it goes back after the write.
        let mut plain = Vec::new();
        let (res, cipher) = tunnel.recv(ciphers.take(), &mut plain).await;
        let read = match &res {
            Ok((_, n)) => *n,
            Err(_) => 0,
        };
        ciphers.put_back(cipher, read);
        let (open, _) = res?;
        if !plain.is_empty() {
            let len = plain.len();
            let (res, p) = app.write_all(plain).await;
            buffer_pool::give(p);
            if let Err(e) = res {
                return if is_normal_close(&e) {
                    Ok(total)
                } else {
                    Err(e)
                };
            }
            delivered.set(true);
            total += len as u64;
            bytes_metric.increment(len as u64);
        }
        // Key updates and similar need an answer even when we have no data to send.
        if tunnel.wants_write() {
            tunnel.flush().await?;
        }
        if !open {
            break;
        }
    }
    let _ = app.shutdown(std::net::Shutdown::Write);
    Ok(total)
}
