//! Workload certificates for transparent connections, by identity. The data plane only
//! reads the cache ([`Certificates::config_for`]): a hit is a read lock and an `Arc` clone.
//! On a miss, or an entry in its last second ([`SERVE_MARGIN`]), the connection sends a
//! request over a channel to the [`Fetcher`], which runs on the node's
//! control runtime (tokio): it makes the key and CSR, asks the CA over HTTPS, checks that
//! the CA issued the identity the node resolved, fills the cache and answers the waiting
//! connection through a oneshot. So no CA call, key generation or blocking lock ever runs
//! on an io_uring thread.
//!
//! One fetch per identity at a time (single flight): connections that miss while a fetch
//! for their identity is on its way wait for that one, so a burst of connects from a new
//! pod makes one CA request. Every CA request is bounded by the configured timeout
//! (`interception.ca.timeout`): a stuck CA fails the waiting connections, it never holds
//! them.
//!
//! The fetcher then keeps each identity it fetched renewed at about half-life (±10 %, so
//! the certificates of many pods fetched together do not come due together) in the
//! background (retrying with backoff until the certificate expires; readiness degraded from
//! three quarters of its life), so connections keep finding the cache fresh, and a CA that
//! is down past the renewal time does not stop new sessions before the certificate ends.
//! Open sessions keep the configuration they started with.
//!
//! Revocation by deletion: once the pod a certificate was fetched for is gone from the
//! node's pod directory, its key and certificate are dropped (checked every
//! [`POD_CHECK_EVERY`]) and no longer renewed; another pod of the same identity fetches its
//! own on its next connection.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};

use crate::admin::{BlockReady, Readiness};
use crate::ca::client::{CaClient, ClientError};
use crate::identity::Workload;
use crate::pki::SpiffeId;
use crate::pod::PodDirectory;
use crate::telemetry::node as telemetry;

/// A certificate is not handed to a new connection in its last second: the tunnel's
/// handshake must still find it valid at the proxy.
pub(super) const SERVE_MARGIN: Duration = Duration::from_secs(1);
/// Least wait between renewal attempts near a certificate's end.
const MIN_RETRY: Duration = Duration::from_millis(100);
/// First wait after a failed background renewal; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest wait between background renewal attempts (DESIGN.md: backoff at most 150 s).
const MAX_RETRY: Duration = Duration::from_secs(150);
/// How often a renewal loop looks whether its certificate is still wanted (its pod still
/// on the node).
const POD_CHECK_EVERY: Duration = Duration::from_secs(2);

/// When a certificate valid from `now` until `expiry` is renewed: at about half its life,
/// ±10 %.
pub(super) fn renew_at(now: SystemTime, expiry: SystemTime) -> SystemTime {
    let life = expiry.duration_since(now).unwrap_or_default();
    now + life.mul_f64(0.5 * (0.9 + rand::random::<f64>() * 0.2))
}

/// Why no certificate: the text after `no workload certificate for <id>: ` in the client's
/// error.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{0}")]
    Ca(#[from] ClientError),
    /// The CA and this node disagree about the pod: trust neither.
    #[error("the CA issued {0} instead")]
    WrongIdentity(SpiffeId),
    #[error("{0}")]
    Config(#[from] crate::tunnel::TunnelError),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the node agent's certificate task is not running")]
    ControlGone,
    /// One fetch's failure, told to every connection that waited for it.
    #[error(transparent)]
    Shared(Arc<CertificateError>),
}

struct Entry {
    /// Connections take the certificate until then ([`SERVE_MARGIN`] before its end);
    /// renewing it is the background task's job, so a CA that is down past the renewal
    /// time leaves new sessions working.
    usable_until: SystemTime,
    config: Arc<ClientConfig>,
}

type Cache = Arc<RwLock<HashMap<SpiffeId, Entry>>>;

type Reply = oneshot::Sender<Result<Arc<ClientConfig>, Arc<CertificateError>>>;

struct Request {
    spiffe_id: SpiffeId,
    pod_uid: Option<String>,
    reply: Reply,
}

/// The data plane's side: the cache and the way to ask for a fetch.
pub struct Certificates {
    cache: Cache,
    requests: mpsc::UnboundedSender<Request>,
}

/// The control runtime's side: fetches what connections ask for, and renews it.
pub struct Fetcher {
    requests: mpsc::UnboundedReceiver<Request>,
    control: Arc<Control>,
    /// The file the proxy CA bundle came from, watched for changes ([`Fetcher::watch_bundle`]).
    bundle: Option<PathBuf>,
}

/// What the fetcher's tasks share (on the control runtime only).
struct Control {
    cache: Cache,
    ca: CaClient,
    /// Bound of one CA request.
    ca_timeout: Duration,
    /// Replaced when its file changes (a CA root rotation's overlap bundle).
    proxy_ca: RwLock<Vec<CertificateDer<'static>>>,
    /// The node's pods: a certificate whose pod is gone is dropped, not renewed.
    pods: Option<Arc<dyn PodDirectory>>,
    /// Identities being fetched, with the connections waiting for each (single flight).
    /// Locked only on the control runtime, never across an await.
    inflight: Mutex<HashMap<SpiffeId, Vec<Reply>>>,
    /// Degraded while a certificate goes unrenewed past three quarters of its life.
    readiness: Option<Readiness>,
}

/// A certificate just fetched and cached (`C`: the rustls config built on it), in this cache
/// and in `server_certificates`'.
pub(super) struct Fetched<C> {
    pub(super) config: Arc<C>,
    pub(super) renew_at: SystemTime,
    pub(super) expiry: SystemTime,
}

impl Certificates {
    /// The cache, and the fetcher to run on the control runtime ([`Fetcher::run`]); each CA
    /// request may take at most `ca_timeout`. With `pods`, certificates of pods that leave
    /// it are dropped.
    pub fn new(
        ca: CaClient,
        ca_timeout: Duration,
        proxy_ca: Vec<CertificateDer<'static>>,
        pods: Option<Arc<dyn PodDirectory>>,
        readiness: Option<Readiness>,
    ) -> (Self, Fetcher) {
        let cache = Cache::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let fetcher = Fetcher {
            requests: rx,
            control: Arc::new(Control {
                cache: cache.clone(),
                ca,
                ca_timeout,
                proxy_ca: RwLock::new(proxy_ca),
                pods,
                inflight: Mutex::default(),
                readiness,
            }),
            bundle: None,
        };
        (
            Self {
                cache,
                requests: tx,
            },
            fetcher,
        )
    }

    /// The client configuration of workload `w`: from the cache, or fetched on the control
    /// runtime while this connection waits.
    pub async fn config_for(&self, w: &Workload) -> Result<Arc<ClientConfig>, CertificateError> {
        if let Some(c) = cached(&self.cache, &w.spiffe_id, SystemTime::now()) {
            return Ok(c);
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                spiffe_id: w.spiffe_id.clone(),
                pod_uid: w.pod.uid.clone(),
                reply,
            })
            .map_err(|_| CertificateError::ControlGone)?;
        answer
            .await
            .map_err(|_| CertificateError::ControlGone)?
            // The only waiter gets the error itself; several share it.
            .map_err(|e| Arc::try_unwrap(e).unwrap_or_else(CertificateError::Shared))
    }
}

fn cached(cache: &Cache, id: &SpiffeId, now: SystemTime) -> Option<Arc<ClientConfig>> {
    let cache = cache.read().unwrap_or_else(|e| e.into_inner());
    cache
        .get(id)
        .filter(|e| now < e.usable_until)
        .map(|e| e.config.clone())
}

impl Fetcher {
    /// Watches `path` (where the proxy CA bundle was read from) while [`Fetcher::run`] runs.
    pub fn watch_bundle(mut self, path: PathBuf) -> Self {
        self.bundle = Some(path);
        self
    }

    /// Serves requests until every [`Certificates`] handle is gone. Must run on a tokio
    /// runtime (the CA client is hyper over tokio); each request is fetched in a task of its
    /// own, so a slow CA answer for one pod does not hold up another, and that task then
    /// keeps the identity renewed.
    pub async fn run(mut self) {
        let export = tokio::spawn(self.control.clone().export_expiry());
        self.watch_and_serve().await;
        export.abort();
    }

    async fn watch_and_serve(&mut self) {
        if let Some(path) = self.bundle.take() {
            let watch = tokio::spawn(self.control.clone().watch_bundle(path));
            self.serve().await;
            watch.abort();
        } else {
            self.serve().await;
        }
    }

    async fn serve(&mut self) {
        while let Some(req) = self.requests.recv().await {
            let Request {
                spiffe_id,
                pod_uid,
                reply,
            } = req;
            // Another connection's request may have filled it while this one waited in
            // the queue.
            if let Some(c) = cached(&self.control.cache, &spiffe_id, SystemTime::now()) {
                let _ = reply.send(Ok(c));
                continue;
            }
            {
                let mut inflight = self
                    .control
                    .inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(waiting) = inflight.get_mut(&spiffe_id) {
                    waiting.push(reply);
                    continue;
                }
                inflight.insert(spiffe_id.clone(), vec![reply]);
            }
            let control = self.control.clone();
            tokio::spawn(async move {
                let r = control.fetch(&spiffe_id, pod_uid.as_deref()).await;
                let waiting = control
                    .inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&spiffe_id)
                    .unwrap_or_default();
                match r {
                    Ok(f) => {
                        // Connections may have given up meanwhile; the cache keeps it.
                        for reply in waiting {
                            let _ = reply.send(Ok(f.config.clone()));
                        }
                        control
                            .keep_renewed(&spiffe_id, pod_uid.as_deref(), f)
                            .await;
                    }
                    Err(e) => {
                        // The last waiter gets the error itself, not a copy of the pointer,
                        // so a lone waiter can unwrap it.
                        let mut e = Some(Arc::new(e));
                        let last = waiting.len().saturating_sub(1);
                        for (k, reply) in waiting.into_iter().enumerate() {
                            let shared = if k == last { e.take() } else { e.clone() };
                            if let Some(shared) = shared {
                                let _ = reply.send(Err(shared));
                            }
                        }
                    }
                }
            });
        }
    }
}

impl Control {
    /// Keeps `gateway_node_workload_certificate_expiry_timestamp_seconds` at the soonest end
    /// of the cached certificates (looked at every [`POD_CHECK_EVERY`]).
    async fn export_expiry(self: Arc<Self>) {
        loop {
            let soonest = self
                .cache
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|e| e.usable_until + SERVE_MARGIN)
                .min();
            let secs = soonest
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!(telemetry::WORKLOAD_CERTIFICATE_EXPIRY).set(secs);
            tokio::time::sleep(POD_CHECK_EVERY).await;
        }
    }

    /// Reloads the proxy CA bundle when its file changes (checked every
    /// [`POD_CHECK_EVERY`]): during a CA root rotation the bundle gains the new root, then
    /// loses the old one. The cache is emptied, so new connections fetch certificates whose
    /// client settings trust the new bundle (open sessions keep theirs). A file that does
    /// not load, or holds no certificate, leaves the bundle as it was.
    async fn watch_bundle(self: Arc<Self>, path: PathBuf) {
        let mut stamps = crate::pki::watch::Stamps::new(vec![path.clone()]);
        loop {
            tokio::time::sleep(POD_CHECK_EVERY).await;
            if !stamps.changed() {
                continue;
            }
            let r = crate::pki::load_certs(&path).map(|roots| {
                *self.proxy_ca.write().unwrap_or_else(|e| e.into_inner()) = roots;
                self.cache
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
            });
            super::node_certificate::counted("proxy.ca", &path, r.map_err(Into::into));
        }
    }

    /// Asks the CA for `id`'s certificate and caches it.
    async fn fetch(
        &self,
        id: &SpiffeId,
        pod_uid: Option<&str>,
    ) -> Result<Fetched<ClientConfig>, CertificateError> {
        let r = tokio::time::timeout(self.ca_timeout, self.try_fetch(id, pod_uid))
            .await
            .unwrap_or(Err(CertificateError::Timeout(self.ca_timeout)));
        if let Err(e) = &r {
            metrics::counter!(telemetry::CERTIFICATE_FAILURES_TOTAL).increment(1);
            tracing::info!(spiffe_id = %id, %e, "no workload certificate");
        }
        r
    }

    async fn try_fetch(
        &self,
        id: &SpiffeId,
        pod_uid: Option<&str>,
    ) -> Result<Fetched<ClientConfig>, CertificateError> {
        let now = SystemTime::now();
        let issued = self.ca.workload_certificate(pod_uid).await?;
        if issued.spiffe_id != *id {
            return Err(CertificateError::WrongIdentity(issued.spiffe_id));
        }
        let not_after = x509_parser::parse_x509_certificate(&issued.chain[0])
            .map(|(_, c)| c.validity().not_after.timestamp())
            .unwrap_or(0);
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
        let renew_at = renew_at(now, expiry);
        let config = Arc::new(crate::tunnel::client_config(
            issued.chain,
            issued.key,
            &self.proxy_ca.read().unwrap_or_else(|e| e.into_inner()),
        )?);
        metrics::counter!(telemetry::CERTIFICATES_FETCHED_TOTAL).increment(1);
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.clone(),
                Entry {
                    usable_until: expiry - SERVE_MARGIN,
                    config: config.clone(),
                },
            );
        Ok(Fetched {
            config,
            renew_at,
            expiry,
        })
    }

    /// Renews `id` at half-life for as long as `f` (then each renewal) is the cached entry
    /// ([`keep_renewed`]) and its pod is on the node.
    async fn keep_renewed(&self, id: &SpiffeId, pod_uid: Option<&str>, f: Fetched<ClientConfig>) {
        let degraded = self
            .readiness
            .as_ref()
            .map(|r| (r, format!("workload certificate for {id}")));
        keep_renewed(
            f,
            degraded,
            |config| self.is_cached(id, config) && !self.drop_if_pod_gone(id, pod_uid, config),
            move || self.fetch(id, pod_uid),
            |config| {
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                if cache
                    .get(id)
                    .is_some_and(|e| Arc::ptr_eq(&e.config, config))
                {
                    cache.remove(id);
                }
            },
        )
        .await;
    }

    /// Drops `config` (if it is still `id`'s entry) when the pod it was fetched for has
    /// left the node's pod directory; returns whether it did.
    fn drop_if_pod_gone(
        &self,
        id: &SpiffeId,
        pod_uid: Option<&str>,
        config: &Arc<ClientConfig>,
    ) -> bool {
        let (Some(pods), Some(uid)) = (&self.pods, pod_uid) else {
            return false;
        };
        if pods.pod(uid).is_some() {
            return false;
        }
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache
            .get(id)
            .is_some_and(|e| Arc::ptr_eq(&e.config, config))
        {
            cache.remove(id);
        }
        tracing::info!(spiffe_id = %id, pod_uid = uid, "pod gone: dropped its workload certificate and key");
        true
    }

    fn is_cached(&self, id: &SpiffeId, config: &Arc<ClientConfig>) -> bool {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache
            .get(id)
            .is_some_and(|e| Arc::ptr_eq(&e.config, config))
    }
}

/// The renewal loop of both certificate caches: sleeps until `f.renew_at`, then fetches a
/// replacement for as long as `is_current` says `f` (then each renewal) is still wanted:
/// the cached entry (another fetch that replaced it keeps its own renewal), and for
/// workload certificates, of a pod still on the node. It is asked every
/// [`POD_CHECK_EVERY`] while the loop waits, too. A failed fetch is retried after
/// [`FIRST_RETRY`], doubling up to [`MAX_RETRY`] but never waiting past half the time left,
/// so a CA that comes back before the end is used; from three quarters of the life on,
/// `degraded` (readiness, and what to call the certificate) says so. At the end it calls
/// `expired` (which drops the entry if it is still this one, so the next connection asks
/// again). Until then connections keep taking the certificate from the cache.
pub(super) async fn keep_renewed<C, E, Fut>(
    mut f: Fetched<C>,
    degraded: Option<(&Readiness, String)>,
    is_current: impl Fn(&Arc<C>) -> bool,
    mut fetch: impl FnMut() -> Fut,
    expired: impl FnOnce(&Arc<C>),
) where
    Fut: std::future::Future<Output = Result<Fetched<C>, E>>,
{
    // Held while renewals fail past three quarters of the certificate's life: `/readyz`
    // says so before the certificate ends, while it still serves.
    let mut blocked: Option<BlockReady> = None;
    loop {
        while SystemTime::now() < f.renew_at {
            tokio::time::sleep(until(f.renew_at).min(POD_CHECK_EVERY)).await;
            if !is_current(&f.config) {
                return;
            }
        }
        let mut retry = FIRST_RETRY;
        loop {
            if !is_current(&f.config) {
                return;
            }
            match fetch().await {
                Ok(next) => {
                    f = next;
                    blocked = None;
                    break;
                }
                Err(_) => {
                    let now = SystemTime::now();
                    if now >= f.expiry {
                        // It served until its end; the next connection asks the CA again
                        // (and readiness is no longer about this one).
                        expired(&f.config);
                        return;
                    }
                    // Half-way from the renewal time to the end: three quarters of the life.
                    let degraded_at =
                        f.renew_at + f.expiry.duration_since(f.renew_at).unwrap_or_default() / 2;
                    if let (None, Some((readiness, what))) = (&blocked, &degraded)
                        && now >= degraded_at
                    {
                        let expires = humantime::format_rfc3339_seconds(f.expiry);
                        tracing::error!(%expires, "{what} not renewed: readiness degraded");
                        blocked = Some(
                            readiness
                                .block(&format!("degraded: {what} not renewed, expires {expires}")),
                        );
                    }
                    // Backoff, but never past half the time left (a CA back shortly before
                    // the end is still used), and awake in time to say "degraded".
                    let mut wait = retry.min(until(f.expiry) / 2);
                    if blocked.is_none() && degraded.is_some() && now < degraded_at {
                        wait = wait.min(until(degraded_at));
                    }
                    tokio::time::sleep(wait.max(MIN_RETRY)).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
    }
}

/// How long until `t` (zero once it passed).
fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls_pki_types::ServerName;
    use rustls_pki_types::pem::PemObject;

    use crate::ca::service::{CaService, serve};
    use crate::pki::{self, CertificateAuthority, LeafSpec};
    use crate::pod::PodMeta;
    use crate::pod::{HostIdentity, Pod, PodDirectory};

    const TD: &str = "td";
    const NODE: &str = "node-1";
    const HOUR: Duration = Duration::from_secs(3600);

    /// One pod on this node, `team-a/api`; counts the CA's lookups (one per issued
    /// certificate request).
    struct Pods(Arc<AtomicUsize>);

    /// `team-a/api` on this node, as `uid-1`; no other pod.
    fn api_pod(uid: &str) -> Option<Pod> {
        (uid == "uid-1").then(|| Pod {
            uid: uid.into(),
            namespace: "team-a".into(),
            service_account: "api".into(),
            name: "api-0".into(),
            node: NODE.into(),
            labels: Default::default(),
            host_network: false,
            containers: None,
        })
    }

    impl PodDirectory for Pods {
        fn pod(&self, uid: &str) -> Option<Pod> {
            self.0.fetch_add(1, Ordering::SeqCst);
            api_pod(uid)
        }
        fn host(&self) -> Option<&HostIdentity> {
            None
        }
    }

    fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn pem_key(pem: &str) -> rustls_pki_types::PrivateKeyDer<'static> {
        rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// A real CA service on loopback and a fetcher, both on a control thread of their own
    /// (as in the node); returns the data plane's handle and the CA's lookup count.
    fn start(name: &str, ttl: Duration) -> (Certificates, Arc<AtomicUsize>) {
        start_with(name, ttl, None, None)
    }

    /// [`start`], with the node's own pod directory.
    fn start_with(
        name: &str,
        ttl: Duration,
        pods: Option<Arc<dyn PodDirectory>>,
        bundle: Option<PathBuf>,
    ) -> (Certificates, Arc<AtomicUsize>) {
        let dir = std::env::temp_dir().join(format!("dbgw-certs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        pki::init_ca(&dir, TD).unwrap();
        let ca = CertificateAuthority::load(
            &dir.join(pki::WORKLOAD_CA_CERT),
            &dir.join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        let roots = pem_certs(ca.cert_pem());
        let (server_pem, server_key) = ca
            .issue(&LeafSpec::server(vec!["gateway-ca".into()], vec![]), HOUR)
            .unwrap();
        let (node_pem, node_key) = ca.issue(&LeafSpec::node(TD, NODE), HOUR).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let server_tls =
            crate::tunnel::server_config(pem_certs(&server_pem), pem_key(&server_key), &roots)
                .unwrap();
        let node_tls =
            crate::tunnel::client_config(pem_certs(&node_pem), pem_key(&node_key), &roots).unwrap();
        let lookups = Arc::new(AtomicUsize::new(0));
        let svc = Arc::new(CaService {
            ca: Arc::new(arc_swap::ArcSwap::from_pointee(ca)),
            trust_domain: TD.into(),
            ttl,
            pods: Box::new(Pods(lookups.clone())),
            server_names: crate::ca::server_names::ServerNames::parse("127.0.0.0/8,db.test")
                .unwrap(),
            limits: crate::ca::rate_limit::NodeLimits::new(1000.0, 1000),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = CaClient {
            addr: addr.to_string(),
            server_name: ServerName::try_from("gateway-ca").unwrap(),
            tls: Arc::new(node_tls),
        };
        let (certs, fetcher) =
            Certificates::new(client, Duration::from_secs(10), roots, pods, None);
        let fetcher = match bundle {
            Some(b) => fetcher.watch_bundle(b),
            None => fetcher,
        };
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::spawn(serve(
                    svc,
                    listener,
                    Arc::new(arc_swap::ArcSwap::from_pointee(server_tls)),
                ));
                fetcher.run().await;
            });
        });
        (certs, lookups)
    }

    fn workload(id: SpiffeId, uid: &str) -> Workload {
        Workload {
            spiffe_id: id,
            pod: PodMeta {
                uid: Some(uid.into()),
                ..PodMeta::default()
            },
            labels: Default::default(),
        }
    }

    fn api() -> SpiffeId {
        SpiffeId::new(TD, "team-a", "api")
    }

    #[test]
    fn readiness_degrades_before_an_unrenewed_certificate_ends() {
        let readiness = Readiness::default();
        let now = SystemTime::now();
        let f = Fetched {
            config: Arc::new(()),
            renew_at: now,
            expiry: now + Duration::from_secs(3),
        };
        let ended = std::sync::atomic::AtomicBool::new(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let renewal = keep_renewed(
                f,
                Some((&readiness, "workload certificate for x".to_owned())),
                |_| true,
                || async { Err::<Fetched<()>, _>("the CA is down") },
                |_| ended.store(true, std::sync::atomic::Ordering::SeqCst),
            );
            let watch = async {
                // Renewal was due at half-life (now), so three quarters of the life is
                // half-way to the end: 1.5 s from now.
                tokio::time::sleep(Duration::from_millis(1000)).await;
                let early = readiness.pending();
                tokio::time::sleep(Duration::from_millis(1000)).await;
                (
                    early,
                    readiness.pending(),
                    ended.load(std::sync::atomic::Ordering::SeqCst),
                )
            };
            let ((early, late, ended_late), ()) = tokio::join!(watch, renewal);
            assert!(early.is_empty(), "{early:?}");
            assert_eq!(late.len(), 1, "{late:?}");
            assert!(
                late[0].starts_with("degraded: workload certificate for x not renewed, expires"),
                "{late:?}"
            );
            assert!(!ended_late, "still serving at 2 s");
        });
        assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            readiness.pending().is_empty(),
            "the certificate is gone, and so is its state"
        );
    }

    #[test]
    fn hits_the_cache_and_fetches_again_at_its_end() {
        let (certs, lookups) = start("renew", Duration::from_secs(600));
        // The data plane's side runs on an io_uring thread, as in the node.
        tokio_uring::start(async {
            let w = workload(api(), "uid-1");
            let first = certs.config_for(&w).await.unwrap();
            assert_eq!(lookups.load(Ordering::SeqCst), 1);
            let again = certs.config_for(&w).await.unwrap();
            assert!(Arc::ptr_eq(&first, &again), "a hit is the cached config");
            assert_eq!(lookups.load(Ordering::SeqCst), 1, "a hit asks no CA");
            {
                let cache = certs.cache.read().unwrap();
                let e = &cache[&api()];
                let left = e.usable_until.duration_since(SystemTime::now()).unwrap();
                // 600 s certificates serve connections until a second before their end.
                assert!(
                    left > Duration::from_secs(595) && left <= Duration::from_secs(600),
                    "{left:?}"
                );
            }
            // At its end: the next connection waits for a fresh certificate.
            certs
                .cache
                .write()
                .unwrap()
                .get_mut(&api())
                .unwrap()
                .usable_until = SystemTime::now() - Duration::from_secs(1);
            let renewed = certs.config_for(&w).await.unwrap();
            assert_eq!(lookups.load(Ordering::SeqCst), 2);
            assert!(!Arc::ptr_eq(&first, &renewed), "a new certificate");
            let cached = certs.config_for(&w).await.unwrap();
            assert!(Arc::ptr_eq(&renewed, &cached));
        });
    }

    #[test]
    fn renews_in_the_background_at_half_life() {
        // 4 s certificates: renewed after about 2 s with no connection asking.
        let (certs, lookups) = start("background", Duration::from_secs(4));
        let first = tokio_uring::start(certs.config_for(&workload(api(), "uid-1"))).unwrap();
        assert_eq!(lookups.load(Ordering::SeqCst), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lookups.load(Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline, "no renewal");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The renewed certificate replaces the first in the cache (give the insert a moment).
        std::thread::sleep(Duration::from_millis(200));
        let now = cached(&certs.cache, &api(), SystemTime::now()).expect("a fresh entry");
        assert!(
            !Arc::ptr_eq(&first, &now),
            "the cache holds the renewed certificate"
        );
    }

    /// The node's view of its pods: `uid-1` until `gone` is set.
    struct NodePods(Arc<std::sync::atomic::AtomicBool>);

    impl PodDirectory for NodePods {
        fn pod(&self, uid: &str) -> Option<Pod> {
            api_pod(uid).filter(|_| !self.0.load(Ordering::SeqCst))
        }
        fn host(&self) -> Option<&HostIdentity> {
            None
        }
    }

    /// Revocation by deletion: once the pod is gone from the node's directory, its
    /// certificate and key leave the cache within a check interval, long before renewal,
    /// and the CA is not asked again.
    #[test]
    fn a_deleted_pods_certificate_is_dropped_and_not_renewed() {
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pods: Arc<dyn PodDirectory> = Arc::new(NodePods(gone.clone()));
        let (certs, lookups) = start_with("deleted", HOUR, Some(pods), None);
        tokio_uring::start(certs.config_for(&workload(api(), "uid-1"))).unwrap();
        assert!(cached(&certs.cache, &api(), SystemTime::now()).is_some());
        std::thread::sleep(POD_CHECK_EVERY + Duration::from_millis(500));
        assert!(
            cached(&certs.cache, &api(), SystemTime::now()).is_some(),
            "kept while the pod runs"
        );
        gone.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + POD_CHECK_EVERY * 3;
        while cached(&certs.cache, &api(), SystemTime::now()).is_some() {
            assert!(std::time::Instant::now() < deadline, "still cached");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(lookups.load(Ordering::SeqCst), 1, "no renewal");
    }

    /// A CA root rotation's overlap: the proxy CA bundle gains a root; the node empties its
    /// cache and fetches again with the new bundle; a bundle that does not load changes
    /// nothing.
    #[test]
    fn a_changed_proxy_bundle_is_reloaded_and_a_broken_one_ignored() {
        let dir = std::env::temp_dir().join(format!("dbgw-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bundle = dir.join("proxy-ca.pem");
        pki::init_ca(&dir.join("old"), TD).unwrap();
        pki::init_ca(&dir.join("new"), TD).unwrap();
        let root =
            |d: &str| std::fs::read_to_string(dir.join(d).join(pki::WORKLOAD_CA_CERT)).unwrap();
        std::fs::write(&bundle, root("old")).unwrap();
        let (certs, lookups) = start_with("bundle", HOUR, None, Some(bundle.clone()));
        let w = workload(api(), "uid-1");
        tokio_uring::start(certs.config_for(&w)).unwrap();
        let wait_empty = || {
            let deadline = std::time::Instant::now() + POD_CHECK_EVERY * 3;
            while cached(&certs.cache, &api(), SystemTime::now()).is_some() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cache was not emptied"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        // Broken: nothing changes.
        std::fs::write(&bundle, "not a certificate\n").unwrap();
        std::thread::sleep(POD_CHECK_EVERY * 2);
        assert!(cached(&certs.cache, &api(), SystemTime::now()).is_some());
        // Both roots: reloaded, fetched again on the next connection.
        std::fs::write(&bundle, root("old") + &root("new")).unwrap();
        wait_empty();
        tokio_uring::start(certs.config_for(&w)).unwrap();
        assert_eq!(lookups.load(Ordering::SeqCst), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_certificate_for_another_identity_and_caches_no_failure() {
        let (certs, lookups) = start("mismatch", HOUR);
        tokio_uring::start(async {
            // The node resolved the pod to team-b/db, the CA knows it as team-a/api.
            let w = workload(SpiffeId::new(TD, "team-b", "db"), "uid-1");
            let e = certs.config_for(&w).await.unwrap_err();
            assert!(
                matches!(&e, CertificateError::WrongIdentity(id) if *id == api()),
                "{e:?}"
            );
            assert_eq!(
                e.to_string(),
                "the CA issued spiffe://td/ns/team-a/sa/api instead"
            );
            assert!(certs.cache.read().unwrap().is_empty());
            // A pod the CA does not know: its refusal comes back as the reason.
            let e = certs
                .config_for(&workload(api(), "uid-9"))
                .await
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "CA refused: pod uid-9 is not known to the CA"
            );
            // Nothing cached: the next attempt asks the CA again.
            certs.config_for(&w).await.unwrap_err();
            assert_eq!(lookups.load(Ordering::SeqCst), 3);
        });
    }

    #[test]
    fn without_the_control_task_a_connection_is_refused_not_stuck() {
        let (certs, fetcher) = Certificates::new(
            CaClient {
                addr: "127.0.0.1:9".into(),
                server_name: ServerName::try_from("gateway-ca").unwrap(),
                tls: Arc::new(
                    rustls::ClientConfig::builder_with_provider(crate::tunnel::crypto_provider())
                        .with_safe_default_protocol_versions()
                        .unwrap()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                ),
            },
            Duration::from_secs(10),
            Vec::new(),
            None,
            None,
        );
        drop(fetcher);
        tokio_uring::start(async {
            let e = certs
                .config_for(&workload(api(), "uid-1"))
                .await
                .unwrap_err();
            assert!(matches!(e, CertificateError::ControlGone), "{e:?}");
        });
    }

    /// Issue 18 item 9: a burst of connections of one identity that all miss the cache
    /// makes one CA request (single flight), and all of them get its certificate.
    #[test]
    fn hardening_09_concurrent_misses_of_one_identity_make_one_ca_request() {
        let (certs, lookups) = start("single-flight", HOUR);
        tokio_uring::start(async {
            let w = workload(api(), "uid-1");
            let burst = (0..50).map(|_| certs.config_for(&w));
            let got = futures_util::future::join_all(burst).await;
            let first = got[0].as_ref().unwrap().clone();
            for c in &got {
                assert!(Arc::ptr_eq(c.as_ref().unwrap(), &first));
            }
            assert_eq!(lookups.load(Ordering::SeqCst), 1, "one CA request");
        });
    }

    /// Issue 18 item 9: a CA that accepts and never answers fails the request after the
    /// timeout; the waiting connection is refused, not stuck.
    #[test]
    fn hardening_09_a_silent_ca_times_out() {
        // Connects complete in the backlog; nothing ever reads or answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (certs, fetcher) = Certificates::new(
            CaClient {
                addr: silent.local_addr().unwrap().to_string(),
                server_name: ServerName::try_from("gateway-ca").unwrap(),
                tls: Arc::new(
                    rustls::ClientConfig::builder_with_provider(crate::tunnel::crypto_provider())
                        .with_safe_default_protocol_versions()
                        .unwrap()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                ),
            },
            Duration::from_millis(300),
            Vec::new(),
            None,
            None,
        );
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(fetcher.run());
        });
        tokio_uring::start(async {
            let t0 = std::time::Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                certs.config_for(&workload(api(), "uid-1")),
            )
            .await
            .expect("the request hung on a silent CA");
            let e = r.unwrap_err();
            assert!(matches!(e, CertificateError::Timeout(_)), "{e:?}");
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        });
        drop(silent);
    }
}
