//! The proxy's own TLS files reload when they change, without a restart and without
//! touching open sessions: its server certificate and key (renewed by cert-manager or a
//! Secret update), the client CA bundle node agents are verified against (during a CA root
//! rotation: the old and the new root), and the database-client CA that signs its
//! upstream login certificates. Each is looked at every [`WATCH_INTERVAL`] (modification
//! time and size); a set that does not load keeps the last good one, logged and counted
//! (`gateway_proxy_tls_reloads_total{result}`). New connections and logins take the new
//! files; a session keeps the TLS it was accepted with.

use std::path::PathBuf;
use std::sync::Arc;

use super::Shared;
use super::reload::WATCH_INTERVAL;
use crate::config::ProxyConfig;
use crate::pki::{self, CertificateAuthority, watch::Stamps};
use crate::telemetry::proxy::TLS_RELOADS_TOTAL;

/// The proxy's server TLS settings from the files `cfg` names.
pub fn server_config(cfg: &ProxyConfig) -> anyhow::Result<rustls::ServerConfig> {
    use anyhow::Context;
    let chain = pki::load_certs(&cfg.tls.cert)?;
    let key = pki::load_key(&cfg.tls.key)?;
    let client_ca = pki::load_certs(&cfg.tls.client_ca)?;
    crate::tunnel::server_config(chain, key, &client_ca).context("tls settings")
}

/// The database-client CA from the files `cfg` names.
pub fn db_client_ca(cfg: &ProxyConfig) -> anyhow::Result<CertificateAuthority> {
    use anyhow::Context;
    CertificateAuthority::load(&cfg.db_client_ca.cert, &cfg.db_client_ca.key)
        .context("database-client CA")
}

/// Runs for as long as the process: reloads the server TLS files and the database-client
/// CA when their stamps move.
pub async fn watch(shared: Arc<Shared>) {
    let cfg = &shared.cfg;
    let server_files = vec![
        PathBuf::from(&cfg.tls.cert),
        PathBuf::from(&cfg.tls.key),
        PathBuf::from(&cfg.tls.client_ca),
    ];
    let ca_files = vec![
        PathBuf::from(&cfg.db_client_ca.cert),
        PathBuf::from(&cfg.db_client_ca.key),
    ];
    let (mut server_files, mut ca_files) = (Stamps::new(server_files), Stamps::new(ca_files));
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        if server_files.changed() {
            counted(
                "server TLS files",
                server_config(cfg).map(|c| shared.tls.store(Arc::new(c))),
            );
        }
        if ca_files.changed() {
            counted(
                "database-client CA",
                db_client_ca(cfg).map(|ca| shared.upstreams.set_ca(ca)),
            );
        }
    }
}

fn counted(what: &str, result: anyhow::Result<()>) {
    let label = if result.is_ok() { "success" } else { "error" };
    metrics::counter!(TLS_RELOADS_TOTAL, "result" => label).increment(1);
    match result {
        Ok(()) => tracing::info!("{what} reloaded"),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{what} changed but did not load; the last good ones stay")
        }
    }
}
