//! Everything that ends an application connection at the node before the relay runs, and
//! the one place that turns it into what the client sees: a PostgreSQL `ErrorResponse`
//! (same SQLSTATE, message and hint for every cause, so operators can grep for them) and
//! the `kind` label of `gateway_node_errors_total`.
//!
//! A variant's message is the text after `db-gateway node <name>: ` in the client's error;
//! the node name is added by [`NodeError::to_client`], so an error never copies it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::IdentityError;
use crate::pg::{ErrorResponse, sqlstate};
use crate::pki::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The startup exchange broke PostgreSQL's rules (`startup::negotiate` already wrote
    /// the client's error).
    #[error("{}", .0.message)]
    BadStartup(ErrorResponse),
    #[error("timeout waiting for the startup packet")]
    StartupTimeout(Duration),
    #[error("interception lookup failed: {0}")]
    Lookup(crate::ebpf::EbpfError),
    #[error("connection from {0} was not intercepted")]
    NotIntercepted(SocketAddr),
    #[error("no database route for destination {0}")]
    NoRoute(SocketAddr),
    #[error("cannot identify the workload: {0}")]
    Unidentified(IdentityError),
    #[error("no workload certificate for {spiffe_id}: {reason}")]
    Certificate { spiffe_id: SpiffeId, reason: String },
    /// Client TLS: the CA gave no server certificate for the dialled address (told in the
    /// clear, as PostgreSQL answers an `SSLRequest` it cannot serve).
    #[error("no server certificate for {destination}: {reason}")]
    ServerCertificate { destination: String, reason: String },
    #[error("cannot reach the proxy at {proxy}: {source}")]
    ProxyUnreachable {
        proxy: SocketAddr,
        source: std::io::Error,
    },
    #[error("timeout connecting to the proxy at {proxy} after {timeout:?}")]
    ProxyTimeout {
        proxy: SocketAddr,
        timeout: Duration,
    },
    /// The handshake, the first write or the proxy's first answer failed: TLS 1.3 sends the
    /// proxy's verdict on our certificate with its first records.
    #[error("TLS with the proxy at {proxy} failed: {source}")]
    TunnelTls {
        proxy: SocketAddr,
        source: std::io::Error,
        /// Names the identity's source for the hint (certificate file or SPIFFE ID).
        identity: String,
    },
}

impl NodeError {
    /// The `kind` label of `gateway_node_errors_total` (one of
    /// `telemetry::node::ERROR_KINDS`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadStartup(_) => "bad_startup",
            Self::StartupTimeout(_) => "startup_timeout",
            Self::Lookup(_)
            | Self::NotIntercepted(_)
            | Self::NoRoute(_)
            | Self::Unidentified(_) => "identity",
            Self::Certificate { .. } | Self::ServerCertificate { .. } => "certificate",
            Self::ProxyUnreachable { .. } => "proxy_unreachable",
            Self::ProxyTimeout { .. } => "proxy_timeout",
            Self::TunnelTls { .. } => "tunnel_tls",
        }
    }

    /// What the client of node `node` is told.
    pub fn to_client(&self, node: &str) -> ErrorResponse {
        let (code, hint) = match self {
            Self::BadStartup(e) => return e.clone(),
            Self::StartupTimeout(t) => {
                return ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, format!("db-gateway: {self}"))
                    .with_hint(format!("Send the startup message within {t:?}."));
            }
            Self::Lookup(_) => (sqlstate::CONNECTION_FAILURE, None),
            Self::NotIntercepted(_) => (
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                Some("Connect to the database's own address; the agent address only serves intercepted connections.".to_owned()),
            ),
            Self::NoRoute(_) => (
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                Some("Add the address to interception.routes in the node configuration.".to_owned()),
            ),
            Self::Unidentified(_) => (
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                Some("The node agent identifies workloads by the cgroup of the connecting process; see its log.".to_owned()),
            ),
            Self::Certificate { .. } => (
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                Some("The node agent could not get a certificate from the gateway CA; see the agent and CA logs.".to_owned()),
            ),
            Self::ServerCertificate { .. } => (
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                Some("The gateway CA issues server certificates only for names on its --server-names list; see the agent and CA logs, or connect with sslmode=disable.".to_owned()),
            ),
            Self::ProxyUnreachable { .. } => (
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                Some("Check that the gateway proxy is running and that proxy.address in the node configuration points at it.".to_owned()),
            ),
            Self::ProxyTimeout { .. } => (
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                Some("The proxy is not answering; check its health and the network path from this node.".to_owned()),
            ),
            Self::TunnelTls { identity, .. } => (
                sqlstate::CONNECTION_FAILURE,
                Some(format!(
                    "Check the {identity} (issued by the proxy's workload CA, not expired) and that proxy.ca and proxy.server_name match the proxy's certificate."
                )),
            ),
        };
        let e = ErrorResponse::fatal(code, format!("db-gateway node {node}: {self}"));
        match hint {
            Some(h) => e.with_hint(h),
            None => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::Severity;

    const NODE: &str = "node-1";

    fn proxy() -> SocketAddr {
        "10.0.0.9:6432".parse().unwrap()
    }

    fn io(msg: &str) -> std::io::Error {
        std::io::Error::other(msg.to_owned())
    }

    /// Every variant, with the exact error the client got before the split.
    fn cases() -> Vec<(
        NodeError,
        &'static str,
        &'static str,
        String,
        Option<String>,
    )> {
        let bad = ErrorResponse::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "db-gateway: too many encryption requests",
        )
        .with_hint("Send SSLRequest or GSSENCRequest at most once each.");
        let id = SpiffeId::new("td", "team-a", "api");
        vec![
            (
                NodeError::BadStartup(bad.clone()),
                "bad_startup",
                sqlstate::PROTOCOL_VIOLATION,
                "db-gateway: too many encryption requests".into(),
                bad.hint.clone(),
            ),
            (
                NodeError::StartupTimeout(Duration::from_secs(10)),
                "startup_timeout",
                sqlstate::PROTOCOL_VIOLATION,
                "db-gateway: timeout waiting for the startup packet".into(),
                Some("Send the startup message within 10s.".into()),
            ),
            (
                NodeError::Lookup(crate::ebpf::EbpfError::Config("no map".into())),
                "identity",
                sqlstate::CONNECTION_FAILURE,
                "db-gateway node node-1: interception lookup failed: invalid interception config: no map".into(),
                None,
            ),
            (
                NodeError::NotIntercepted("10.1.2.3:40000".parse().unwrap()),
                "identity",
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "db-gateway node node-1: connection from 10.1.2.3:40000 was not intercepted".into(),
                Some("Connect to the database's own address; the agent address only serves intercepted connections.".into()),
            ),
            (
                NodeError::NoRoute("10.9.9.9:5432".parse().unwrap()),
                "identity",
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                "db-gateway node node-1: no database route for destination 10.9.9.9:5432".into(),
                Some("Add the address to interception.routes in the node configuration.".into()),
            ),
            (
                NodeError::Unidentified(IdentityError::NoCgroup2Mount),
                "identity",
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("db-gateway node node-1: cannot identify the workload: {}", IdentityError::NoCgroup2Mount),
                Some("The node agent identifies workloads by the cgroup of the connecting process; see its log.".into()),
            ),
            (
                NodeError::Certificate { spiffe_id: id, reason: "CA refused: pod uid-1 is not known to the CA".into() },
                "certificate",
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                "db-gateway node node-1: no workload certificate for spiffe://td/ns/team-a/sa/api: CA refused: pod uid-1 is not known to the CA".into(),
                Some("The node agent could not get a certificate from the gateway CA; see the agent and CA logs.".into()),
            ),
            (
                NodeError::ProxyUnreachable { proxy: proxy(), source: io("connection refused") },
                "proxy_unreachable",
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                "db-gateway node node-1: cannot reach the proxy at 10.0.0.9:6432: connection refused".into(),
                Some("Check that the gateway proxy is running and that proxy.address in the node configuration points at it.".into()),
            ),
            (
                NodeError::ProxyTimeout { proxy: proxy(), timeout: Duration::from_millis(1500) },
                "proxy_timeout",
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                "db-gateway node node-1: timeout connecting to the proxy at 10.0.0.9:6432 after 1.5s".into(),
                Some("The proxy is not answering; check its health and the network path from this node.".into()),
            ),
            (
                NodeError::TunnelTls {
                    proxy: proxy(),
                    source: io("received fatal alert: UnknownCA"),
                    identity: "workload certificate /etc/w.crt".into(),
                },
                "tunnel_tls",
                sqlstate::CONNECTION_FAILURE,
                "db-gateway node node-1: TLS with the proxy at 10.0.0.9:6432 failed: received fatal alert: UnknownCA".into(),
                Some("Check the workload certificate /etc/w.crt (issued by the proxy's workload CA, not expired) and that proxy.ca and proxy.server_name match the proxy's certificate.".into()),
            ),
        ]
    }

    #[test]
    fn every_error_maps_to_its_sqlstate_message_hint_and_kind() {
        let cases = cases();
        // One case per variant: a new variant must be added here (and to ERROR_KINDS).
        assert_eq!(cases.len(), 10);
        for (e, kind, code, message, hint) in cases {
            let r = e.to_client(NODE);
            assert_eq!(r.severity, Severity::Fatal, "{e:?}");
            assert_eq!(r.sqlstate, code, "{e:?}");
            assert_eq!(r.message, message, "{e:?}");
            assert_eq!(r.hint, hint, "{e:?}");
            assert_eq!(r.detail, None, "{e:?}");
            assert_eq!(e.kind(), kind);
            assert!(
                crate::telemetry::node::ERROR_KINDS.contains(&e.kind()),
                "{kind} is not registered at start"
            );
        }
    }
}
