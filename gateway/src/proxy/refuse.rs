//! The end of a refused session, one copy for both session kinds: the error counted, one
//! `db.session.start`/`db.session.end` pair in the audit log, and the client told - with an
//! `ErrorResponse` when it speaks PostgreSQL, by a closed connection on a `tcp` route (its
//! client would not understand one; the audit log still gets the SQLSTATE a PostgreSQL
//! session would have got, so both kinds read alike).

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use tokio::io::AsyncWriteExt;

use super::opened::Client;
use crate::audit::{AuditLog, Outcome, SessionInfo};
use crate::pg::ErrorResponse;
use crate::route::Protocol;
use crate::telemetry::proxy::{ERRORS_TOTAL, SESSIONS_TOTAL};

/// Why a session could not start, as the client and the audit log see it.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) error: ErrorResponse,
    /// Refused by policy (audited as `denied`), not by an error.
    pub(super) denied: bool,
}

impl From<ErrorResponse> for Refusal {
    fn from(error: ErrorResponse) -> Self {
        Self {
            error,
            denied: false,
        }
    }
}

/// How the client learns of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// The `ErrorResponse`, then close.
    ErrorResponse,
    /// Close only (TLS close_notify + FIN: the node closes the application's connection).
    Close,
}

impl Answer {
    /// What a client of a route with `protocol` can read.
    pub(super) fn for_protocol(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Postgres => Answer::ErrorResponse,
            Protocol::Tcp => Answer::Close,
        }
    }
}

/// Answers and audits a refused session. Boxed here rather than at each call: a refusal
/// is rare, and inline its future would enlarge every session's task.
pub(super) fn refuse<'a>(
    audit: &'a AuditLog,
    client: &'a mut Client,
    info: &'a SessionInfo,
    refusal: Refusal,
    answer: Answer,
    started: Instant,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(refuse_now(audit, client, info, refusal, answer, started))
}

async fn refuse_now(
    audit: &AuditLog,
    client: &mut Client,
    info: &SessionInfo,
    refusal: Refusal,
    answer: Answer,
    started: Instant,
) {
    let Refusal { error, denied } = refusal;
    // Encoded first, so that the audit record can take the code and message.
    let bytes = (answer == Answer::ErrorResponse).then(|| error.encode());
    error_counter(&error.sqlstate);
    let result = if denied { "denied" } else { "error" };
    metrics::counter!(SESSIONS_TOTAL, "result" => result).increment(1);
    let outcome = Outcome {
        error_code: Some(error.sqlstate),
        error_message: Some(error.message),
        denied,
    };
    audit.session_start(info, &outcome);
    close(client, bytes.as_deref()).await;
    audit.session_end(info, &outcome, 0, 0, started.elapsed());
}

/// Sends `e` and closes: for a failure before there is a session to audit.
pub(super) async fn send_error(client: &mut Client, e: &ErrorResponse) {
    close(client, Some(&e.encode())).await;
}

async fn close(client: &mut Client, last: Option<&[u8]>) {
    if let Some(bytes) = last {
        let _ = client.write_all(bytes).await;
        let _ = client.flush().await;
    }
    let _ = client.shutdown().await;
}

fn error_counter(code: &str) {
    metrics::counter!(ERRORS_TOTAL, "sqlstate" => code.to_owned()).increment(1);
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::pg::sqlstate;
    use crate::pki::SpiffeId;
    use crate::proxy::testing::{self, Pki, TRUST_DOMAIN};

    /// Refuses a real tunnel: what the node read, and the audit log's events.
    async fn refused(
        refusal: Refusal,
        answer: Answer,
        protocol: Protocol,
    ) -> (Vec<u8>, Vec<serde_json::Value>) {
        let pki = Pki::new(TRUST_DOMAIN);
        let shared = testing::shared(&pki, "127.0.0.1:1".parse().unwrap());
        let id = SpiffeId::new(TRUST_DOMAIN, "apps", "web");
        let connector = pki.node_connector(&id, &pki);
        let (mut server, mut node) = testing::tunnel(&shared, &connector).await;
        let path = pki.dir.path().join("refusals.log");
        let audit = AuditLog::open(path.to_str().unwrap()).unwrap();
        let info = testing::info(&id, "kv", protocol);
        let reading = async {
            let mut got = Vec::new();
            node.read_to_end(&mut got).await.unwrap();
            got
        };
        let started = Instant::now();
        let ((), got) = tokio::join!(
            refuse(&audit, &mut server, &info, refusal, answer, started),
            reading
        );
        (got, testing::audit_events(&audit, &path))
    }

    fn assert_pair(events: &[serde_json::Value], result: &str, code: &str, message: &str) {
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0]["event"], "db.session.start");
        assert_eq!(events[1]["event"], "db.session.end");
        for e in events {
            assert_eq!(e["result"], result);
            assert_eq!(e["error_code"], code);
            assert_eq!(e["error_message"], message);
            assert_eq!(e["session_id"], "0123456789abcdef0123456789abcdef");
            assert_eq!(e["identity"], "spiffe://unit.test/ns/apps/sa/web");
        }
        assert!(events[0].get("bytes_client_to_server").is_none());
        assert_eq!(events[1]["bytes_client_to_server"], 0);
        assert_eq!(events[1]["bytes_server_to_client"], 0);
        assert!(events[1]["duration_ms"].as_f64().unwrap() >= 0.0);
    }

    #[tokio::test]
    async fn a_postgres_client_reads_the_error_response_and_one_pair_is_audited() {
        let error = ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, "db-gateway: nope")
            .with_hint("Do it right.");
        let (got, events) = refused(
            error.clone().into(),
            Answer::ErrorResponse,
            Protocol::Postgres,
        )
        .await;
        assert_eq!(got, error.encode());
        assert_pair(&events, "error", "08P01", "db-gateway: nope");
        assert_eq!(events[0]["protocol"], "postgres");
    }

    #[tokio::test]
    async fn a_policy_refusal_is_audited_as_denied() {
        let error = ErrorResponse::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "db-gateway: not you",
        );
        let refusal = Refusal {
            error: error.clone(),
            denied: true,
        };
        let (got, events) = refused(refusal, Answer::ErrorResponse, Protocol::Postgres).await;
        assert_eq!(got, error.encode());
        assert_pair(&events, "denied", "28000", "db-gateway: not you");
    }

    #[tokio::test]
    async fn a_tcp_client_sees_only_the_close_but_the_audit_has_the_reason() {
        let error =
            ErrorResponse::fatal(sqlstate::UNABLE_TO_ESTABLISH_CONNECTION, "cannot reach x");
        let (got, events) = refused(error.into(), Answer::Close, Protocol::Tcp).await;
        assert!(got.is_empty(), "{got:?}");
        assert_pair(&events, "error", "08001", "cannot reach x");
        assert_eq!(events[0]["protocol"], "tcp");
    }

    #[test]
    fn the_answer_follows_the_protocol() {
        assert_eq!(
            Answer::for_protocol(Protocol::Postgres),
            Answer::ErrorResponse
        );
        assert_eq!(Answer::for_protocol(Protocol::Tcp), Answer::Close);
    }
}
