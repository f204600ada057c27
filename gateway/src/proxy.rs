//! The proxy service: terminates the nodes' mTLS tunnels, decides each session by policy,
//! logs in upstream without a password, relays, audits, and drains on SIGTERM.
//!
//! It runs one single-threaded tokio runtime per core, each accepting on its own
//! SO_REUSEPORT socket (the kernel spreads connections by 4-tuple hash), like the node's
//! data plane: a session's tasks never move between threads, so the relays' thread-local
//! buffer pools get their buffers back on the thread that lent them, and no session waits
//! for a work-stealing hand-off. (Measured on the 2-core bench machine: neutral for
//! latency and throughput against the multi-threaded runtime; see `bench/RESULTS.md`.)
//!
//! This file holds the wiring only (settings loaded, listeners, threads, drain). One tunnel
//! walks the children in this order, each importing only the ones after it:
//! - `accept`: TLS handshake, identity from the client certificate, preamble, and the one
//!   check of the node's protocol against the route's, which picks
//! - `postgres` (startup, policy, login or a kept server session, greeting, relay) or
//!   `tcp` (policy, connect, plain relay);
//! - below them: `refuse` (a refused session's answer and audit pair), `relay` (the byte
//!   relay), `cancel` (cancel keys and requests), `reuse` (kept server sessions), `limits`
//!   (sessions per identity and route), and
//!   `opened` (the tunnel state `accept` hands on).
//!
//! Metric names and their HELP text are in [`crate::telemetry::proxy`].

mod accept;
mod cancel;
mod limits;
mod opened;
mod postgres;
mod provision;
mod refuse;
mod relay;
pub mod reload;
mod reuse;
mod tcp;
#[cfg(test)]
mod testing;
mod tls_reload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, Readiness};
use crate::audit::AuditLog;
use crate::config::ProxyConfig;
use crate::policy::Policy;
use crate::telemetry::proxy::{ACCEPT_ERRORS_TOTAL, LIMIT_REFUSALS_TOTAL, OPEN_CONNECTIONS};
use crate::upstream::Upstreams;

pub use cancel::CancelRegistry;

/// Everything a session needs, shared by all sessions.
pub struct Shared {
    pub cfg: ProxyConfig,
    /// Swapped whole by a reload ([`reload`]); a session decides with the policy it loaded
    /// and keeps that decision.
    pub policy: arc_swap::ArcSwap<Policy>,
    pub upstreams: Upstreams,
    pub audit: AuditLog,
    /// The server TLS settings, swapped when their files change ([`tls_reload`]).
    pub tls: arc_swap::ArcSwap<rustls::ServerConfig>,
    pub cancels: CancelRegistry,
    /// Sessions per identity and per route (`max_sessions_per_*`).
    pub limits: Arc<limits::Limits>,
    /// Address sessions are accepted on, for the audit log.
    pub local_addr: SocketAddr,
}

impl Shared {
    /// The acceptor for a new connection, with the TLS files as they are now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.tls.load_full())
    }
}

/// Counts live connections (sessions, and tunnels still in their handshake or waiting for
/// a preamble) so that drain can wait for the last one.
#[derive(Default)]
struct SessionCount {
    n: AtomicUsize,
    zero: Notify,
}

struct SessionGuard(Arc<SessionCount>);

impl SessionGuard {
    /// Counts one more connection, unless `max` are open already (`max_connections`).
    fn new(c: &Arc<SessionCount>, max: usize) -> Option<Self> {
        c.n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        metrics::gauge!(OPEN_CONNECTIONS).increment(1.0);
        Some(Self(c.clone()))
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS).decrement(1.0);
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

/// Loads every file the configuration names, so that start-up fails with a clear message
/// instead of the first session failing.
pub fn prepare(cfg: ProxyConfig, local_addr: SocketAddr) -> anyhow::Result<Shared> {
    let policy = Policy::compile(&cfg.roles, &cfg.databases)
        .map_err(|e| anyhow::anyhow!("invalid policy: {e}"))?;
    let server = tls_reload::server_config(&cfg)?;
    let db_ca = tls_reload::db_client_ca(&cfg)?;
    let upstreams = Upstreams::new(db_ca, cfg.db_client_cert_ttl, &cfg.databases)?;
    let audit = AuditLog::from_config(&cfg.audit)
        .with_context(|| format!("failed to open audit log {}", cfg.audit.path))?;
    Ok(Shared {
        policy: arc_swap::ArcSwap::from_pointee(policy),
        upstreams,
        audit,
        tls: arc_swap::ArcSwap::from_pointee(server),
        cancels: CancelRegistry::for_replica(cfg.replica_index),
        limits: limits::Limits::new(cfg.max_sessions_per_identity, cfg.max_sessions_per_route),
        local_addr,
        cfg,
    })
}

/// `gateway proxy`: runs until SIGTERM/SIGINT and a finished drain.
pub fn run(cfg: ProxyConfig, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let metrics = admin::install_metrics()?;
    crate::telemetry::proxy::describe();
    let readiness = Readiness::default();
    let not_ready = readiness.block("proxy listener");
    let admin_addr = admin::spawn(cfg.admin_listen, metrics, readiness)?;
    let threads = match cfg.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    // Every socket is bound before anything starts, so a bad address fails start-up; a
    // port of 0 is fixed by the first socket and shared by the others.
    let mut sockets = Vec::with_capacity(threads);
    let mut addr = cfg.listen;
    for _ in 0..threads {
        let s = crate::net::reuseport_listener(addr, 4096)
            .with_context(|| format!("failed to bind proxy listen address {addr}"))?;
        // tokio registers it with epoll: it must not block.
        s.set_nonblocking(true)?;
        addr = s.local_addr()?;
        sockets.push(s);
    }
    let shared = Arc::new(prepare(cfg, addr)?);
    let sessions = Arc::new(SessionCount::default());
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut workers = Vec::new();
    let mut sockets = sockets.into_iter();
    let own = sockets.next().context("no proxy listener")?;
    for (t, sock) in sockets.enumerate() {
        let (shared, sessions, drain) = (shared.clone(), sessions.clone(), drain_rx.clone());
        workers.push(
            std::thread::Builder::new()
                .name(format!("proxy-{}", t + 1))
                .spawn(move || serve_on_thread(shared, sock, sessions, drain))?,
        );
    }
    tracing::info!(listen = %addr, admin = %admin_addr, threads, "proxy ready");
    // Machine-readable start-up lines (the demo and the tests bind port 0 and read them).
    println!("ADMIN {admin_addr}");
    println!("LISTENING {addr}");
    drop(not_ready);
    let watched = shared.clone();
    let signal = std::thread::Builder::new()
        .name("proxy-signal".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.spawn(tls_reload::watch(watched.clone()));
            match config_path {
                Some(path) => rt.block_on(reload::watch(watched, path, admin::shutdown_signal())),
                None => rt.block_on(admin::shutdown_signal()),
            }
            tracing::info!("shutdown signal: draining");
            let _ = drain_tx.send(true);
            anyhow::Ok(())
        })?;
    let served = serve_on_thread(shared.clone(), own, sessions, drain_rx);
    for w in workers {
        let _ = w.join();
    }
    // Every runtime is gone, so no session task runs any more: sessions the grace period
    // cut get their end record here, and the writer's queue is written before exit.
    let cut = shared
        .audit
        .close_open("ended by proxy shutdown: the drain grace period elapsed");
    if cut > 0 {
        tracing::warn!(
            sessions = cut,
            "sessions ended by shutdown after drain_grace"
        );
    }
    served?;
    let _ = signal.join();
    Ok(())
}

/// One proxy thread: a single-threaded runtime serving its own listener until drain ends.
fn serve_on_thread(
    shared: Arc<Shared>,
    sock: std::net::TcpListener,
    sessions: Arc<SessionCount>,
    drain: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // I/O and timers only: the process driver's orphan reaping ran at every park (1 % of
    // the proxy's samples in a round-trip profile) and signals have their own thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(sock)?;
        serve(shared, listener, sessions, drain).await;
        anyhow::Ok(())
    })
}

/// Accepts until `drain` turns true, then waits for the sessions of every thread up to the
/// grace period.
async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    sessions: Arc<SessionCount>,
    mut drain: watch::Receiver<bool>,
) {
    // This thread's kept server sessions (`upstream.reuse`): expired ones closed, all of
    // them on drain.
    tokio::spawn(reuse::sweep(drain.clone()));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Past the cap the connection is closed at once: no task, no TLS
                    // state, so peers that never finish cannot grow the process.
                    let Some(guard) = SessionGuard::new(&sessions, shared.cfg.max_connections) else {
                        metrics::counter!(LIMIT_REFUSALS_TOTAL, "reason" => "max_connections").increment(1);
                        tracing::debug!(%peer, "connection refused: max_connections");
                        drop(tcp);
                        continue;
                    };
                    let shared = shared.clone();
                    let drain = drain.clone();
                    tokio::spawn(async move {
                        accept::handle(shared, tcp, peer, drain).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%e, "accept failed");
                    metrics::counter!(ACCEPT_ERRORS_TOTAL).increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = drain.changed() => break,
        }
    }
    drop(listener);
    let grace = shared.cfg.drain_grace;
    let left = sessions.n.load(Ordering::SeqCst);
    tracing::info!(
        sessions = left,
        ?grace,
        "listener closed, draining sessions"
    );
    let all_done = async {
        loop {
            let notified = sessions.zero.notified();
            if sessions.n.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
    };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        tracing::warn!(
            sessions = sessions.n.load(Ordering::SeqCst),
            "drain grace period over, closing remaining sessions"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_08_connections_are_capped_per_process() {
        let count = Arc::new(SessionCount::default());
        let held: Vec<SessionGuard> = (0..3)
            .filter_map(|_| SessionGuard::new(&count, 3))
            .collect();
        assert_eq!(held.len(), 3);
        assert!(
            SessionGuard::new(&count, 3).is_none(),
            "past max_connections"
        );
        drop(held);
        assert_eq!(count.n.load(Ordering::SeqCst), 0);
        assert!(SessionGuard::new(&count, 3).is_some());
    }
}
