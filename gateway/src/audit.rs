//! The audit log: one JSON object per line, `db.session.start` and `db.session.end` for
//! every session the proxy accepted a TLS handshake for (allowed or not), and `db.cancel`
//! for every cancel request.
//!
//! Every admitted session gets exactly one end record: when it ends, when the drain grace
//! period runs out first ([`AuditLog::close_open`]), and, after a crash, at the next start-up
//! (`recover.rs`). Lines are written by one writer thread from a bounded queue
//! (`writer.rs`), each batch with one `write` on an `O_APPEND` file, so lines never
//! interleave and a stalled sink stalls no session.

mod recover;
mod writer;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{AuditConfig, AuditWhenFull};
use crate::pg::sqlstate;
use crate::telemetry::proxy::{AUDIT_RECOVERED_SESSIONS_TOTAL, AUDIT_REFUSED_SESSIONS_TOTAL};

pub use recover::RECOVERED_MESSAGE;

pub struct AuditLog {
    writer: writer::Writer,
    when_full: AuditWhenFull,
    /// Sessions started with success and not ended yet, for [`AuditLog::close_open`].
    open: Mutex<HashMap<String, (SessionInfo, Instant)>>,
    /// Set by `close_open`: a session task that still runs after it must not write a
    /// second end record.
    closed: AtomicBool,
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

/// A cancel request: who sent it and what became of it.
#[derive(Debug, Serialize)]
pub struct CancelEvent<'a> {
    /// The id of the tunnel that carried the request (not of the session it cancels: an
    /// unknown key names none, and a known one is not told to the requester).
    pub session_id: &'a str,
    pub identity: &'a str,
    pub node: Option<&'a str>,
    pub client_addr: Option<&'a str>,
    pub node_addr: &'a str,
    /// `forwarded`, `upstream_error` or `unknown_key` (as the metric's `result`).
    pub result: &'a str,
}

/// A change to an automatic database user (`db.user.create`, `db.user.update`,
/// `db.user.deactivate`, `db.user.drop`): whose session made it and what it did.
#[derive(Debug, Serialize)]
pub struct DbUserEvent<'a> {
    /// `create`, `update`, `deactivate` or `drop` (the event is `db.user.<action>`).
    #[serde(skip)]
    pub action: &'a str,
    pub session_id: &'a str,
    pub identity: &'a str,
    pub database_route: &'a str,
    pub db_user: &'a str,
    /// The roles the user holds after the change (granted or kept).
    pub roles: &'a [String],
    /// Roles granted and revoked by this change.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub granted: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub revoked: &'a [String],
    /// `success` or `error`.
    pub result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<&'a str>,
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
    /// `-` is standard output; anything else a file opened for append (mode 0640), with the
    /// default queue and `when_full` policy.
    pub fn open(path: &str) -> std::io::Result<Self> {
        Self::from_config(&AuditConfig {
            path: path.to_owned(),
            ..AuditConfig::default()
        })
    }

    fn with_sink(sink: Box<dyn Write + Send>, cfg: &AuditConfig) -> std::io::Result<Self> {
        Ok(Self {
            writer: writer::Writer::spawn(
                sink,
                cfg.queue.clamp(2, crate::config::MAX_AUDIT_QUEUE),
            )?,
            when_full: cfg.when_full,
            open: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        })
    }

    /// Opens the sink, closes what a previous run left open (a file only), and starts the
    /// writer thread.
    pub fn from_config(cfg: &AuditConfig) -> std::io::Result<Self> {
        let path = cfg.path.as_str();
        let sink: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            let owed = recover::owed_ends(std::path::Path::new(path))?;
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)?;
            if recover::ends_mid_line(std::path::Path::new(path))? {
                file.write_all(b"\n")?;
            }
            if !owed.is_empty() {
                let mut lines = Vec::new();
                for e in &owed {
                    serde_json::to_writer(&mut lines, e)?;
                    lines.push(b'\n');
                }
                file.write_all(&lines)?;
                file.sync_data()?;
                metrics::counter!(AUDIT_RECOVERED_SESSIONS_TOTAL).increment(owed.len() as u64);
                tracing::warn!(
                    sessions = owed.len(),
                    path,
                    "audit log: closed sessions a previous run left open"
                );
            }
            Box::new(file)
        };
        Self::with_sink(sink, cfg)
    }

    /// Whether a new session may start: under `when_full: refuse-new-sessions`, not while
    /// the queue is more than half full (the rest is room for the records already owed).
    /// A refusal is counted, and recorded in the half of the queue kept free.
    pub fn admits(&self) -> bool {
        let ok = self.when_full == AuditWhenFull::Block || self.writer.has_room();
        if !ok {
            metrics::counter!(AUDIT_REFUSED_SESSIONS_TOTAL).increment(1);
        }
        ok
    }

    pub fn session_start(&self, s: &SessionInfo, outcome: &Outcome) {
        if outcome.result() == "success" {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.insert(s.session_id.clone(), (s.clone(), Instant::now()));
        }
        self.write(&Event {
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
        duration: Duration,
    ) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&s.session_id);
        if self.closed.load(Ordering::Acquire) {
            // close_open wrote this session's end already (or the session started after
            // it, which the shutdown order rules out).
            tracing::debug!(session = %s.session_id, "audit log closed; end already recorded");
            return;
        }
        self.end(s, outcome, Some((bytes_up, bytes_down)), duration);
    }

    fn end(&self, s: &SessionInfo, outcome: &Outcome, bytes: Option<(u64, u64)>, d: Duration) {
        self.write(&Event {
            event: "db.session.end",
            time: now_rfc3339(),
            session: s,
            result: outcome.result(),
            error_code: outcome.error_code.as_deref(),
            error_message: outcome.error_message.as_deref(),
            bytes_client_to_server: bytes.map(|b| b.0),
            bytes_server_to_client: bytes.map(|b| b.1),
            duration_ms: Some(d.as_secs_f64() * 1000.0),
        });
    }

    /// Writes the end of every session still open (`reason` as its message, SQLSTATE
    /// 57P01 as PostgreSQL's own shutdown), then waits until the queue is written. Called
    /// once the proxy's threads have stopped: after the drain grace period, sessions left
    /// are closed by the process exit, and this is their record.
    pub fn close_open(&self, reason: &str) -> usize {
        self.closed.store(true, Ordering::Release);
        let open: Vec<(SessionInfo, Instant)> = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.drain().map(|(_, v)| v).collect()
        };
        let outcome = Outcome {
            error_code: Some(sqlstate::ADMIN_SHUTDOWN.into()),
            error_message: Some(reason.into()),
            denied: false,
        };
        for (s, started) in &open {
            self.end(s, &outcome, None, started.elapsed());
        }
        self.flush();
        open.len()
    }

    /// A `db.cancel` record.
    pub fn cancel(&self, c: &CancelEvent<'_>) {
        #[derive(Serialize)]
        struct Cancel<'a> {
            event: &'static str,
            time: String,
            #[serde(flatten)]
            cancel: &'a CancelEvent<'a>,
        }
        self.write(&Cancel {
            event: "db.cancel",
            time: now_rfc3339(),
            cancel: c,
        });
    }

    /// A `db.user.<action>` record.
    pub fn db_user(&self, u: &DbUserEvent<'_>) {
        #[derive(Serialize)]
        struct DbUser<'a> {
            event: String,
            time: String,
            #[serde(flatten)]
            user: &'a DbUserEvent<'a>,
        }
        self.write(&DbUser {
            event: format!("db.user.{}", u.action),
            time: now_rfc3339(),
            user: u,
        });
    }

    /// Records the writer failed to write (also counted in the metric).
    pub fn write_errors(&self) -> u64 {
        self.writer.errors()
    }

    /// Waits until every record queued so far is written.
    pub fn flush(&self) {
        self.writer.flush();
    }

    fn write(&self, e: &impl Serialize) {
        let Ok(mut line) = serde_json::to_vec(e) else {
            return;
        };
        line.push(b'\n');
        self.writer.send(line);
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Duration;

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

        log.flush();
        let mode = std::fs::metadata(&file.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        log.flush();
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
        log.flush();
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
        log.flush();
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
        // /dev/full: every write fails with ENOSPC, as on a full disk.
        let log = AuditLog::open("/dev/full").unwrap();
        log.session_start(&session(), &Outcome::default());
        log.flush();
        log.session_end(&session(), &Outcome::default(), 0, 0, Duration::ZERO);
        log.flush();
        assert_eq!(log.write_errors(), 2);
    }

    #[test]
    fn hardening_11_every_started_session_gets_exactly_one_end_at_shutdown() {
        let file = TempFile::new("close");
        let log = AuditLog::open(file.path()).unwrap();
        let a = SessionInfo {
            session_id: "a".into(),
            ..session()
        };
        let b = SessionInfo {
            session_id: "b".into(),
            ..session()
        };
        let denied = SessionInfo {
            session_id: "d".into(),
            ..session()
        };
        log.session_start(&a, &Outcome::default());
        log.session_start(&b, &Outcome::default());
        let refusal = Outcome {
            error_code: Some("28000".into()),
            error_message: None,
            denied: true,
        };
        log.session_start(&denied, &refusal);
        log.session_end(&denied, &refusal, 0, 0, Duration::ZERO);
        log.session_end(&a, &Outcome::default(), 1, 2, Duration::from_millis(3));
        assert_eq!(log.close_open("drain grace over"), 1);
        // A task that still finished after shutdown writes no second end.
        log.session_end(&b, &Outcome::default(), 1, 2, Duration::from_millis(3));
        log.flush();
        let ends: Vec<(String, Option<String>)> = file
            .events()
            .iter()
            .filter(|e| e["event"] == "db.session.end")
            .map(|e| {
                (
                    e["session_id"].as_str().unwrap().to_owned(),
                    e["error_code"].as_str().map(str::to_owned),
                )
            })
            .collect();
        assert_eq!(
            ends,
            [
                ("d".to_owned(), Some("28000".to_owned())),
                ("a".to_owned(), None),
                ("b".to_owned(), Some("57P01".to_owned())),
            ]
        );
        let b_end = file.events().into_iter().last().unwrap();
        assert_eq!(b_end["error_message"], "drain grace over");
        assert!(b_end.get("bytes_client_to_server").is_none(), "{b_end}");
    }

    #[test]
    fn hardening_11_a_crash_left_open_session_is_closed_at_the_next_start() {
        let file = TempFile::new("recover");
        {
            let log = AuditLog::open(file.path()).unwrap();
            for id in ["a", "b", "c"] {
                let s = SessionInfo {
                    session_id: id.into(),
                    ..session()
                };
                log.session_start(&s, &Outcome::default());
            }
            let b = SessionInfo {
                session_id: "b".into(),
                ..session()
            };
            log.session_end(&b, &Outcome::default(), 0, 0, Duration::ZERO);
            log.flush();
        }
        // The crash cut the last line in half.
        let mut f = OpenOptions::new().append(true).open(&file.0).unwrap();
        f.write_all(b"{\"event\":\"db.session.st").unwrap();
        drop(f);
        let log = AuditLog::open(file.path()).unwrap();
        log.flush();
        let text = std::fs::read_to_string(&file.0).unwrap();
        let recovered: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["recovered"] == true)
            .collect();
        let ids: Vec<&str> = recovered
            .iter()
            .map(|e| e["session_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "c"]);
        for e in &recovered {
            assert_eq!(e["event"], "db.session.end");
            assert_eq!(e["result"], "error");
            assert_eq!(e["error_code"], "08006");
            assert_eq!(e["error_message"], RECOVERED_MESSAGE);
            assert_eq!(e["identity"], "spiffe://td/ns/team-a/sa/api");
        }
        drop(log);
        // Opening again owes nothing more.
        let before = std::fs::read_to_string(&file.0).unwrap().lines().count();
        AuditLog::open(file.path()).unwrap().flush();
        assert_eq!(
            std::fs::read_to_string(&file.0).unwrap().lines().count(),
            before
        );
    }

    /// A sink that takes nothing until released, like a stdout pipe nobody reads.
    struct Stalled(
        std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>,
        std::sync::Arc<Mutex<Vec<u8>>>,
    );

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn hardening_11_a_stalled_sink_refuses_new_sessions_and_loses_no_record() {
        for when_full in [AuditWhenFull::RefuseNewSessions, AuditWhenFull::Block] {
            let gate = std::sync::Arc::new((Mutex::new(false), std::sync::Condvar::new()));
            let out = std::sync::Arc::new(Mutex::new(Vec::new()));
            let cfg = AuditConfig {
                path: "-".into(),
                queue: 8,
                when_full,
            };
            let log =
                AuditLog::with_sink(Box::new(Stalled(gate.clone(), out.clone())), &cfg).unwrap();
            assert!(log.admits());
            // The writer takes the first line and stalls on it; the queue then fills.
            for i in 0..6 {
                let s = SessionInfo {
                    session_id: format!("s{i}"),
                    ..session()
                };
                log.session_start(&s, &Outcome::default());
            }
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                log.admits(),
                when_full == AuditWhenFull::Block,
                "{when_full:?}"
            );
            *gate.0.lock().unwrap() = true;
            gate.1.notify_all();
            log.flush();
            assert!(log.admits());
            let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
            assert_eq!(text.lines().count(), 6, "{text}");
        }
    }

    #[test]
    fn an_unwritable_path_fails_to_open() {
        let err = AuditLog::open("/nonexistent-dir/audit.jsonl")
            .err()
            .expect("no such directory");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
