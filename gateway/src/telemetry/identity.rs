//! The metrics of workload identity (`identity`): recorded wherever a pod directory watches
//! the Kubernetes API, which is the node agent and, with a Kubernetes directory, the CA.
//! Both have [`describe`] called after installing the recorder (the node through
//! [`super::node::describe`], the CA in `ca::run`).

use super::Metric;

/// List or watch calls on the Kubernetes API that failed (`identity::kube`); each is
/// retried after a backoff.
pub const KUBE_WATCH_ERRORS: &str = "gateway_kube_watch_errors_total";

/// Every metric of the identity: kind, HELP text, and the label values of labelled counters.
pub const METRICS: &[Metric] = &[Metric::counter(
    KUBE_WATCH_ERRORS,
    "Failed list or watch calls for pods on the Kubernetes API (a node's own, or every pod for the CA; each retried after a backoff).",
)];

/// Describes every metric of workload identity and registers its series at zero. Call once
/// per process, after the recorder is installed.
pub fn describe() {
    super::describe_all(METRICS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::{assert_described, scrape_after};

    #[test]
    fn the_watch_error_counter_has_help_and_a_zero_series() {
        let text = scrape_after(describe);
        assert_described(&text, METRICS);
    }
}
