//! Admin endpoints: `/metrics` (Prometheus), `/healthz`, `/readyz`. They run on their own
//! small tokio runtime thread, off the data plane, so a scrape never adds data-path latency.
//!
//! Readiness is a set of named guards ([`BlockReady`]): `/readyz` answers 503 naming what
//! is still pending until every guard is dropped.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds) for handshakes and set-up: 100 µs to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeSet<String>>>);

/// Keeps `/readyz` failing, naming `what`, until dropped.
pub struct BlockReady {
    readiness: Readiness,
    what: String,
}

impl Readiness {
    pub fn block(&self, what: &str) -> BlockReady {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(what.to_owned());
        BlockReady {
            readiness: self.clone(),
            what: what.to_owned(),
        }
    }

    pub fn pending(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.readiness
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.what);
    }
}

/// One unit of a gauge (active connections, sessions, waiting tunnels), held for as long
/// as this value lives, so every way out of a task gives it back.
pub struct GaugeHeld(metrics::Gauge);

impl GaugeHeld {
    pub fn new(name: &'static str) -> Self {
        let g = metrics::gauge!(name);
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for GaugeHeld {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Installs the global Prometheus recorder (once per process).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    Ok(handle)
}

/// Binds the admin listener now (so a port clash fails start-up) and serves it on a
/// dedicated thread. Returns the bound address.
pub fn spawn(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    readiness: Readiness,
) -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("failed to bind admin address {addr}: {e}"))?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(%e, "admin runtime failed to start");
                    return;
                }
            };
            rt.block_on(serve(std_listener, metrics, readiness));
        })?;
    Ok(local)
}

async fn serve(listener: std::net::TcpListener, metrics: PrometheusHandle, readiness: Readiness) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%e, "admin listener");
            return;
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = route(&req, &metrics, &readiness);
                async move { Ok::<_, Infallible>(r) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn route(
    req: &Request<Incoming>,
    metrics: &PrometheusHandle,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, metrics.render()),
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => {
            let pending = readiness.pending();
            if pending.is_empty() {
                (StatusCode::OK, "ready\n".to_owned())
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", pending.join(", ")),
                )
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Resolves on SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Open files the agent and the proxy ask for: two sockets per relayed connection (the
/// node holds the application's and the tunnel's, the proxy the tunnel's and the
/// upstream's), so 10 000 connections need 20 000 plus headroom.
const WANTED_OPEN_FILES: u64 = 1 << 20;

/// Raises the soft open-files limit to the hard one, and both to `WANTED_OPEN_FILES`
/// where allowed (root with CAP_SYS_RESOURCE, as the DaemonSet runs); the soft default of
/// 1024 would cap a node at about 500 connections. Never lowers a limit.
pub fn raise_open_files_limit() {
    let Some(mut lim) = open_files() else {
        return;
    };
    let before = lim.rlim_cur;
    if lim.rlim_max < WANTED_OPEN_FILES {
        let want = libc::rlimit {
            rlim_cur: WANTED_OPEN_FILES,
            rlim_max: WANTED_OPEN_FILES,
        };
        // SAFETY: setrlimit reads the struct; failure (no privilege) leaves limits as they were.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            tracing::debug!(before, after = WANTED_OPEN_FILES, "open files limit raised");
            return;
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above; the soft limit may always rise to the hard one.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    tracing::debug!(before, after = lim.rlim_cur, "open files limit");
}

/// The soft open-files limit of this process (what it may open now).
pub fn open_files_limit() -> u64 {
    open_files().map_or(1024, |l| l.rlim_cur)
}

fn open_files() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_guards_name_what_is_pending() {
        let r = Readiness::default();
        let a = r.block("certs loaded");
        let b = r.block("listeners bound");
        assert_eq!(r.pending(), vec!["certs loaded", "listeners bound"]);
        drop(a);
        assert_eq!(r.pending(), vec!["listeners bound"]);
        drop(b);
        assert!(r.pending().is_empty());
    }
}
