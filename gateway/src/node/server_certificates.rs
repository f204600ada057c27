//! Server certificates for client TLS at the node (transparent routes), by (route, dialled
//! IP): the certificate names that IP and the route's DNS names. Same life as workload
//! certificates (`certificates`): the data plane only reads the cache
//! ([`ServerCertificates::config_for`], a read lock and an `Arc` clone on a hit); a miss goes
//! over a channel to the [`ServerFetcher`] on the control runtime, which makes the key and
//! CSR, asks the CA (one request per key at a time, bounded by `interception.ca.timeout`),
//! fills the cache and keeps the certificate renewed at half-life with backoff. The key never
//! leaves the node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use tokio::sync::{mpsc, oneshot};

use super::certificates;
use super::client_tls;
use crate::admin::Readiness;
use crate::ca::client::{CaClient, ClientError};
use crate::route::ClientTls;
use crate::telemetry::node as telemetry;

/// Why no server certificate (the text after `no server certificate for …: `).
#[derive(Debug, thiserror::Error)]
pub enum ServerCertificateError {
    #[error("{0}")]
    Ca(#[from] ClientError),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("the CA did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the node agent's certificate task is not running")]
    ControlGone,
}

/// A route and the IP the application dialled.
pub type Key = (String, IpAddr);

struct Entry {
    /// As in the workload cache: served until just before its end, renewed in the
    /// background.
    usable_until: SystemTime,
    config: Arc<ServerConfig>,
}

type Cache = Arc<RwLock<HashMap<Key, Entry>>>;
type Reply = oneshot::Sender<Result<Arc<ServerConfig>, Arc<ServerCertificateError>>>;

struct Request {
    key: Key,
    tls: Arc<ClientTls>,
    reply: Reply,
}

/// The data plane's side.
pub struct ServerCertificates {
    cache: Cache,
    requests: mpsc::UnboundedSender<Request>,
}

/// The control runtime's side.
pub struct ServerFetcher {
    requests: mpsc::UnboundedReceiver<Request>,
    control: Arc<Control>,
}

struct Control {
    cache: Cache,
    ca: CaClient,
    ca_timeout: Duration,
    /// Keys being fetched, with the connections waiting for each (single flight).
    inflight: Mutex<HashMap<Key, Vec<Reply>>>,
    /// Degraded while a certificate goes unrenewed past three quarters of its life.
    readiness: Option<Readiness>,
}

type Fetched = certificates::Fetched<ServerConfig>;

impl ServerCertificates {
    pub fn new(
        ca: CaClient,
        ca_timeout: Duration,
        readiness: Option<Readiness>,
    ) -> (Self, ServerFetcher) {
        let cache = Cache::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let control = Arc::new(Control {
            cache: cache.clone(),
            ca,
            ca_timeout,
            inflight: Mutex::default(),
            readiness,
        });
        (
            Self {
                cache,
                requests: tx,
            },
            ServerFetcher {
                requests: rx,
                control,
            },
        )
    }

    /// The server configuration for a connection to `ip` on `route`.
    pub async fn config_for(
        &self,
        route: &str,
        ip: IpAddr,
        tls: &Arc<ClientTls>,
    ) -> Result<Arc<ServerConfig>, Arc<ServerCertificateError>> {
        let key = (route.to_owned(), canonical(ip));
        if let Some(c) = cached(&self.cache, &key, SystemTime::now()) {
            return Ok(c);
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                key,
                tls: tls.clone(),
                reply,
            })
            .map_err(|_| Arc::new(ServerCertificateError::ControlGone))?;
        answer
            .await
            .map_err(|_| Arc::new(ServerCertificateError::ControlGone))?
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address the application dialled.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn cached(cache: &Cache, key: &Key, now: SystemTime) -> Option<Arc<ServerConfig>> {
    let cache = cache.read().unwrap_or_else(|e| e.into_inner());
    cache
        .get(key)
        .filter(|e| now < e.usable_until)
        .map(|e| e.config.clone())
}

impl ServerFetcher {
    /// Serves requests until every [`ServerCertificates`] handle is gone (on tokio).
    pub async fn run(mut self) {
        while let Some(Request { key, tls, reply }) = self.requests.recv().await {
            if let Some(c) = cached(&self.control.cache, &key, SystemTime::now()) {
                let _ = reply.send(Ok(c));
                continue;
            }
            {
                let mut inflight = self
                    .control
                    .inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(waiting) = inflight.get_mut(&key) {
                    waiting.push(reply);
                    continue;
                }
                inflight.insert(key.clone(), vec![reply]);
            }
            let control = self.control.clone();
            tokio::spawn(async move {
                let r = control.fetch(&key, &tls).await;
                let waiting = control
                    .inflight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key)
                    .unwrap_or_default();
                match r {
                    Ok(f) => {
                        for reply in waiting {
                            let _ = reply.send(Ok(f.config.clone()));
                        }
                        control.keep_renewed(&key, &tls, f).await;
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        for reply in waiting {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
    }
}

impl Control {
    async fn fetch(&self, key: &Key, tls: &ClientTls) -> Result<Fetched, ServerCertificateError> {
        let r = tokio::time::timeout(self.ca_timeout, self.try_fetch(key, tls))
            .await
            .unwrap_or(Err(ServerCertificateError::Timeout(self.ca_timeout)));
        let result = if r.is_ok() { "fetched" } else { "failed" };
        metrics::counter!(telemetry::SERVER_CERTIFICATES_TOTAL, "result" => result).increment(1);
        if let Err(e) = &r {
            tracing::info!(route = %key.0, ip = %key.1, %e, "no server certificate");
        }
        r
    }

    async fn try_fetch(
        &self,
        key: &Key,
        tls: &ClientTls,
    ) -> Result<Fetched, ServerCertificateError> {
        let now = SystemTime::now();
        let issued = self
            .ca
            .server_certificate(&tls.server_names, &[key.1])
            .await?;
        let not_after = x509_parser::parse_x509_certificate(&issued.chain[0])
            .map(|(_, c)| c.validity().not_after.timestamp())
            .unwrap_or(0);
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
        let renew_at = certificates::renew_at(now, expiry);
        let config = Arc::new(client_tls::server_config(issued.chain, issued.key)?);
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.clone(),
                Entry {
                    usable_until: expiry - certificates::SERVE_MARGIN,
                    config: config.clone(),
                },
            );
        Ok(Fetched {
            config,
            renew_at,
            expiry,
        })
    }

    /// Renews at half-life while `f` (then each renewal) is the cached entry
    /// ([`certificates::keep_renewed`]).
    async fn keep_renewed(&self, key: &Key, tls: &ClientTls, f: Fetched) {
        let degraded = self.readiness.as_ref().map(|r| {
            (
                r,
                format!("server certificate for route {} at {}", key.0, key.1),
            )
        });
        certificates::keep_renewed(
            f,
            degraded,
            |config| self.is_cached(key, config),
            move || self.fetch(key, tls),
            |config| {
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                if cache
                    .get(key)
                    .is_some_and(|e| Arc::ptr_eq(&e.config, config))
                {
                    cache.remove(key);
                }
            },
        )
        .await;
    }

    fn is_cached(&self, key: &Key, config: &Arc<ServerConfig>) -> bool {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .is_some_and(|e| Arc::ptr_eq(&e.config, config))
    }
}
