//! The metrics of the proxy: names, HELP text, and zero values registered at start so that a
//! scrape shows every series before it first moves.
//!
//! Label values are listed here too (`*_RESULTS`, `*_REASONS`, …) so that each labelled
//! series can be registered at zero; the code that records a value uses the same words.

use super::Metric;

use crate::pg::sqlstate;

/// Connections whose TLS handshake with a node succeeded.
pub const CONNECTIONS_TOTAL: &str = "gateway_proxy_connections_total";
/// `accept(2)` failures on the proxy listener (EMFILE and friends).
pub const ACCEPT_ERRORS_TOTAL: &str = "gateway_proxy_accept_errors_total";
/// Refused TLS handshakes, by `reason`.
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "gateway_proxy_tls_handshake_failures_total";
/// Time of a successful TLS handshake with a node.
pub const TLS_HANDSHAKE_SECONDS: &str = "gateway_proxy_tls_handshake_seconds";
/// Warm tunnels closed because no preamble came within `tunnel_idle_timeout`.
pub const IDLE_TUNNELS_CLOSED_TOTAL: &str = "gateway_proxy_idle_tunnels_closed_total";
/// Tunnels that sent a preamble, until they end.
pub const ACTIVE_SESSIONS: &str = "gateway_proxy_active_sessions";
/// Warm tunnels waiting for a preamble.
pub const WAITING_TUNNELS: &str = "gateway_proxy_waiting_tunnels";
/// Sessions by `result` (`success`, `denied`, `error`).
pub const SESSIONS_TOTAL: &str = "gateway_proxy_sessions_total";
/// Refused sessions by the `sqlstate` the client (or the audit log) got.
pub const ERRORS_TOTAL: &str = "gateway_proxy_errors_total";
/// Time to log in to the database server (not counted for a reused server session).
pub const UPSTREAM_LOGIN_SECONDS: &str = "gateway_proxy_upstream_login_seconds";
/// Cancel requests by `result`.
pub const CANCEL_REQUESTS_TOTAL: &str = "gateway_proxy_cancel_requests_total";
/// Relayed bytes by `direction`.
pub const BYTES_TOTAL: &str = "gateway_proxy_bytes_total";
/// Kept server sessions (`upstream.reuse`): taken, refused or closed, by `result`.
pub const UPSTREAM_REUSE_TOTAL: &str = "gateway_proxy_upstream_reuse_total";
/// Server sessions kept for reuse right now.
pub const UPSTREAM_KEPT_SESSIONS: &str = "gateway_proxy_upstream_kept_sessions";
/// Audit events that could not be written.
pub const AUDIT_WRITE_ERRORS_TOTAL: &str = "gateway_proxy_audit_write_errors_total";
/// Audit records queued for the writer thread.
pub const AUDIT_QUEUE_DEPTH: &str = "gateway_proxy_audit_queue_depth";
/// New sessions refused because the audit queue was full (`when_full: refuse-new-sessions`).
pub const AUDIT_REFUSED_SESSIONS_TOTAL: &str = "gateway_proxy_audit_refused_sessions_total";
/// Sessions a previous run left open, closed at start-up.
pub const AUDIT_RECOVERED_SESSIONS_TOTAL: &str = "gateway_proxy_audit_recovered_sessions_total";
/// Database-client certificates the proxy issued itself for upstream logins.
pub const DB_CLIENT_CERTS_ISSUED_TOTAL: &str = "gateway_proxy_db_client_certs_issued_total";
/// Connections this process holds now (handshaking, waiting for a preamble, in session).
pub const OPEN_CONNECTIONS: &str = "gateway_proxy_open_connections";
/// Connections and sessions refused by a cap, by `reason`.
pub const LIMIT_REFUSALS_TOTAL: &str = "gateway_proxy_limit_refusals_total";
/// Upstream logins that did not finish within `upstream_login_timeout`.
pub const UPSTREAM_LOGIN_TIMEOUTS_TOTAL: &str = "gateway_proxy_upstream_login_timeouts_total";
/// Policy reloads by `result` (`success`, `error`).
pub const CONFIG_RELOADS_TOTAL: &str = "gateway_proxy_config_reloads_total";
/// Reloads of the proxy's own TLS files and database-client CA by `result`.
pub const TLS_RELOADS_TOTAL: &str = "gateway_proxy_tls_reloads_total";
/// The loaded configuration file's SHA-256 (label `sha256`, value 1).
pub const CONFIG_INFO: &str = "gateway_proxy_config_info";
/// `result` of [`CONFIG_RELOADS_TOTAL`].
pub const RELOAD_RESULTS: [&str; 2] = ["success", "error"];
/// RDS IAM tokens signed (first tokens and replacements of expiring ones).
pub const RDS_TOKENS_SIGNED_TOTAL: &str = "gateway_proxy_rds_tokens_signed_total";
/// Failed attempts to get AWS credentials from the provider chain.
pub const AWS_CREDENTIAL_FAILURES_TOTAL: &str = "gateway_proxy_aws_credential_failures_total";
/// Automatic database users changed (`proxy/provision.rs`), by action.
pub const DB_USER_CHANGES_TOTAL: &str = "gateway_proxy_db_user_changes_total";
/// Automatic database user changes that failed, by action.
pub const DB_USER_CHANGE_ERRORS_TOTAL: &str = "gateway_proxy_db_user_change_errors_total";
/// `action` of [`DB_USER_CHANGES_TOTAL`] and [`DB_USER_CHANGE_ERRORS_TOTAL`] (the audit
/// events' `db.user.<action>`).
pub const DB_USER_ACTIONS: [&str; 4] = ["create", "update", "deactivate", "drop"];

/// `result` of [`SESSIONS_TOTAL`].
pub const SESSION_RESULTS: [&str; 3] = ["success", "denied", "error"];
/// `reason` of [`TLS_HANDSHAKE_FAILURES_TOTAL`].
pub const HANDSHAKE_FAILURE_REASONS: [&str; 7] = [
    "eof",
    "no_client_certificate",
    "certificate_expired",
    "unknown_issuer",
    "handshake_error",
    "timeout",
    "no_identity",
];
/// `sqlstate` of [`ERRORS_TOTAL`] the proxy itself raises (a server's refused login
/// passes on the server's own code, which then appears when first seen).
pub const ERROR_SQLSTATES: [&str; 10] = [
    sqlstate::PROTOCOL_VIOLATION,
    sqlstate::FEATURE_NOT_SUPPORTED,
    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
    sqlstate::INVALID_CATALOG_NAME,
    sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
    sqlstate::CONNECTION_FAILURE,
    sqlstate::CONNECTION_EXCEPTION,
    sqlstate::INSUFFICIENT_PRIVILEGE,
    sqlstate::INSUFFICIENT_RESOURCES,
    sqlstate::TOO_MANY_CONNECTIONS,
];
/// `reason` of [`LIMIT_REFUSALS_TOTAL`]: the cap that refused.
pub const LIMIT_REASONS: [&str; 3] = ["max_connections", "identity", "route"];
/// `result` of [`CANCEL_REQUESTS_TOTAL`].
pub const CANCEL_RESULTS: [&str; 3] = ["forwarded", "upstream_error", "unknown_key"];
/// `direction` of [`BYTES_TOTAL`].
pub const DIRECTIONS: [&str; 2] = ["client_to_server", "server_to_client"];
/// `result` of [`UPSTREAM_REUSE_TOTAL`].
pub const REUSE_RESULTS: [&str; 7] = [
    "reused",
    "server_closed",
    "max_lifetime",
    "idle_timeout",
    "reset_failed",
    "full",
    "drain",
];

/// Every metric of the proxy: kind, HELP text, and the label values of labelled counters.
pub const METRICS: &[Metric] = &[
    Metric::counter(
        CONNECTIONS_TOTAL,
        "Tunnels from nodes whose TLS handshake succeeded.",
    ),
    Metric::counter(
        ACCEPT_ERRORS_TOTAL,
        "Failed accepts on the proxy listener (e.g. out of file descriptors).",
    ),
    Metric::counter(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "Refused or failed TLS handshakes with nodes, by reason.",
    )
    .labelled("reason", &HANDSHAKE_FAILURE_REASONS),
    Metric::histogram(
        TLS_HANDSHAKE_SECONDS,
        "Duration of successful TLS handshakes with nodes.",
    ),
    Metric::counter(
        IDLE_TUNNELS_CLOSED_TOTAL,
        "Warm tunnels closed because no preamble arrived within tunnel_idle_timeout.",
    ),
    Metric::gauge(
        ACTIVE_SESSIONS,
        "Tunnels that sent a preamble and have not ended.",
    ),
    Metric::gauge(
        WAITING_TUNNELS,
        "Warm tunnels from nodes waiting for an application connection.",
    ),
    Metric::counter(
        SESSIONS_TOTAL,
        "Sessions by result: success, denied (policy) or error.",
    )
    .labelled("result", &SESSION_RESULTS),
    Metric::counter(
        ERRORS_TOTAL,
        "Refused sessions by the SQLSTATE reported to the client and the audit log.",
    )
    .labelled("sqlstate", &ERROR_SQLSTATES),
    Metric::histogram(
        UPSTREAM_LOGIN_SECONDS,
        "Duration of certificate logins to database servers.",
    ),
    Metric::counter(
        CANCEL_REQUESTS_TOTAL,
        "Cancel requests by result: forwarded, upstream_error or unknown_key.",
    )
    .labelled("result", &CANCEL_RESULTS),
    Metric::counter(
        BYTES_TOTAL,
        "Bytes relayed between clients and servers, by direction.",
    )
    .labelled("direction", &DIRECTIONS),
    Metric::counter(
        UPSTREAM_REUSE_TOTAL,
        "Kept server sessions reused, refused or closed, by result.",
    )
    .labelled("result", &REUSE_RESULTS),
    Metric::gauge(
        UPSTREAM_KEPT_SESSIONS,
        "Server sessions kept open for reuse (upstream.reuse).",
    ),
    Metric::counter(
        AUDIT_WRITE_ERRORS_TOTAL,
        "Audit events that could not be written.",
    ),
    Metric::gauge(
        AUDIT_QUEUE_DEPTH,
        "Audit records waiting for the writer thread.",
    ),
    Metric::counter(
        AUDIT_REFUSED_SESSIONS_TOTAL,
        "New sessions refused because the audit queue was full (audit.when_full: refuse-new-sessions).",
    ),
    Metric::counter(
        AUDIT_RECOVERED_SESSIONS_TOTAL,
        "Sessions a previous run of the proxy left open in the audit file, closed at start-up.",
    ),
    Metric::counter(
        DB_CLIENT_CERTS_ISSUED_TOTAL,
        "Database-client certificates issued by the proxy for upstream logins.",
    ),
    Metric::gauge(
        OPEN_CONNECTIONS,
        "Connections the proxy process holds now: in their TLS handshake, waiting for a preamble, or in a session.",
    ),
    Metric::counter(
        LIMIT_REFUSALS_TOTAL,
        "Connections and sessions refused by a cap, by reason: max_connections, identity or route.",
    )
    .labelled("reason", &LIMIT_REASONS),
    Metric::counter(
        UPSTREAM_LOGIN_TIMEOUTS_TOTAL,
        "Upstream logins that did not finish within upstream_login_timeout.",
    ),
    Metric::counter(
        CONFIG_RELOADS_TOTAL,
        "Policy reloads (SIGHUP or a changed file) by result: success, or error (the last good policy stays).",
    )
    .labelled("result", &RELOAD_RESULTS),
    Metric::counter(
        TLS_RELOADS_TOTAL,
        "Reloads of the proxy's TLS files (server certificate, key, client CA) and database-client CA after they changed, by result: success, or error (the last good ones stay).",
    )
    .labelled("result", &RELOAD_RESULTS),
    Metric::gauge(
        CONFIG_INFO,
        "The loaded configuration file's SHA-256 in the label sha256 (value 1).",
    )
    .labelled("sha256", &[]),
    Metric::counter(
        RDS_TOKENS_SIGNED_TOTAL,
        "RDS IAM authentication tokens signed (one per database endpoint, user and region, replaced before expiry).",
    ),
    Metric::counter(
        AWS_CREDENTIAL_FAILURES_TOTAL,
        "Failed attempts to get AWS credentials for RDS IAM tokens from the provider chain.",
    ),
    Metric::counter(
        DB_USER_CHANGES_TOTAL,
        "Automatic database users changed, by action: create, update, deactivate or drop.",
    )
    .labelled("action", &DB_USER_ACTIONS),
    Metric::counter(
        DB_USER_CHANGE_ERRORS_TOTAL,
        "Automatic database user changes that failed, by action: create, update, deactivate or drop.",
    )
    .labelled("action", &DB_USER_ACTIONS),
];

/// Describes every metric of the proxy and registers its series at zero. Call once, after
/// the recorder is installed.
pub fn describe() {
    super::describe_all(METRICS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::testing::{assert_described, scrape_after};

    #[test]
    fn a_scrape_after_describe_has_help_and_a_zero_for_every_series() {
        let text = scrape_after(describe);
        for m in METRICS {
            assert!(m.name.starts_with("gateway_proxy_"), "{}", m.name);
        }
        assert_described(&text, METRICS);
    }
}
