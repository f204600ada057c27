//! The metrics of workload identity (`identity`): recorded wherever a pod directory watches
//! the Kubernetes API, which is the node agent and, with a Kubernetes directory, the CA.
//! Both have [`describe`] called after installing the recorder (the node through
//! [`super::node::describe`], the CA in `ca::run`).

/// List or watch calls on the Kubernetes API that failed (`identity::kube`); each is
/// retried after a backoff.
pub const KUBE_WATCH_ERRORS: &str = "gateway_kube_watch_errors_total";

/// Describes every metric of workload identity and registers its series at zero. Call once
/// per process, after the recorder is installed.
pub fn describe() {
    metrics::describe_counter!(
        KUBE_WATCH_ERRORS,
        metrics::Unit::Count,
        "Failed list or watch calls for this node's pods on the Kubernetes API (each retried after a backoff)."
    );
    metrics::counter!(KUBE_WATCH_ERRORS).increment(0);
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    #[test]
    fn the_watch_error_counter_has_help_and_a_zero_series() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        let scrape = handle.render();
        assert!(
            scrape.contains(&format!("# HELP {KUBE_WATCH_ERRORS} ")),
            "{scrape}"
        );
        assert!(
            scrape
                .lines()
                .any(|l| l == format!("{KUBE_WATCH_ERRORS} 0")),
            "{scrape}"
        );
    }
}
