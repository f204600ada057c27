//! The metrics of workload identity (`identity`): recorded wherever a pod directory watches
//! the Kubernetes API, which is the node agent and, with a Kubernetes directory, the CA.
//! Both call [`describe`] after installing the recorder.

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
