//! The audit log: one JSON object per line, `db.session.start` and `db.session.end` for
//! every session the proxy accepted a TLS handshake for (allowed or not).
//!
//! Each event is written with a single `write` on an `O_APPEND` file, so lines from
//! concurrent sessions never interleave and a crash loses at most the event in flight.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Mutex;

use serde::Serialize;

pub struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

/// Fields common to both events of a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub session_id: String,
    pub identity: String,
    pub node: Option<String>,
    pub pod: Option<crate::tunnel::PodMeta>,
    pub database_route: Option<String>,
    /// `postgres` or `tcp` (the route's protocol as the node announced it).
    pub protocol: crate::config::Protocol,
    /// What the client asked for in its startup packet.
    pub requested_user: Option<String>,
    pub requested_database: Option<String>,
    /// What the policy decided.
    pub db_user: Option<String>,
    pub db_name: Option<String>,
    pub role: Option<String>,
    pub client_addr: Option<String>,
    pub node_addr: String,
    pub upstream_addr: Option<String>,
    /// The server session was kept from an earlier client session (`upstream.reuse`)
    /// instead of logged in for this one; written only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub upstream_reused: bool,
}

#[derive(Debug, Serialize)]
struct Event<'a> {
    event: &'static str,
    time: String,
    #[serde(flatten)]
    session: &'a SessionInfo,
    /// `success`, `denied` or `error`.
    result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_client_to_server: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_server_to_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<f64>,
}

/// How a session ended (or failed to start), for both events.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub denied: bool,
}

impl Outcome {
    fn result(&self) -> &'static str {
        match (self.denied, &self.error_code) {
            (true, _) => "denied",
            (false, Some(_)) => "error",
            (false, None) => "success",
        }
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl AuditLog {
    /// `-` is standard output; anything else a file opened for append (mode 0640).
    pub fn open(path: &str) -> std::io::Result<Self> {
        let sink: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o640)
                    .open(path)?,
            )
        };
        Ok(Self {
            sink: Mutex::new(sink),
        })
    }

    pub fn session_start(&self, s: &SessionInfo, outcome: &Outcome) {
        self.emit(&Event {
            event: "db.session.start",
            time: now_rfc3339(),
            session: s,
            result: outcome.result(),
            error_code: outcome.error_code.as_deref(),
            error_message: outcome.error_message.as_deref(),
            bytes_client_to_server: None,
            bytes_server_to_client: None,
            duration_ms: None,
        });
    }

    pub fn session_end(
        &self,
        s: &SessionInfo,
        outcome: &Outcome,
        bytes_up: u64,
        bytes_down: u64,
        duration: std::time::Duration,
    ) {
        self.emit(&Event {
            event: "db.session.end",
            time: now_rfc3339(),
            session: s,
            result: outcome.result(),
            error_code: outcome.error_code.as_deref(),
            error_message: outcome.error_message.as_deref(),
            bytes_client_to_server: Some(bytes_up),
            bytes_server_to_client: Some(bytes_down),
            duration_ms: Some(duration.as_secs_f64() * 1000.0),
        });
    }

    fn emit(&self, e: &Event<'_>) {
        let Ok(mut line) = serde_json::to_vec(e) else {
            return;
        };
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = sink.write_all(&line).and_then(|()| sink.flush()) {
            metrics::counter!(crate::telemetry::proxy::AUDIT_WRITE_ERRORS_TOTAL).increment(1);
            tracing::error!(%err, "failed to write audit event");
        }
    }
}
