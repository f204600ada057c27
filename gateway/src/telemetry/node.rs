//! The metrics of the node: names, HELP text, and zero values registered at start so that a
//! scrape shows every series before it first moves.

use super::Metric;

/// Connections accepted, explicit and transparent.
pub const CONNECTIONS_TOTAL: &str = "gateway_node_connections_total";
/// `accept()` failures (the accept loop backs off 50 ms after each).
pub const ACCEPT_ERRORS_TOTAL: &str = "gateway_node_accept_errors_total";
/// Connections accepted and not yet ended.
pub const ACTIVE_CONNECTIONS: &str = "gateway_node_active_connections";
/// Connections closed at accept because the agent held `data_plane.max_connections`.
pub const CONNECTION_REFUSALS_TOTAL: &str = "gateway_node_connection_refusals_total";
/// Connections ended by an error, by `kind` (one of [`ERROR_KINDS`]).
pub const ERRORS_TOTAL: &str = "gateway_node_errors_total";
/// Seconds from a connection's start to a tunnel dialled for it being ready.
pub const TUNNEL_HANDSHAKE_SECONDS: &str = "gateway_node_tunnel_handshake_seconds";
/// Tunnel handshakes finished, by `kind` (one of [`HANDSHAKE_KINDS`]).
pub const TUNNEL_HANDSHAKES_TOTAL: &str = "gateway_node_tunnel_handshakes_total";
/// Plaintext bytes relayed, by `direction` (one of [`DIRECTIONS`]).
pub const BYTES_TOTAL: &str = "gateway_node_bytes_total";
/// Warm tunnels ready for a connection, all identities and threads together.
pub const WARM_TUNNELS: &str = "gateway_node_warm_tunnels";
/// What became of warm tunnels, by `result` (one of [`WARM_RESULTS`]).
pub const WARM_TUNNELS_TOTAL: &str = "gateway_node_warm_tunnels_total";
/// Transparent connections whose cgroup did not resolve to a workload.
pub const IDENTITY_FAILURES_TOTAL: &str = "gateway_node_identity_failures_total";
/// Workload certificate requests to the CA that failed or were refused.
pub const CERTIFICATE_FAILURES_TOTAL: &str = "gateway_node_certificate_failures_total";
/// Workload certificates fetched from the CA.
pub const CERTIFICATES_FETCHED_TOTAL: &str = "gateway_node_certificates_fetched_total";
/// The soonest `notAfter` (unix seconds) of the workload certificates the node holds; 0
/// with none. A dashboard shows it minus `time()`.
pub const WORKLOAD_CERTIFICATE_EXPIRY: &str =
    "gateway_node_workload_certificate_expiry_timestamp_seconds";
/// The `notAfter` (unix seconds) of the node's own certificate (joined or from files).
pub const NODE_CERTIFICATE_EXPIRY: &str = "gateway_node_node_certificate_expiry_timestamp_seconds";
/// Reloads of the node's trust and certificate files (`interception.ca.ca`, node
/// certificate files, `proxy.ca`, explicit listeners' workload certificates), by `result`.
pub const TLS_RELOADS_TOTAL: &str = "gateway_node_tls_reloads_total";
/// Label values of [`TLS_RELOADS_TOTAL`]'s `result`.
pub const RELOAD_RESULTS: &[&str] = &["success", "error"];
/// Client TLS handshakes (application to node), by `result` (one of [`CLIENT_TLS_RESULTS`]).
pub const CLIENT_TLS_HANDSHAKES_TOTAL: &str = "gateway_node_client_tls_handshakes_total";
/// Seconds from the first TLS byte to a finished client TLS handshake.
pub const CLIENT_TLS_HANDSHAKE_SECONDS: &str = "gateway_node_client_tls_handshake_seconds";
/// Server certificates (client TLS) fetched from the CA, by `result` (`fetched`, `failed`).
pub const SERVER_CERTIFICATES_TOTAL: &str = "gateway_node_server_certificates_total";

/// Walks of the cgroup tree for cgroup ids not seen before (rate-limited, off the data plane).
pub const CGROUP_WALKS_TOTAL: &str = "gateway_node_cgroup_walks_total";
/// Connects the kernel refused because the connecting cgroup held its budget of
/// intercepted connections (`interception.connections_per_cgroup`).
pub const INTERCEPT_REFUSALS_TOTAL: &str = "gateway_node_intercept_refusals_total";

/// Label values of [`ERRORS_TOTAL`]'s `kind`.
pub const ERROR_KINDS: &[&str] = &[
    "bad_startup",
    "startup_timeout",
    "identity",
    "certificate",
    "proxy_unreachable",
    "proxy_timeout",
    "tunnel_tls",
    "relay",
];
/// Label values of [`TUNNEL_HANDSHAKES_TOTAL`]'s `kind`.
pub const HANDSHAKE_KINDS: &[&str] = &["full", "resumed"];
/// Label values of [`CLIENT_TLS_HANDSHAKES_TOTAL`]'s `result`.
pub const CLIENT_TLS_RESULTS: &[&str] = &["ok", "error", "no_alpn", "no_certificate", "timeout"];
/// Label values of [`SERVER_CERTIFICATES_TOTAL`]'s `result`.
pub const SERVER_CERTIFICATE_RESULTS: &[&str] = &["fetched", "failed"];
/// Label values of [`BYTES_TOTAL`]'s `direction`.
pub const DIRECTIONS: &[&str] = &["app_to_proxy", "proxy_to_app"];
/// Label values of [`WARM_TUNNELS_TOTAL`]'s `result`.
pub const WARM_RESULTS: &[&str] = &["hit", "stale", "expired", "dial_failed"];

/// Every metric of the node: kind, HELP text, and the label values of labelled counters.
pub const METRICS: &[Metric] = &[
    Metric::counter(CONNECTIONS_TOTAL, "Connections accepted by the node agent."),
    Metric::counter(ACCEPT_ERRORS_TOTAL, "Failed accept() calls."),
    Metric::gauge(ACTIVE_CONNECTIONS, "Application connections open now."),
    Metric::counter(
        CONNECTION_REFUSALS_TOTAL,
        "Connections closed at accept because the agent held data_plane.max_connections.",
    ),
    Metric::counter(
        ERRORS_TOTAL,
        "Connections ended by an error, by kind (the client got an ErrorResponse or a close).",
    )
    .labelled("kind", ERROR_KINDS),
    Metric::histogram(
        TUNNEL_HANDSHAKE_SECONDS,
        "Time to dial a new tunnel to the proxy and finish its TLS handshake (warm tunnels are not counted).",
    ),
    Metric::counter(
        TUNNEL_HANDSHAKES_TOTAL,
        "TLS handshakes with the proxy, by kind (full or resumed).",
    )
    .labelled("kind", HANDSHAKE_KINDS),
    Metric::counter(BYTES_TOTAL, "Plaintext bytes relayed, by direction.")
        .labelled("direction", DIRECTIONS),
    Metric::gauge(WARM_TUNNELS, "Handshaked tunnels waiting for a connection."),
    Metric::counter(
        WARM_TUNNELS_TOTAL,
        "Warm tunnels by result (hit, stale, expired, dial_failed).",
    )
    .labelled("result", WARM_RESULTS),
    Metric::counter(
        IDENTITY_FAILURES_TOTAL,
        "Transparent connections whose workload could not be identified.",
    ),
    Metric::counter(
        CERTIFICATE_FAILURES_TOTAL,
        "Failed workload certificate requests to the CA.",
    ),
    Metric::counter(
        CERTIFICATES_FETCHED_TOTAL,
        "Workload certificates fetched from the CA.",
    ),
    Metric::counter(
        CLIENT_TLS_HANDSHAKES_TOTAL,
        "Client TLS handshakes (application to node), by result.",
    )
    .labelled("result", CLIENT_TLS_RESULTS),
    Metric::histogram(
        CLIENT_TLS_HANDSHAKE_SECONDS,
        "Time of successful client TLS handshakes (application to node).",
    ),
    Metric::counter(
        SERVER_CERTIFICATES_TOTAL,
        "Server certificates for client TLS requested from the CA, by result.",
    )
    .labelled("result", SERVER_CERTIFICATE_RESULTS),
    Metric::gauge(
        WORKLOAD_CERTIFICATE_EXPIRY,
        "The soonest notAfter (unix seconds) of the workload certificates the node holds; 0 with none.",
    ),
    Metric::gauge(
        NODE_CERTIFICATE_EXPIRY,
        "The notAfter (unix seconds) of the node's own certificate, joined or from files.",
    ),
    Metric::counter(
        TLS_RELOADS_TOTAL,
        "Reloads of the node's CA bundle, node certificate files, proxy CA bundle and explicit listeners' certificates after a file changed, by result: success, or error (the last good ones stay).",
    )
    .labelled("result", RELOAD_RESULTS),
    Metric::counter(
        CGROUP_WALKS_TOTAL,
        "Walks of the cgroup tree for cgroup ids not seen before.",
    ),
    Metric::counter(
        INTERCEPT_REFUSALS_TOTAL,
        "Connects refused in the kernel because the cgroup held its budget of intercepted connections.",
    ),
];

/// Describes every metric of the node and registers its series at zero. Call once, after
/// the recorder is installed. The node's pod directory may be a Kubernetes watch, so this
/// describes [`super::identity`]'s metrics too.
pub fn describe() {
    super::identity::describe();

    super::describe_all(METRICS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::{assert_described, scrape_after};

    #[test]
    fn a_scrape_shows_every_series_at_zero_with_help() {
        let text = scrape_after(describe);
        assert_described(&text, METRICS);
    }
}
