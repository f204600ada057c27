//! The node's own certificate (`spiffe://<td>/node/<name>`), which authenticates it to the
//! CA: from files (`interception.ca.node_cert`/`node_key`), or joined
//! (`interception.ca.join`): at start-up the node joins once (start-up fails with the CA's
//! reason if it cannot), keeps the key in memory only, and then renews it on the control
//! runtime (`ca::join::client::JoinClient::keep_renewed`: half-life with jitter, backoff
//! capped at 150 s, readiness degraded before the cached certificate ends).

use std::sync::Arc;

use anyhow::Context;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::admin::Readiness;
use crate::ca::join::client::{JoinClient, NodeIdentity, Prover, Schedule, client_config};
use crate::config::{CaEndpoint, JoinConfig};
use crate::pki;

/// The TLS client configuration for the CA, with the node certificate in it (files), or
/// behind a resolver the renewal task keeps current (join; the renewal is spawned on
/// `control`).
pub fn ca_tls(
    node_name: &str,
    ca: &CaEndpoint,
    ca_roots: &[CertificateDer<'static>],
    control: &tokio::runtime::Runtime,
    readiness: &Readiness,
) -> anyhow::Result<ClientConfig> {
    let Some(join) = &ca.join else {
        return Ok(crate::tunnel::client_config(
            pki::load_certs(&ca.node_cert).context("interception.ca.node_cert")?,
            pki::load_key(&ca.node_key).context("interception.ca.node_key")?,
            ca_roots,
        )?);
    };
    let identity = Arc::new(NodeIdentity::default());
    let tls = Arc::new(client_config(ca_roots, identity.clone())?);
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
        addr: join.address(),
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
