//! The metrics of the ca: names, HELP text, and zero values registered at start so that a
//! scrape shows every series before it first moves.

use super::Metric;

/// Workload certificates signed (`ca::service`).
pub const CERTIFICATES_ISSUED: &str = "gateway_ca_certificates_issued_total";
/// Requests refused: not a node, unknown pod, pod on another node, no host identity, bad
/// request (`ca::service`).
pub const REFUSALS: &str = "gateway_ca_refusals_total";
/// Server certificates signed for nodes' client TLS (`ca::service`).
pub const SERVER_CERTIFICATES_ISSUED: &str = "gateway_ca_server_certificates_issued_total";

/// Node certificates issued by joins, by method (`ca::join`).
pub const JOINS_TOTAL: &str = "gateway_ca_joins_total";
/// Joins refused, by method (`ca::join`).
pub const JOIN_REFUSALS_TOTAL: &str = "gateway_ca_join_refusals_total";
/// Reloads of the CA's signing root, root bundle and server certificate (`ca::reload`).
pub const RELOADS_TOTAL: &str = "gateway_ca_reloads_total";
/// `result` of [`RELOADS_TOTAL`].
pub const RELOAD_RESULTS: [&str; 2] = ["success", "error"];
/// The join methods, as the `method` label says them.
pub const JOIN_METHODS: [&str; 3] = ["token", "kubernetes", "aws-iam"];

/// Every metric of the CA: kind, HELP text, and the label values of labelled counters.
pub const METRICS: &[Metric] = &[
    Metric::counter(
        CERTIFICATES_ISSUED,
        "Workload certificates the CA signed for a node's pods (or its host identity).",
    ),
    Metric::counter(
        REFUSALS,
        "Certificate requests the CA refused (not a node, unknown pod, pod on another node, no host identity, name not allowed, bad request).",
    ),
    Metric::counter(
        SERVER_CERTIFICATES_ISSUED,
        "Server certificates the CA signed for nodes' client TLS (names on --server-names only).",
    ),
    Metric::counter(
        JOINS_TOTAL,
        "Node certificates the CA issued to joining or renewing nodes, by join method.",
    )
    .labelled("method", &JOIN_METHODS),
    Metric::counter(
        JOIN_REFUSALS_TOTAL,
        "Node joins the CA refused, by join method.",
    )
    .labelled("method", &JOIN_METHODS),
    Metric::counter(
        RELOADS_TOTAL,
        "Reloads of the CA's signing root and key, root bundle and server certificate after a file changed, by result: success, or error (the last good ones stay).",
    )
    .labelled("result", &RELOAD_RESULTS),
];

/// Describes every metric of the ca and registers its series at zero. Call once, after
/// the recorder is installed. The CA's pod directory may be a Kubernetes watch, whose
/// metrics [`super::identity::describe`] covers; `ca::run` calls both.
pub fn describe() {
    super::describe_all(METRICS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::{assert_described, scrape_after};

    #[test]
    fn every_ca_metric_has_help_and_a_zero_series() {
        let text = scrape_after(describe);
        assert_described(&text, METRICS);
    }
}
