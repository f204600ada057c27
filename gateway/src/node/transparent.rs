//! Transparent mode: connections that the kernel programs redirected to the agent address.
//! Per connection the agent asks the kernel where the application meant to go and from
//! which cgroup, resolves that cgroup to a workload, picks the database route by original
//! destination, and uses that workload's certificate for the tunnel.
//!
//! Identity comes only from the kernel's record (the cgroup of the connecting socket);
//! nothing the application sends can change it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::ClientConfig;

use crate::ca::CaClient;
use crate::config::{Destination, Protocol, parse_destination};
use crate::ebpf::{Interception, OrigDst};
use crate::identity::{IdentityError, Resolver, Workload};
use crate::pg::{ErrorResponse, sqlstate};
use crate::pki::SpiffeId;

/// Everything transparent connections share (one per node, used by every data thread).
pub struct Transparent {
    pub interception: Mutex<Interception>,
    pub resolver: Resolver,
    pub routes: Vec<Route>,
    pub certs: WorkloadCerts,
    pub unknown_pod_wait: Duration,
}

/// One `interception.routes` destination pattern.
pub struct Route {
    pub destination: Destination,
    pub name: String,
    pub protocol: Protocol,
}

/// A connection's target, decided from kernel facts.
pub struct Decided {
    pub orig: OrigDst,
    pub route: String,
    pub protocol: Protocol,
    pub workload: Workload,
}

impl Transparent {
    pub fn routes_from(config: &[crate::config::RouteConfig]) -> Result<Vec<Route>, String> {
        let mut out = Vec::new();
        for r in config {
            for d in &r.match_destination {
                out.push(Route {
                    destination: parse_destination(d)?,
                    name: r.route.clone(),
                    protocol: r.protocol,
                });
            }
        }
        Ok(out)
    }

    /// Where the connection from `peer` was going, and whose it is. A refusal comes with
    /// the protocol to refuse in (`postgres` while the route is not known).
    pub async fn decide(
        &self,
        node: &str,
        peer: SocketAddr,
    ) -> Result<Decided, (ErrorResponse, Protocol)> {
        let unknown = |e| (e, Protocol::Postgres);
        let orig = self
            .interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(peer)
            .map_err(|e| {
                ErrorResponse::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!("db-gateway node {node}: interception lookup failed: {e}"),
                )
            })
            .map_err(unknown)?
            .ok_or_else(|| {
                ErrorResponse::fatal(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("db-gateway node {node}: connection from {peer} was not intercepted"),
                )
                .with_hint("Connect to the database's own address; the agent address only serves intercepted connections.")
            })
            .map_err(unknown)?;
        let route = self
            .routes
            .iter()
            .find(|r| r.destination.matches(orig.dst))
            .ok_or_else(|| {
                ErrorResponse::fatal(
                    sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                    format!(
                        "db-gateway node {node}: no database route for destination {}",
                        orig.dst
                    ),
                )
                .with_hint("Add the address to interception.routes in the node configuration.")
            })
            .map_err(unknown)?;
        let workload = self
            .resolve(node, orig.cgroup_id)
            .await
            .map_err(|e| (e, route.protocol))?;
        Ok(Decided {
            orig,
            route: route.name.clone(),
            protocol: route.protocol,
            workload,
        })
    }

    /// Resolves, waiting up to `unknown_pod_wait` for a pod the directory has not seen yet.
    async fn resolve(&self, node: &str, cgroup_id: u64) -> Result<Workload, ErrorResponse> {
        let deadline = Instant::now() + self.unknown_pod_wait;
        loop {
            match self.resolver.resolve(cgroup_id) {
                Ok(w) => return Ok(w),
                Err(IdentityError::UnknownPod { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    metrics::counter!("gateway_node_identity_failures_total").increment(1);
                    return Err(ErrorResponse::fatal(
                        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                        format!("db-gateway node {node}: cannot identify the workload: {e}"),
                    )
                    .with_hint("The node agent identifies workloads by the cgroup of the connecting process; see its log."));
                }
            }
        }
    }
}

/// Workload certificates by identity, fetched from the CA on first use and renewed at
/// half their life; open sessions keep the configuration they started with.
pub struct WorkloadCerts {
    pub ca: CaClient,
    pub proxy_ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    cache: Mutex<HashMap<SpiffeId, (SystemTime, Arc<ClientConfig>)>>,
}

impl WorkloadCerts {
    pub fn new(ca: CaClient, proxy_ca: Vec<rustls_pki_types::CertificateDer<'static>>) -> Self {
        Self {
            ca,
            proxy_ca,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn config_for(
        &self,
        node: &str,
        w: &Workload,
    ) -> Result<Arc<ClientConfig>, ErrorResponse> {
        let now = SystemTime::now();
        if let Some((renew_at, cfg)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&w.spiffe_id)
            && now < *renew_at
        {
            return Ok(cfg.clone());
        }
        let fail = |why: String| {
            metrics::counter!("gateway_node_certificate_failures_total").increment(1);
            ErrorResponse::fatal(
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                format!("db-gateway node {node}: no workload certificate for {}: {why}", w.spiffe_id),
            )
            .with_hint("The node agent could not get a certificate from the gateway CA; see the agent and CA logs.")
        };
        let issued = self
            .ca
            .workload_certificate(w.pod.uid.as_deref())
            .await
            .map_err(|e| fail(e.to_string()))?;
        if issued.spiffe_id != w.spiffe_id {
            // The CA and this node disagree about the pod: trust neither.
            return Err(fail(format!("the CA issued {} instead", issued.spiffe_id)));
        }
        let not_after = x509_parser::parse_x509_certificate(&issued.chain[0])
            .map(|(_, c)| c.validity().not_after.timestamp())
            .unwrap_or(0);
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
        let renew_at = now + expiry.duration_since(now).unwrap_or_default() / 2;
        let cfg = crate::tunnel::client_config(issued.chain, issued.key, &self.proxy_ca)
            .map(Arc::new)
            .map_err(|e| fail(e.to_string()))?;
        metrics::counter!("gateway_node_certificates_fetched_total").increment(1);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(w.spiffe_id.clone(), (renew_at, cfg.clone()));
        Ok(cfg)
    }
}
