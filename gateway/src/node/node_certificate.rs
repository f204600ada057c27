//! The node's own certificate (`spiffe://<td>/node/<name>`), which authenticates it to the
//! CA: from files (`interception.ca.node_cert`/`node_key`), or joined
//! (`interception.ca.join`): at start-up the node joins once (start-up fails with the CA's
//! reason if it cannot), keeps the key in memory only, and then renews it on the control
//! runtime (`ca::join::client::JoinClient::keep_renewed`: half-life with jitter, backoff
//! capped at 150 s, readiness degraded before the cached certificate ends).
//!
//! Either way the TLS client to the CA takes, at each handshake, the roots and the node
//! certificate of that moment: the roots (`interception.ca.ca`) and the node certificate
//! files reload when they change ([`watch_files`]), so a CA root rotation or a renewed
//! certificate file needs no restart.

use std::sync::Arc;

use anyhow::Context;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use crate::admin::Readiness;
use crate::ca::join::client::{JoinClient, NodeIdentity, Prover, Schedule, client_config};
use crate::config::{CaEndpoint, JoinConfig};
use crate::pki::{self, watch::Stamps};
use crate::telemetry::node::TLS_RELOADS_TOTAL;
use crate::tunnel::ReloadableRoots;

/// How often the files are looked at.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The TLS client configuration for the CA: the node certificate from files, or behind a
/// resolver the renewal task keeps current (join; the renewal is spawned on `control`).
/// The file watcher is spawned on `control` too.
pub fn ca_tls(
    node_name: &str,
    ca: &CaEndpoint,
    control: &tokio::runtime::Runtime,
    readiness: &Readiness,
) -> anyhow::Result<ClientConfig> {
    // Stamps first: a file replaced while it loads is loaded again.
    let bundle = Stamps::new(vec![ca.ca.clone()]);
    let certs = Stamps::new(match ca.join {
        None => vec![ca.node_cert.clone(), ca.node_key.clone()],
        Some(_) => Vec::new(),
    });
    let roots = Arc::new(
        ReloadableRoots::new(&pki::load_certs(&ca.ca).context("interception.ca.ca")?)
            .context("interception.ca.ca")?,
    );
    let identity = Arc::new(NodeIdentity::default());
    let tls = Arc::new(client_config(roots.clone(), identity.clone())?);
    let Some(join) = &ca.join else {
        identity
            .set_from_files(&ca.node_cert, &ca.node_key)
            .context("interception.ca.node_cert / node_key")?;
        control.spawn(watch_files(
            ca.clone(),
            roots,
            Some(identity),
            [bundle, certs],
        ));
        return Ok(Arc::unwrap_or_clone(tls));
    };
    control.spawn(watch_files(ca.clone(), roots, None, [bundle, certs]));
    let prover = match join {
        JoinConfig::Token { token_file, .. } => Prover::Token(token_file.clone()),
        JoinConfig::Kubernetes { token_file, .. } => Prover::Kubernetes(token_file.clone()),
        JoinConfig::AwsIam {
            region,
            sts_endpoint,
            ..
        } => {
            let url = sts_endpoint
                .clone()
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com/"));
            Prover::AwsIam(
                control.block_on(crate::ca::join::aws_iam::Signer::from_chain(
                    url,
                    region.clone(),
                )),
            )
        }
    };
    let client = JoinClient {
        addr: join.address().to_owned(),
        server_name: ServerName::try_from(ca.server_name.clone())
            .with_context(|| format!("interception.ca.server_name {:?}", ca.server_name))?,
        tls: tls.clone(),
        identity,
        node_name: node_name.to_owned(),
        prover,
        timeout: ca.timeout,
        schedule: Schedule::default(),
    };
    let first = control
        .block_on(client.join())
        .with_context(|| format!("joining the CA at {} as node {node_name}", join.address()))?;
    tracing::info!(node = node_name, not_after = %humantime::format_rfc3339_seconds(first.not_after), "joined the CA");
    let readiness = readiness.clone();
    control.spawn(async move { client.keep_renewed(first, readiness).await });
    Ok(Arc::unwrap_or_clone(tls))
}

/// Reloads `interception.ca.ca` into `roots`, and the node certificate files into
/// `identity` (file mode), when they change. A file that does not load leaves the last good
/// one in place (logged, counted in `gateway_node_tls_reloads_total{result="error"}`).
async fn watch_files(
    ca: CaEndpoint,
    roots: Arc<ReloadableRoots>,
    identity: Option<Arc<NodeIdentity>>,
    [mut bundle, mut certs]: [Stamps; 2],
) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if bundle.changed() {
            let r = pki::load_certs(&ca.ca)
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok(roots.set(&c)?));
            counted("interception.ca.ca", &ca.ca, r);
        }
        if let Some(identity) = identity.as_ref().filter(|_| certs.changed()) {
            let r = identity
                .set_from_files(&ca.node_cert, &ca.node_key)
                .map(drop)
                .map_err(anyhow::Error::from);
            counted("interception.ca.node_cert", &ca.node_cert, r);
        }
    }
}

/// Logs and counts one reload of the node's files (every watcher of the node uses it).
pub fn counted(what: &str, path: &std::path::Path, result: anyhow::Result<()>) {
    let label = if result.is_ok() { "success" } else { "error" };
    metrics::counter!(TLS_RELOADS_TOTAL, "result" => label).increment(1);
    match result {
        Ok(()) => tracing::info!(file = %path.display(), "{what} reloaded"),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "{what} changed but did not load; the last good one stays")
        }
    }
}
