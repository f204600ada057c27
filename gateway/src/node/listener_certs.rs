//! The explicit listeners' certificates: the workload certificate each presents to the
//! proxy (with `proxy.ca` to verify the proxy by) and the server certificate it shows
//! applications (`client_tls`). Explicit mode rotates these files by hand or with a
//! Secret update, so they reload when they change ([`watch`]): new connections take the
//! new files, open sessions keep the TLS they started with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::CertificateDer;

use super::connection::Listener;
use crate::config::{ListenerConfig, NodeConfig};
use crate::pki::{self, SpiffeId, watch::Stamps};

/// How often the files are looked at.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The tunnel client settings of listener `i`: its workload certificate, and the proxy
/// verified against `proxy_ca`. Also returns the identity, for the log.
pub fn tunnel_tls(
    i: usize,
    l: &ListenerConfig,
    proxy_ca: &[CertificateDer<'static>],
) -> anyhow::Result<(ClientConfig, SpiffeId)> {
    let chain = pki::load_certs(&l.identity.cert)
        .with_context(|| format!("listeners[{i}].identity.cert"))?;
    let key =
        pki::load_key(&l.identity.key).with_context(|| format!("listeners[{i}].identity.key"))?;
    let id =
        pki::spiffe_id_of(&chain[0]).with_context(|| format!("listeners[{i}].identity.cert"))?;
    let tls = crate::tunnel::client_config(chain, key, proxy_ca)
        .with_context(|| format!("listeners[{i}]"))?;
    Ok((tls, id))
}

/// The client TLS settings of listener `i`, if it has a server certificate.
pub fn client_tls(i: usize, l: &ListenerConfig) -> anyhow::Result<Option<ServerConfig>> {
    let Some(files) = &l.client_tls else {
        return Ok(None);
    };
    let config = super::client_tls::server_config(
        pki::load_certs(&files.cert).with_context(|| format!("listeners[{i}].client_tls.cert"))?,
        pki::load_key(&files.key).with_context(|| format!("listeners[{i}].client_tls.key"))?,
    )
    .with_context(|| format!("listeners[{i}].client_tls"))?;
    Ok(Some(config))
}

/// Reloads each listener's files when they (or `proxy.ca`) change. `listeners` are in
/// the configuration's order. Runs for as long as the process.
pub async fn watch(cfg: NodeConfig, listeners: Vec<Arc<Listener>>) {
    let mut proxy_ca = Stamps::new(vec![cfg.proxy.ca.clone()]);
    let mut per_listener: Vec<(Stamps, Stamps)> = cfg
        .listeners
        .iter()
        .map(|l| {
            let client: Vec<PathBuf> = l
                .client_tls
                .iter()
                .flat_map(|f| [f.cert.clone(), f.key.clone()])
                .collect();
            (
                Stamps::new(vec![l.identity.cert.clone(), l.identity.key.clone()]),
                Stamps::new(client),
            )
        })
        .collect();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let bundle_changed = proxy_ca.changed();
        for (i, ((identity, client), (l, live))) in per_listener
            .iter_mut()
            .zip(cfg.listeners.iter().zip(&listeners))
            .enumerate()
        {
            if identity.changed() | bundle_changed {
                let r = pki::load_certs(&cfg.proxy.ca)
                    .context("proxy.ca")
                    .and_then(|ca| tunnel_tls(i, l, &ca))
                    .map(|(tls, id)| {
                        live.tls.store(Arc::new(tls));
                        tracing::info!(listen = %l.listen, identity = %id, "listener certificate reloaded");
                    });
                super::node_certificate::counted(
                    "listener workload certificate",
                    &l.identity.cert,
                    r,
                );
            }
            if client.changed() {
                let r = client_tls(i, l).map(|c| {
                    if let (Some(c), Some(live)) = (c, &live.client_tls) {
                        live.store(Arc::new(c));
                    }
                });
                let cert = l
                    .client_tls
                    .as_ref()
                    .map(|f| f.cert.clone())
                    .unwrap_or_default();
                super::node_certificate::counted("listener client_tls certificate", &cert, r);
            }
        }
    }
}
