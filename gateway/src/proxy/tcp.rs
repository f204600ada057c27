//! Sessions on `tcp` routes: plain L4 after the same identity, policy and audit as
//! PostgreSQL sessions. The client is not a PostgreSQL client, so a refusal is a closed
//! connection; the reason goes to the audit log (with the SQLSTATE a PostgreSQL session
//! would have got, so both kinds read alike) and to the proxy's log.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use super::Shared;
use super::relay::{Counters, copy_plain};
use super::session::{Opened, error_counter};
use crate::audit::{Outcome, SessionInfo};
use crate::config::Protocol;
use crate::pg::sqlstate;

pub async fn handle(shared: &Arc<Shared>, opened: Box<Opened>, _drain: watch::Receiver<bool>) {
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
    let refuse = |code: &str, message: String, denied: bool| Outcome {
        error_code: Some(code.to_owned()),
        error_message: Some(message),
        denied,
    };
    let decided = match shared.policy.database(&route).map(|d| d.protocol) {
        Some(Protocol::Tcp) => shared
            .policy
            .decide_tcp(identity, &route)
            .map_err(|e| refuse(&e.sqlstate, e.message, true)),
        Some(Protocol::Postgres) => Err(refuse(
            sqlstate::CONNECTION_EXCEPTION,
            format!("route \"{route}\" is a postgres route, but the node sent a tcp connection"),
            false,
        )),
        None => Err(refuse(
            sqlstate::INVALID_CATALOG_NAME,
            format!("route \"{route}\" is not configured on the proxy"),
            false,
        )),
    };
    let (db, role) = match decided {
        Ok(d) => d,
        Err(outcome) => {
            tracing::info!(session = %info.session_id, %identity, %route, reason = ?outcome.error_message, "tcp session refused");
            return refused(shared, &mut client, &info, outcome, started).await;
        }
    };
    info.role = Some(role);

    let address = &db.upstream.address;
    let connect = tokio::time::timeout(
        shared.cfg.upstream_connect_timeout,
        TcpStream::connect(address.as_str()),
    )
    .await;
    let upstream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let o = refuse(
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                format!("cannot reach {address}: {e}"),
                false,
            );
            tracing::warn!(session = %info.session_id, %route, %address, %e, "tcp upstream unreachable");
            return refused(shared, &mut client, &info, o, started).await;
        }
        Err(_) => {
            let o = refuse(
                sqlstate::UNABLE_TO_ESTABLISH_CONNECTION,
                format!(
                    "timeout connecting to {address} after {:?}",
                    shared.cfg.upstream_connect_timeout
                ),
                false,
            );
            tracing::warn!(session = %info.session_id, %route, %address, "tcp upstream connect timeout");
            return refused(shared, &mut client, &info, o, started).await;
        }
    };
    let _ = upstream.set_nodelay(true);
    info.upstream_addr = upstream.peer_addr().ok().map(|a| a.to_string());
    let outcome = Outcome::default();
    shared.audit.session_start(&info, &outcome);
    metrics::counter!("gateway_proxy_sessions_total", "result" => "success").increment(1);
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
            metrics::counter!("gateway_proxy_bytes_total", "direction" => "client_to_server"),
        ),
        copy_plain(
            up_r,
            client_w,
            &counters.server_to_client,
            metrics::counter!("gateway_proxy_bytes_total", "direction" => "server_to_client"),
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

async fn refused(
    shared: &Shared,
    client: &mut TlsStream<TcpStream>,
    info: &SessionInfo,
    outcome: Outcome,
    started: Instant,
) {
    if let Some(code) = &outcome.error_code {
        error_counter(code);
    }
    metrics::counter!("gateway_proxy_sessions_total", "result" => if outcome.denied { "denied" } else { "error" }).increment(1);
    shared.audit.session_start(info, &outcome);
    // close_notify + FIN: the node closes the application's connection.
    let _ = client.shutdown().await;
    shared
        .audit
        .session_end(info, &outcome, 0, 0, started.elapsed());
}
