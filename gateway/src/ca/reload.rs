//! The files of `gateway ca serve` that change while it runs, reloaded without a restart:
//! the signing root and its key (a root rotation's `activate`, a Secret update), the bundle
//! of roots node certificates are verified against (`prepare` adds the new root, `finish`
//! drops the old one), and the CA's own server certificate. Checked every
//! [`WATCH_INTERVAL`]; a set that does not load (a key of another certificate, a bundle
//! without the signing root) keeps the last good one, logged and counted in
//! `gateway_ca_reloads_total{result}`. A request in flight keeps what it started with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;

use crate::pki::{self, CertificateAuthority, watch::Stamps};
use crate::telemetry::ca::RELOADS_TOTAL;

/// How often the files are looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// The signing root, shared by the certificate and join listeners.
pub type Signing = Arc<ArcSwap<CertificateAuthority>>;
/// A listener's TLS settings; each new connection takes the current ones.
pub type Tls = Arc<ArcSwap<ServerConfig>>;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    #[error(
        "{bundle} does not hold the signing root {root}: nodes given certificates now would be refused"
    )]
    RootNotInBundle { bundle: PathBuf, root: PathBuf },
    #[error(
        "{cert} is not signed by a root of {bundle}: nodes would refuse it (issue it again from the signing root)"
    )]
    ServerCertNotFromBundle { cert: PathBuf, bundle: PathBuf },
    #[error("tls settings: {0}")]
    Tls(String),
}

/// Where the CA's changing files are.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub dir: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
}

/// What the CA serves with, as last loaded.
pub struct Loaded {
    pub signing: CertificateAuthority,
    /// The roots node certificates are verified against.
    pub bundle: Vec<CertificateDer<'static>>,
    pub tls: ServerConfig,
    pub join_tls: ServerConfig,
}

impl CaFiles {
    fn root(&self) -> PathBuf {
        self.dir.join(pki::WORKLOAD_CA_CERT)
    }

    /// The bundle file; a CA directory made before bundles existed has only its root.
    fn bundle_path(&self) -> PathBuf {
        let bundle = self.dir.join(pki::WORKLOAD_BUNDLE);
        if bundle.exists() { bundle } else { self.root() }
    }

    /// The files' stamps; taken before [`CaFiles::load`], so a change in between is seen.
    pub fn stamps(&self) -> Stamps {
        Stamps::new(self.watched())
    }

    fn watched(&self) -> Vec<PathBuf> {
        vec![
            self.root(),
            self.dir.join(pki::WORKLOAD_CA_KEY),
            self.dir.join(pki::WORKLOAD_BUNDLE),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        ]
    }

    /// Every file, checked together: the key is the root's, the root is in the bundle.
    pub fn load(&self) -> Result<Loaded, ReloadError> {
        let signing =
            CertificateAuthority::load(&self.root(), &self.dir.join(pki::WORKLOAD_CA_KEY))?;
        let bundle_path = self.bundle_path();
        let bundle = pki::load_certs(&bundle_path)?;
        let root = pki::load_certs(&self.root())?;
        if !bundle.contains(&root[0]) {
            return Err(ReloadError::RootNotInBundle {
                bundle: bundle_path,
                root: self.root(),
            });
        }
        let chain = pki::load_certs(&self.tls_cert)?;
        // After a rotation's `finish`, a server certificate of the old root would lock every
        // node out: keep the last good set instead.
        if !bundle.iter().any(|root| pki::signed_by(&chain[0], root)) {
            return Err(ReloadError::ServerCertNotFromBundle {
                cert: self.tls_cert.clone(),
                bundle: bundle_path,
            });
        }
        let key = pki::load_key(&self.tls_key)?;
        let tls = crate::tunnel::server_config(chain.clone(), key.clone_key(), &bundle)
            .map_err(|e| ReloadError::Tls(e.to_string()))?;
        let join_tls = join_server_config(chain, key, &bundle)?;
        Ok(Loaded {
            signing,
            bundle,
            tls,
            join_tls,
        })
    }
}

/// The join listener's TLS: the CA's server certificate; a client certificate from the
/// workload CA is optional (joining nodes have none), and checked by rustls when given.
pub fn join_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    client_ca: &[CertificateDer<'static>],
) -> Result<ServerConfig, ReloadError> {
    let tls = |e: String| ReloadError::Tls(e);
    let provider = crate::tunnel::crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in client_ca {
        roots.add(c.clone()).map_err(|e| tls(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| tls(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .and_then(|b| {
            b.with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
        })
        .map_err(|e| tls(e.to_string()))?;
    // No resumption: every connection shows the certificate it has now (a renewal), or none.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The live copies the listeners read.
#[derive(Clone)]
pub struct Live {
    pub signing: Signing,
    pub tls: Tls,
    pub join_tls: Tls,
}

impl Live {
    pub fn new(l: Loaded) -> Self {
        Self {
            signing: Arc::new(ArcSwap::from_pointee(l.signing)),
            tls: Arc::new(ArcSwap::from_pointee(l.tls)),
            join_tls: Arc::new(ArcSwap::from_pointee(l.join_tls)),
        }
    }

    fn store(&self, l: Loaded) {
        self.signing.store(Arc::new(l.signing));
        self.tls.store(Arc::new(l.tls));
        self.join_tls.store(Arc::new(l.join_tls));
    }
}

/// Runs for as long as the process: loads the files again whenever one changes (`stamps`
/// from before the first load).
pub async fn watch(files: CaFiles, live: Live, mut stamps: Stamps) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        if !stamps.changed() {
            continue;
        }
        match files.load() {
            Ok(l) => {
                let roots = l.bundle.len();
                live.store(l);
                metrics::counter!(RELOADS_TOTAL, "result" => "success").increment(1);
                tracing::info!(roots, "CA files reloaded");
            }
            Err(e) => {
                metrics::counter!(RELOADS_TOTAL, "result" => "error").increment(1);
                tracing::error!(%e, "CA files changed but did not load; the last good ones stay");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{LeafSpec, rotate};

    /// The CA's server certificate, from the directory's signing root of now.
    fn issue_server(dir: &std::path::Path) {
        let ca = CertificateAuthority::load(
            &dir.join(pki::WORKLOAD_CA_CERT),
            &dir.join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        let (c, k) = ca
            .issue(
                &LeafSpec::server(vec!["gateway-ca".into()], vec![]),
                Duration::from_secs(3600),
            )
            .unwrap();
        pki::write_public(&dir.join("server.crt"), &c).unwrap();
        pki::write_secret(&dir.join("server.key"), &k).unwrap();
    }

    fn files(name: &str) -> CaFiles {
        let dir =
            std::env::temp_dir().join(format!("dbgw-ca-reload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        pki::init_ca(&dir, "reload.example").unwrap();
        issue_server(&dir);
        CaFiles {
            tls_cert: dir.join("server.crt"),
            tls_key: dir.join("server.key"),
            dir,
        }
    }

    #[test]
    fn each_rotation_step_loads_and_a_mismatched_pair_does_not() {
        let f = files("steps");
        assert_eq!(f.load().unwrap().bundle.len(), 1);
        rotate::prepare(&f.dir).unwrap();
        let prepared = f.load().unwrap();
        assert_eq!(prepared.bundle.len(), 2);
        rotate::activate(&f.dir).unwrap();
        let active = f.load().unwrap();
        assert_ne!(prepared.signing.cert_pem(), active.signing.cert_pem());
        assert_eq!(active.bundle.len(), 2);
        rotate::finish(&f.dir).unwrap();
        // The server certificate is still the old root's, which no node trusts now.
        let e = f.load().err().unwrap().to_string();
        assert!(e.contains("is not signed by a root of"), "{e}");
        issue_server(&f.dir);
        assert_eq!(f.load().unwrap().bundle.len(), 1);

        // Half a rotation by hand: the key of another root beside this root.
        let other = files("other");
        std::fs::copy(
            other.dir.join(pki::WORKLOAD_CA_KEY),
            f.dir.join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        let e = f.load().err().unwrap().to_string();
        assert!(e.contains("it is not the key of"), "{e}");
        std::fs::remove_dir_all(&f.dir).unwrap();
        std::fs::remove_dir_all(&other.dir).unwrap();
    }

    #[test]
    fn a_bundle_without_the_signing_root_does_not_load() {
        let (f, other) = (files("nobundle"), files("nobundle-other"));
        std::fs::copy(
            other.dir.join(pki::WORKLOAD_CA_CERT),
            f.dir.join(pki::WORKLOAD_BUNDLE),
        )
        .unwrap();
        let e = f.load().err().unwrap().to_string();
        assert!(e.contains("does not hold the signing root"), "{e}");
        std::fs::remove_dir_all(&f.dir).unwrap();
        std::fs::remove_dir_all(&other.dir).unwrap();
    }
}
