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
    /// `node` is the node the workload certificate was issued to (the CA service binds its
    /// certificates to the asking node), not only the node's claim; written only when
    /// true. A bool, not the node's SPIFFE ID again: every session's state holds this.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub node_verified: bool,
    pub pod: Option<crate::pod::PodMeta>,
    pub database_route: Option<String>,
    /// `postgres` or `tcp` (the route's protocol as the node announced it).
    pub protocol: crate::route::Protocol,
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Duration;

    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;
    use crate::pod::PodMeta;
    use crate::route::Protocol;

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str) -> Self {
            let nonce: u64 = rand::random();
            Self(std::env::temp_dir().join(format!("db-gateway-audit-{name}-{nonce:016x}.jsonl")))
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
        fn events(&self) -> Vec<serde_json::Value> {
            std::fs::read_to_string(&self.0)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn session() -> SessionInfo {
        SessionInfo {
            session_id: "s-1".into(),
            identity: "spiffe://td/ns/team-a/sa/api".into(),
            node: Some("node-1".into()),
            node_verified: false,
            pod: Some(PodMeta {
                namespace: Some("team-a".into()),
                name: Some("api-0".into()),
                ..PodMeta::default()
            }),
            database_route: Some("main".into()),
            protocol: Protocol::Postgres,
            requested_user: Some("api".into()),
            requested_database: Some("app".into()),
            db_user: Some("api".into()),
            db_name: Some("app".into()),
            role: Some("team-a".into()),
            client_addr: Some("10.0.0.1:4000".into()),
            node_addr: "10.0.0.2:5000".into(),
            upstream_addr: None,
            upstream_reused: false,
        }
    }

    #[test]
    fn writes_one_json_line_per_event_with_the_session_fields() {
        let file = TempFile::new("fields");
        let log = AuditLog::open(file.path()).unwrap();
        log.session_start(&session(), &Outcome::default());
        let end = Outcome {
            error_code: Some("57P01".into()),
            error_message: Some("shutting down".into()),
            denied: false,
        };
        log.session_end(&session(), &end, 10, 2000, Duration::from_millis(1500));

        let mode = std::fs::metadata(&file.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        let events = file.events();
        assert_eq!(events.len(), 2);
        let (start, end) = (&events[0], &events[1]);
        assert_eq!(start["event"], "db.session.start");
        assert_eq!(end["event"], "db.session.end");
        for e in &events {
            // The session's fields, flattened into the event.
            assert_eq!(e["session_id"], "s-1");
            assert_eq!(e["identity"], "spiffe://td/ns/team-a/sa/api");
            assert_eq!(e["node"], "node-1");
            assert_eq!(e["pod"]["namespace"], "team-a");
            assert_eq!(e["pod"]["name"], "api-0");
            assert!(e["pod"].get("uid").is_none(), "{e}");
            assert_eq!(e["database_route"], "main");
            assert_eq!(e["protocol"], "postgres");
            assert_eq!(e["requested_user"], "api");
            assert_eq!(e["db_name"], "app");
            assert_eq!(e["role"], "team-a");
            assert_eq!(e["client_addr"], "10.0.0.1:4000");
            assert_eq!(e["node_addr"], "10.0.0.2:5000");
            assert!(e["upstream_addr"].is_null(), "{e}");
            assert!(
                e.get("upstream_reused").is_none(),
                "written only when true: {e}"
            );
            let time = e["time"].as_str().unwrap();
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|err| panic!("{time}: {err}"));
        }
        assert_eq!(start["result"], "success");
        for absent in [
            "error_code",
            "error_message",
            "bytes_client_to_server",
            "bytes_server_to_client",
            "duration_ms",
        ] {
            assert!(start.get(absent).is_none(), "{absent} in {start}");
        }
        assert_eq!(end["result"], "error");
        assert_eq!(end["error_code"], "57P01");
        assert_eq!(end["error_message"], "shutting down");
        assert_eq!(end["bytes_client_to_server"], 10);
        assert_eq!(end["bytes_server_to_client"], 2000);
        assert_eq!(end["duration_ms"], 1500.0);
    }

    #[test]
    fn results_say_denied_before_error_and_reuse_is_written_when_true() {
        let file = TempFile::new("results");
        let log = AuditLog::open(file.path()).unwrap();
        let denied = Outcome {
            error_code: Some("28000".into()),
            error_message: Some("no role allows it".into()),
            denied: true,
        };
        log.session_start(&session(), &denied);
        let reused = SessionInfo {
            upstream_reused: true,
            upstream_addr: Some("127.0.0.1:5432".into()),
            ..session()
        };
        log.session_start(&reused, &Outcome::default());
        let events = file.events();
        assert_eq!(events[0]["result"], "denied");
        assert_eq!(events[0]["error_code"], "28000");
        assert_eq!(events[1]["result"], "success");
        assert_eq!(events[1]["upstream_reused"], true);
        assert_eq!(events[1]["upstream_addr"], "127.0.0.1:5432");
    }

    #[test]
    fn appends_to_an_existing_file_and_lines_never_interleave() {
        let file = TempFile::new("append");
        std::fs::write(&file.0, "{\"earlier\":true}\n").unwrap();
        let log = AuditLog::open(file.path()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = &log;
                s.spawn(move || {
                    for i in 0..50 {
                        let info = SessionInfo {
                            session_id: format!("{t}-{i}"),
                            ..session()
                        };
                        log.session_start(&info, &Outcome::default());
                    }
                });
            }
        });
        let events = file.events();
        assert_eq!(events.len(), 1 + 4 * 50);
        assert_eq!(events[0]["earlier"], true);
        let mut ids: Vec<&str> = events[1..]
            .iter()
            .map(|e| e["session_id"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 200);
    }

    #[test]
    fn a_failed_write_is_counted_and_does_not_panic() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // /dev/full: every write fails with ENOSPC, as on a full disk.
        let log = AuditLog::open("/dev/full").unwrap();
        metrics::with_local_recorder(&recorder, || {
            log.session_start(&session(), &Outcome::default());
            log.session_end(&session(), &Outcome::default(), 0, 0, Duration::ZERO);
        });
        let text = handle.render();
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix("gateway_proxy_audit_write_errors_total "))
            .unwrap_or_else(|| panic!("no write error counter in:\n{text}"));
        assert_eq!(count.trim(), "2");
    }

    #[test]
    fn an_unwritable_path_fails_to_open() {
        let err = AuditLog::open("/nonexistent-dir/audit.jsonl")
            .err()
            .expect("no such directory");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
