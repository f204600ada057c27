//! The proxy service: terminates the nodes' mTLS tunnels, decides each session by policy,
//! logs in upstream without a password, relays, audits, and drains on SIGTERM.
//!
//! It runs on a multi-threaded tokio runtime (the proxy is a shared service whose cost is
//! dominated by TLS on both sides; work stealing balances that well).

mod cancel;
mod relay;
mod session;
mod tcp;

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
use crate::pki::{self, CertificateAuthority};
use crate::policy::Policy;
use crate::upstream::Upstreams;

pub use cancel::CancelRegistry;

/// Everything a session needs, shared by all sessions.
pub struct Shared {
    pub cfg: ProxyConfig,
    pub policy: Policy,
    pub upstreams: Upstreams,
    pub audit: AuditLog,
    pub acceptor: TlsAcceptor,
    pub cancels: CancelRegistry,
    /// Address sessions are accepted on, for the audit log.
    pub local_addr: SocketAddr,
}

/// Counts live sessions so that drain can wait for the last one.
#[derive(Default)]
struct SessionCount {
    n: AtomicUsize,
    zero: Notify,
}

struct SessionGuard(Arc<SessionCount>);

impl SessionGuard {
    fn new(c: &Arc<SessionCount>) -> Self {
        c.n.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("gateway_proxy_active_sessions").increment(1.0);
        Self(c.clone())
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        metrics::gauge!("gateway_proxy_active_sessions").decrement(1.0);
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
    let chain = pki::load_certs(&cfg.tls.cert)?;
    let key = pki::load_key(&cfg.tls.key)?;
    let client_ca = pki::load_certs(&cfg.tls.client_ca)?;
    let server = crate::tunnel::server_config(chain, key, &client_ca).context("tls settings")?;
    let db_ca = CertificateAuthority::load(&cfg.db_client_ca.cert, &cfg.db_client_ca.key)
        .context("database-client CA")?;
    let upstreams = Upstreams::new(db_ca, cfg.db_client_cert_ttl, &cfg.databases)?;
    let audit = AuditLog::open(&cfg.audit.path)
        .with_context(|| format!("failed to open audit log {}", cfg.audit.path))?;
    Ok(Shared {
        policy,
        upstreams,
        audit,
        acceptor: TlsAcceptor::from(Arc::new(server)),
        cancels: CancelRegistry::default(),
        local_addr,
        cfg,
    })
}

/// `gateway proxy`: runs until SIGTERM/SIGINT and a finished drain.
pub fn run(cfg: ProxyConfig) -> anyhow::Result<()> {
    let metrics = admin::install_metrics()?;
    let readiness = Readiness::default();
    let not_ready = readiness.block("proxy listener");
    let admin_addr = admin::spawn(cfg.admin_listen, metrics, readiness)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("proxy")
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("failed to bind proxy listen address {}", cfg.listen))?;
        let local = listener.local_addr()?;
        let shared = Arc::new(prepare(cfg, local)?);
        tracing::info!(listen = %local, admin = %admin_addr, "proxy ready");
        // Machine-readable start-up lines (the demo and the tests bind port 0 and read them).
        println!("ADMIN {admin_addr}");
        println!("LISTENING {local}");
        drop(not_ready);
        let (drain_tx, drain_rx) = watch::channel(false);
        tokio::spawn(async move {
            admin::shutdown_signal().await;
            tracing::info!("shutdown signal: draining");
            let _ = drain_tx.send(true);
        });
        serve(shared, listener, drain_rx).await;
        Ok(())
    })
}

/// Accepts until `drain` turns true, then waits for sessions up to the grace period.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, mut drain: watch::Receiver<bool>) {
    let sessions = Arc::new(SessionCount::default());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let guard = SessionGuard::new(&sessions);
                    let shared = shared.clone();
                    let drain = drain.clone();
                    tokio::spawn(async move {
                        session::handle(shared, tcp, peer, drain).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%e, "accept failed");
                    metrics::counter!("gateway_proxy_accept_errors_total").increment(1);
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
