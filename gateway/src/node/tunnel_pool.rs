//! The warm tunnel pool: mTLS tunnels to the proxy, handshaked ahead of need, per workload
//! identity and data-plane thread. A new application connection takes one and only sends
//! its preamble, so its set-up skips the TCP and TLS handshakes with the proxy.
//!
//! The pool fills on demand: each session that takes a tunnel (or finds none) starts
//! background dials up to `warm_tunnels` kept or dialling, so a busy identity finds one
//! and an idle one holds nothing once `warm_tunnel_idle` passes.
//! Tunnels stay on the thread that dialled them (io_uring sockets belong to their ring).
//!
//! Identity: a pool belongs to one `ClientConfig`, i.e. to one workload certificate; the
//! entry holds that `Arc`, so the key (its address) cannot be reused by another identity's
//! configuration while tunnels of this one are kept. A renewed certificate is a new
//! configuration and a new pool; the old one empties as its tunnels expire.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use super::tls::TlsConn;
use crate::telemetry::node as telemetry;

/// Where and how to dial, and how many to keep.
#[derive(Clone)]
pub struct Dialer {
    pub proxy_addr: SocketAddr,
    pub proxy_name: ServerName<'static>,
    pub connect_timeout: Duration,
    pub keep: usize,
}

struct Pool {
    tls: Arc<ClientConfig>,
    /// Newest last, with when it was made ready.
    ready: Vec<(TlsConn, Instant)>,
    dialling: usize,
}

thread_local! {
    static POOLS: RefCell<HashMap<usize, Pool>> = RefCell::new(HashMap::new());
}

fn key(tls: &Arc<ClientConfig>) -> usize {
    Arc::as_ptr(tls) as usize
}

fn count(result: &'static str) {
    metrics::counter!(telemetry::WARM_TUNNELS_TOTAL, "result" => result).increment(1);
}

/// A ready tunnel for this identity, if one is kept and still good (shared: both relay
/// directions use it).
pub fn take(tls: &Arc<ClientConfig>, idle: Duration) -> Option<Rc<TlsConn>> {
    let now = Instant::now();
    loop {
        let (conn, since) = POOLS.with(|p| {
            p.borrow_mut()
                .get_mut(&key(tls))
                .filter(|pool| Arc::ptr_eq(&pool.tls, tls))
                .and_then(|pool| pool.ready.pop())
        })?;
        metrics::gauge!(telemetry::WARM_TUNNELS).decrement(1.0);
        if now.duration_since(since) >= idle {
            count("expired");
            close(conn);
            continue;
        }
        if !conn.still_open() {
            // The proxy ended it (restart, its tunnel_idle_timeout) or sent an alert.
            count("stale");
            continue;
        }
        count("hit");
        return Some(Rc::new(conn));
    }
}

/// Starts background dials for this identity until `keep` are kept or on their way.
pub fn refill(tls: &Arc<ClientConfig>, d: &Arc<Dialer>) {
    if d.keep == 0 {
        return;
    }
    let missing = POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let pool = pools.entry(key(tls)).or_insert_with(|| Pool {
            tls: tls.clone(),
            ready: Vec::new(),
            dialling: 0,
        });
        let missing = d.keep.saturating_sub(pool.ready.len() + pool.dialling);
        pool.dialling += missing;
        missing
    });
    for _ in 0..missing {
        dial_one(tls, d);
    }
}

fn dial_one(tls: &Arc<ClientConfig>, d: &Arc<Dialer>) {
    let (tls, d) = (tls.clone(), d.clone());
    tokio_uring::spawn(async move {
        let dial = Box::pin(TlsConn::connect(
            d.proxy_addr,
            tls.clone(),
            d.proxy_name.clone(),
        ));
        let conn = match tokio::time::timeout(d.connect_timeout, dial).await {
            Ok(Ok(c)) => {
                handshake_done(&c);
                Some(c)
            }
            Ok(Err(e)) => {
                tracing::debug!(%e, "warm tunnel dial failed");
                count("dial_failed");
                None
            }
            Err(_) => {
                count("dial_failed");
                None
            }
        };
        let extra = POOLS.with(|p| {
            let mut pools = p.borrow_mut();
            let pool = pools.get_mut(&key(&tls))?;
            pool.dialling -= 1;
            let conn = conn?;
            if pool.ready.len() >= d.keep {
                return Some(conn);
            }
            pool.ready.push((conn, Instant::now()));
            metrics::gauge!(telemetry::WARM_TUNNELS).increment(1.0);
            None
        });
        if let Some(c) = extra {
            close(c);
        }
    });
}

/// Closes this thread's tunnels that waited longer than `idle`, every second, and forgets
/// identities with nothing kept or dialling.
pub async fn sweep(idle: Duration) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Instant::now();
        let expired: Vec<TlsConn> = POOLS.with(|p| {
            let mut pools = p.borrow_mut();
            let mut out = Vec::new();
            for pool in pools.values_mut() {
                let mut i = 0;
                while i < pool.ready.len() {
                    if now.duration_since(pool.ready[i].1) >= idle {
                        out.push(pool.ready.remove(i).0);
                    } else {
                        i += 1;
                    }
                }
            }
            pools.retain(|_, pool| !pool.ready.is_empty() || pool.dialling > 0);
            out
        });
        for c in expired {
            metrics::gauge!(telemetry::WARM_TUNNELS).decrement(1.0);
            count("expired");
            close(c);
        }
    }
}

/// Counts a finished handshake by kind: resumption (TLS 1.3 tickets) saves both sides
/// their signatures and certificate checks.
pub fn handshake_done(c: &TlsConn) {
    let kind = if c.resumed() { "resumed" } else { "full" };
    metrics::counter!(telemetry::TUNNEL_HANDSHAKES_TOTAL, "kind" => kind).increment(1);
}

/// close_notify and FIN, so the proxy ends its side at once instead of at its timeout.
fn close(conn: TlsConn) {
    tokio_uring::spawn(async move {
        conn.close_write().await;
    });
}
