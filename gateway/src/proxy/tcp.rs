//! Sessions on `tcp` routes: plain L4 after the same identity, policy and audit as
//! PostgreSQL sessions ([`accept`](super::accept) already checked that the route is a tcp
//! one). The client is not a PostgreSQL client, so a refusal is a closed connection; the
//! reason goes to the audit log (see [`refuse`](super::refuse)) and to the proxy's log.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Shared;
use super::opened::{Client, Opened};
use super::refuse::{self, Answer, Refusal};
use super::relay::{Counters, copy_plain};
use crate::audit::{Outcome, SessionInfo};
use crate::pg::{ErrorResponse, sqlstate};
use crate::telemetry::proxy::{BYTES_TOTAL, SESSIONS_TOTAL};

/// Why a tcp session did not start.
#[derive(Debug, thiserror::Error)]
pub(super) enum TcpError<'a> {
    /// The policy said no.
    #[error("{}", .0.message)]
    Denied(ErrorResponse),
    #[error("cannot reach {address}: {source}")]
    Unreachable {
        address: &'a str,
        source: std::io::Error,
    },
    #[error("timeout connecting to {address} after {after:?}")]
    ConnectTimeout { address: &'a str, after: Duration },
}

impl TcpError<'_> {
    /// What the audit log records (the client only sees its connection close).
    pub(super) fn into_refusal(self) -> Refusal {
        match self {
            TcpError::Denied(error) => Refusal {
                error,
                denied: true,
            },
            e @ (TcpError::Unreachable { .. } | TcpError::ConnectTimeout { .. }) => {
                ErrorResponse::fatal(sqlstate::UNABLE_TO_ESTABLISH_CONNECTION, e.to_string()).into()
            }
        }
    }
}

/// Logs `e` and returns its refusal to await. Not async, and taking `e` by value: an
/// error kept in scope across the refusal's `await` would stay in the session's future.
fn refused<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    info: &'a SessionInfo,
    e: TcpError<'_>,
    started: Instant,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    let session = &info.session_id;
    let route = info.database_route.as_deref().unwrap_or_default();
    match &e {
        TcpError::Denied(_) => {
            tracing::info!(%session, identity = %info.identity, %route, reason = %e, "tcp session refused")
        }
        _ => tracing::warn!(%session, %route, %e, "tcp upstream connect failed"),
    }
    let refusal = e.into_refusal();
    refuse::refuse(&shared.audit, client, info, refusal, Answer::Close, started)
}

pub(super) async fn handle(
    shared: &Arc<Shared>,
    opened: Box<Opened>,
    _drain: watch::Receiver<bool>,
) {
    let Opened {
        mut client,
        identity,
        mut info,
        started,
        active: _active,
        ..
    } = *opened;
    let identity = &identity;
    let route = info.database_route.clone().unwrap_or_default();
    // The refusal made before it is awaited, in a block: the policy's error is then not
    // kept in this future for the session's life.
    let (db, role) = {
        let decided = match shared.policy.load().decide_tcp(identity, &route) {
            Ok(d) => Ok(d),
            Err(error) => {
                let e = TcpError::Denied(error);
                Err(refused(shared, &mut client, &info, e, started))
            }
        };
        match decided {
            Ok(d) => d,
            Err(refusing) => return refusing.await,
        }
    };
    info.role = Some(role);

    let address = db.upstream.address.as_str();
    let after = shared.cfg.upstream_connect_timeout;
    let connect = tokio::time::timeout(after, TcpStream::connect(address)).await;
    let upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            let e = TcpError::Unreachable { address, source };
            return refused(shared, &mut client, &info, e, started).await;
        }
        Err(_) => {
            let e = TcpError::ConnectTimeout { address, after };
            return refused(shared, &mut client, &info, e, started).await;
        }
    };
    let _ = upstream.set_nodelay(true);
    info.upstream_addr = upstream.peer_addr().ok().map(|a| a.to_string());
    let outcome = Outcome::default();
    shared.audit.session_start(&info, &outcome);
    metrics::counter!(SESSIONS_TOTAL, "result" => "success").increment(1);
    tracing::info!(session = %info.session_id, %identity, %route, "tcp session started");

    // Both directions to their ends (either side may half-close first); an error on one
    // ends both. A proxy drain leaves these sessions to the grace period: plain bytes
    // have no boundary at which ending them is safe.
    let counters = Counters::default();
    let (client_r, client_w) = tokio::io::split(client);
    let (up_r, up_w) = upstream.into_split();
    let result = tokio::try_join!(
        copy_plain(
            client_r,
            up_w,
            &counters.client_to_server,
            metrics::counter!(BYTES_TOTAL, "direction" => "client_to_server"),
        ),
        copy_plain(
            up_r,
            client_w,
            &counters.server_to_client,
            metrics::counter!(BYTES_TOTAL, "direction" => "server_to_client"),
        ),
    );
    if let Err(e) = &result {
        tracing::debug!(session = %info.session_id, %e, "tcp relay ended with an error");
    }
    shared.audit.session_end(
        &info,
        &Outcome::default(),
        counters.client_to_server(),
        counters.server_to_client(),
        started.elapsed(),
    );
    tracing::info!(session = %info.session_id, "tcp session ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_refusal_keeps_its_error_and_is_denied() {
        let error = ErrorResponse::fatal("28000", "db-gateway: no").with_hint("ask");
        let r = TcpError::Denied(error.clone()).into_refusal();
        assert!(r.denied);
        assert_eq!(r.error, error);
    }

    #[tokio::test]
    async fn connect_failures_are_audited_as_unable_to_establish_connection() {
        // A real refused connect (nothing listens on port 1).
        let source = TcpStream::connect("127.0.0.1:1").await.unwrap_err();
        let text = source.to_string();
        let r = TcpError::Unreachable {
            address: "127.0.0.1:1",
            source,
        }
        .into_refusal();
        assert!(!r.denied);
        assert_eq!(
            r.error,
            ErrorResponse::fatal("08001", format!("cannot reach 127.0.0.1:1: {text}"))
        );
        let r = TcpError::ConnectTimeout {
            address: "db:5432",
            after: Duration::from_secs(3),
        }
        .into_refusal();
        assert_eq!(
            r.error,
            ErrorResponse::fatal("08001", "timeout connecting to db:5432 after 3s")
        );
    }
}
