//! A session on a `postgres` route, after [`accept`](super::accept): the startup packet
//! (or a cancel request), the policy decision, the upstream login or a kept server session
//! ([`reuse`]), the greeting with the proxy's own cancel key ([`cancel`]), the relay
//! ([`relay`]) and the audit pair. Every failure a client can cause is a [`PostgresError`],
//! turned into the `ErrorResponse` it gets in [`PostgresError::into_refusal`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;

use super::Shared;
use super::cancel::{self, CancelKey, CancelTarget};
use super::opened::{Active, Client, Opened};
use super::provision;
use super::refuse::{self, Answer, Refusal};
use super::relay::{self, ClientEnd, Counters, End};
use super::reuse;
use crate::audit::{CancelEvent, Outcome, SessionInfo};
use crate::config::ReuseConfig;
use crate::pg::{self, ErrorResponse, ProtocolError, StartupMessage, StartupRequest, sqlstate};
use crate::pki::SpiffeId;
use crate::policy;
use crate::telemetry::proxy::{
    SESSIONS_TOTAL, UPSTREAM_LOGIN_SECONDS, UPSTREAM_LOGIN_TIMEOUTS_TOTAL,
};
use crate::upstream::{Login, ServerStream, UpstreamError};

/// Why a PostgreSQL session did not start.
#[derive(Debug, thiserror::Error)]
pub(super) enum PostgresError {
    #[error("timeout waiting for the startup packet")]
    StartupTimeout(Duration),
    /// The startup packet is not one this proxy (or PostgreSQL) understands.
    #[error("{}", .0.message)]
    BadStartup(ProtocolError),
    /// The startup packet's length word is out of range.
    #[error("{}", .0.message)]
    BadStartupLength(ProtocolError),
    #[error("incomplete startup packet")]
    IncompleteStartup,
    #[error("too many encryption requests")]
    TooManyEncryptionRequests,
    /// The policy said no; its error names what the identity may do instead.
    #[error("{}", .0.message)]
    Denied(ErrorResponse),
    #[error("upstream login to route {route} as {user} failed: {source}")]
    Login {
        source: UpstreamError,
        route: String,
        user: String,
    },
    /// Creating or updating the automatic database user failed, or the user exists and
    /// is not the gateway's.
    #[error("{}", .0.message)]
    Provision(ErrorResponse),
    /// The client went away or broke TLS: nobody to answer.
    #[error("the client closed the tunnel")]
    Gone,
}

impl PostgresError {
    /// What the client and the audit log get; `None` when nobody is there to get it.
    pub(super) fn into_refusal(self) -> Option<Refusal> {
        let error = match self {
            PostgresError::StartupTimeout(timeout) => ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "db-gateway: timeout waiting for the startup packet",
            )
            .with_hint(format!(
                "The client must send its startup message within {timeout:?}."
            )),
            PostgresError::BadStartup(e) => {
                let hint = if e.sqlstate == sqlstate::FEATURE_NOT_SUPPORTED {
                    "Use a PostgreSQL client that speaks protocol 3.0 (any libpq since 7.4)."
                } else {
                    "The client sent a malformed startup packet; is it a PostgreSQL client?"
                };
                ErrorResponse::fatal(e.sqlstate, e.message).with_hint(hint)
            }
            PostgresError::BadStartupLength(e) => ErrorResponse::fatal(e.sqlstate, e.message)
                .with_hint(format!(
                    "A startup packet is 8 to {} bytes long.",
                    pg::MAX_STARTUP_PACKET_LENGTH
                )),
            PostgresError::IncompleteStartup => {
                ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, "incomplete startup packet")
                    .with_hint(
                        "The client closed the connection in the middle of its startup packet.",
                    )
            }
            PostgresError::TooManyEncryptionRequests => {
                ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, "too many encryption requests")
                    .with_hint("Send SSLRequest or GSSENCRequest at most once each.")
            }
            PostgresError::Denied(error) => {
                return Some(Refusal {
                    error,
                    denied: true,
                });
            }
            PostgresError::Login {
                source,
                route,
                user,
            } => source.to_client(&route, &user),
            PostgresError::Provision(error) => error,
            PostgresError::Gone => return None,
        };
        Some(error.into())
    }
}

/// Answers and audits `e`, if anybody is there. Boxed (in [`refuse::refuse`]), so a
/// refusal adds no room to the session's future.
fn refuse<'a>(
    shared: &'a Shared,
    client: &'a mut Client,
    info: &'a SessionInfo,
    e: PostgresError,
    started: Instant,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    match e.into_refusal() {
        Some(refusal) => {
            let answer = Answer::ErrorResponse;
            refuse::refuse(&shared.audit, client, info, refusal, answer, started)
        }
        // A zero-sized future: boxing it allocates nothing.
        None => Box::pin(std::future::ready(())),
    }
}

/// A PostgreSQL session's start: startup packet, policy, upstream login (or a kept server
/// session), the greeting to send. `None` when it was refused (answered and audited).
pub(super) async fn start(shared: &Arc<Shared>, opened: Box<Opened>) -> Option<Box<Session<'_>>> {
    let Opened {
        mut client,
        identity,
        mut info,
        preamble,
        started,
        active,
    } = *opened;
    let timeout = shared.cfg.startup_timeout;
    let remaining = timeout.saturating_sub(started.elapsed());
    // In a block, and the refusal made before it is awaited: what the read returned
    // (errors included) is then not kept in this future across the awaits below.
    let startup = {
        let read = Box::pin(read_startup(&mut client, &identity, &info, shared));
        let read = match tokio::time::timeout(remaining, read).await {
            Ok(Ok(Some(x))) => Ok(x),
            // A cancel request: served, no session.
            Ok(Ok(None)) => return None,
            // Not even a startup message: still one start/end pair so the attempt is seen.
            Ok(Err(e)) => Err(refuse(shared, &mut client, &info, e, started)),
            Err(_) => {
                let e = PostgresError::StartupTimeout(timeout);
                Err(refuse(shared, &mut client, &info, e, started))
            }
        };
        match read {
            Ok(x) => x,
            Err(refusing) => {
                refusing.await;
                return None;
            }
        }
    };
    info.requested_user = startup.param("user").map(str::to_owned);
    info.requested_database = startup.param("database").map(str::to_owned);

    let decision = match shared.policy.load().decide(
        &identity,
        &preamble.route,
        startup.param("user"),
        startup.param("database"),
    ) {
        Ok(d) => d,
        Err(error) => {
            tracing::info!(session = %info.session_id, %identity, route = %preamble.route, reason = %error.message, "session denied");
            let e = PostgresError::Denied(error);
            refuse(shared, &mut client, &info, e, started).await;
            return None;
        }
    };
    if let Err(error) = policy::startup::check(
        &startup.params,
        &decision.database.upstream.startup_parameters,
    ) {
        tracing::info!(session = %info.session_id, %identity, route = %preamble.route, reason = %error.message, "session denied");
        refuse(
            shared,
            &mut client,
            &info,
            PostgresError::Denied(error),
            started,
        )
        .await;
        return None;
    }
    info.db_user = Some(decision.db_user.clone());
    info.db_name = Some(decision.db_name.clone());
    info.role = Some(decision.role.clone());

    // An automatic user: created or brought in line before the login, its lock held until
    // the login is done (a concurrent last session must not retire it meanwhile).
    let (held, auto) = match &decision.auto_user {
        None => (None, None),
        Some(a) => match Box::pin(provision::ensure(shared, &info, &decision, a)).await {
            Ok(held) => {
                let auto = Box::new(provision::AutoEnd {
                    database: decision.database.clone(),
                    user: decision.db_user.clone(),
                    mode: a.mode,
                });
                (Some(held), Some(auto))
            }
            Err(error) => {
                let e = PostgresError::Provision(error);
                refuse(shared, &mut client, &info, e, started).await;
                return None;
            }
        },
    };

    let reuse = decision.database.upstream.reuse.clone().map(|cfg| {
        let key = reuse::Key::new(
            &identity,
            &decision.database.name,
            &decision.db_user,
            &decision.db_name,
            &startup.params,
        );
        (key, cfg)
    });
    let (login, born) = match reuse.as_ref().and_then(|(key, _)| reuse::take(key)) {
        Some(kept) => {
            info.upstream_reused = true;
            kept
        }
        None => {
            let login_started = Instant::now();
            // The whole login is bounded, not only its connect: a server that accepts and
            // then stays silent (SSL answer, TLS, startup) must not hold the session, or
            // a drain, for ever.
            let limit = shared.cfg.upstream_login_timeout;
            let login = Box::pin(tokio::time::timeout(
                limit,
                shared.upstreams.login(
                    &decision.database,
                    &decision.db_user,
                    &decision.db_name,
                    &startup.params,
                    shared.cfg.upstream_connect_timeout,
                ),
            ))
            .await
            .unwrap_or_else(|_| {
                metrics::counter!(UPSTREAM_LOGIN_TIMEOUTS_TOTAL).increment(1);
                Err(UpstreamError::LoginTimeout {
                    address: decision.database.upstream.address.clone(),
                    timeout: limit,
                })
            });
            match login {
                Ok(l) => {
                    metrics::histogram!(UPSTREAM_LOGIN_SECONDS)
                        .record(login_started.elapsed().as_secs_f64());
                    (l, login_started)
                }
                Err(source) => {
                    tracing::warn!(session = %info.session_id, route = %preamble.route, user = %decision.db_user, e = %source, "upstream login failed");
                    let e = PostgresError::Login {
                        source,
                        route: preamble.route,
                        user: decision.db_user,
                    };
                    refuse(shared, &mut client, &info, e, started).await;
                    return None;
                }
            }
        }
    };
    if let Some(held) = held {
        Box::pin(held.done()).await;
    }
    info.upstream_addr = Some(login.backend.addr.to_string());

    // Greet the client as the server would, with our own cancel key.
    let cancel_key = login.backend.key.map(|(pid, secret)| {
        shared.cancels.register(CancelTarget {
            upstream: login.backend.addr,
            pid,
            secret,
            identity: identity.clone(),
        })
    });
    let mut hello = Vec::with_capacity(512);
    if startup.needs_negotiation() {
        pg::negotiate_protocol_version(&mut hello, &startup.protocol_options());
    }
    pg::authentication_ok(&mut hello);
    hello.extend_from_slice(&login.backend.greeting);
    if let Some(k) = &cancel_key {
        pg::backend_key_data(&mut hello, k.key.0, k.key.1);
    }
    hello.extend_from_slice(&login.backend.ready);
    let outcome = Outcome::default();
    shared.audit.session_start(&info, &outcome);
    metrics::counter!(SESSIONS_TOTAL, "result" => "success").increment(1);
    tracing::info!(session = %info.session_id, %identity, route = %preamble.route, user = %decision.db_user, db = %decision.db_name, "session started");
    Some(Box::new(Session {
        client,
        login,
        born,
        info,
        started,
        hello,
        cancel_key,
        reuse,
        auto,
        _active: active,
    }))
}

/// A started PostgreSQL session, between login and relay.
pub(super) struct Session<'a> {
    client: Client,
    login: Login,
    /// When its server session logged in (it may be a kept one).
    born: Instant,
    info: SessionInfo,
    started: Instant,
    /// `AuthenticationOk` … `ReadyForQuery`, as the client is to get it.
    hello: Vec<u8>,
    cancel_key: Option<CancelKey<'a>>,
    reuse: Option<(reuse::Key, ReuseConfig)>,
    /// An automatic user, to retire after its last session.
    auto: Option<Box<provision::AutoEnd>>,
    _active: Active,
}

/// A PostgreSQL session's life after login: greeting, relay, audit, and keeping the
/// server session when `upstream.reuse` allows.
pub(super) async fn run(
    shared: &Arc<Shared>,
    session: Box<Session<'_>>,
    drain: watch::Receiver<bool>,
) {
    // Only what the relay consumes moves out; the audit record and the reuse key stay in
    // the box, so they cost the future a pointer instead of their size.
    let client = session.client;
    let hello = session.hello;
    let counters = Counters::at_ready();
    let Login {
        stream,
        backend,
        rest,
    } = session.login;
    let keep = session.reuse.is_some() && rest.is_empty();
    // Split here, not in the relay: what a future takes by value stays in it for its whole
    // life, and the two TLS streams are 2.3 KiB (the halves are pointers).
    let (end, kept) = Box::pin(relay_session(
        tokio::io::split(client),
        tokio::io::split(stream),
        hello,
        &rest,
        &counters,
        drain.clone(),
        keep,
    ))
    .await;
    match (&kept, session.cancel_key) {
        // Handing the server session over: no cancel of this session may reach it after.
        (Some(_), Some(key)) => Box::pin(key.release()).await,
        (_, key) => drop(key),
    }
    let outcome = match &end {
        End::Closed => Outcome::default(),
        End::Drained => Outcome {
            error_code: Some(sqlstate::ADMIN_SHUTDOWN.into()),
            error_message: Some("ended by proxy drain".into()),
            denied: false,
        },
        End::Protocol(m) => Outcome {
            error_code: Some(sqlstate::PROTOCOL_VIOLATION.into()),
            error_message: Some(m.clone()),
            denied: false,
        },
    };
    shared.audit.session_end(
        &session.info,
        &outcome,
        counters.client_to_server(),
        counters.server_to_client(),
        session.started.elapsed(),
    );
    tracing::info!(session = %session.info.session_id, ?end, "session ended");
    if kept.is_none()
        && let Some(auto) = &session.auto
    {
        let pid = backend.key.map(|(pid, _)| pid);
        Box::pin(provision::release(shared, &session.info, auto, pid)).await;
    }
    if let (Some(stream), Some((key, cfg))) = (kept, session.reuse) {
        if *drain.borrow() {
            let mut stream = stream;
            let _ = stream.write_all(&pg::TERMINATE).await;
            let _ = stream.shutdown().await;
            return;
        }
        let login = Login {
            stream,
            backend,
            rest: Vec::new(),
        };
        Box::pin(reuse::keep(
            key,
            &cfg,
            login,
            session.born,
            shared.cfg.upstream_connect_timeout,
        ))
        .await;
    }
}

/// Greets the client (`hello`), then relays until the session ends. With `keep`, a clean client end while the server is
/// idle returns the server session (for [`reuse::keep`]) instead of closing it.
async fn relay_session(
    client: (ReadHalf<Client>, WriteHalf<Client>),
    upstream: (ReadHalf<ServerStream>, WriteHalf<ServerStream>),
    hello: Vec<u8>,
    first: &[u8],
    counters: &Counters,
    drain: watch::Receiver<bool>,
    keep: bool,
) -> (End, Option<ServerStream>) {
    let (client_r, mut client_w) = client;
    let (mut up_r, mut up_w) = upstream;
    if client_w
        .write_all(&hello)
        .await
        .and(client_w.flush().await)
        .is_err()
    {
        return (End::Closed, None);
    }
    drop(hello);
    let end = {
        let c2s = relay::client_to_server(client_r, &mut up_w, counters, keep);
        let s2c = relay::server_to_client(&mut up_r, &mut client_w, counters, first, drain);
        tokio::pin!(c2s, s2c);
        tokio::select! {
            c = &mut c2s => match c {
                // Both directions stop here: the server-to-client one waits in a read
                // with nothing taken (that is what idle means), so dropping it loses
                // no byte.
                ClientEnd::Keep => None,
                ClientEnd::Done => Some(s2c.await),
            },
            end = &mut s2c => Some(end),
        }
    };
    let Some(end) = end else {
        let _ = client_w.shutdown().await;
        return (End::Closed, Some(up_r.unsplit(up_w)));
    };
    if end == End::Drained {
        // Tell the server goodbye properly so it logs no "unexpected EOF".
        let _ = up_w.write_all(&pg::terminate()).await;
    }
    let _ = up_w.shutdown().await;
    let _ = client_w.shutdown().await;
    (end, None)
}

/// Reads the startup packet; `Ok(None)` after serving a cancel request.
async fn read_startup(
    client: &mut Client,
    identity: &SpiffeId,
    info: &SessionInfo,
    shared: &Shared,
) -> Result<Option<StartupMessage>, PostgresError> {
    // The node answers SSLRequest/GSSENCRequest itself; we still accept them so an older
    // or simpler node works.
    for _ in 0..3 {
        let packet = read_startup_packet(client).await?;
        match pg::parse_startup_packet(&packet) {
            Ok(StartupRequest::Ssl) | Ok(StartupRequest::GssEnc) => {
                client
                    .write_all(b"N")
                    .await
                    .map_err(|_| PostgresError::Gone)?;
                client.flush().await.map_err(|_| PostgresError::Gone)?;
            }
            Ok(StartupRequest::Cancel { pid, secret }) => {
                let result = cancel::serve(&shared.cancels, identity, pid, secret).await;
                shared.audit.cancel(&CancelEvent {
                    session_id: &info.session_id,
                    identity: &info.identity,
                    node: info.node.as_deref(),
                    client_addr: info.client_addr.as_deref(),
                    node_addr: &info.node_addr,
                    result,
                });
                return Ok(None);
            }
            Ok(StartupRequest::Startup(m)) => return Ok(Some(m)),
            Err(e) => return Err(PostgresError::BadStartup(e)),
        }
    }
    Err(PostgresError::TooManyEncryptionRequests)
}

async fn read_startup_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, PostgresError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)
        .await
        .map_err(|_| PostgresError::Gone)?;
    let len = pg::startup_packet_len(header).map_err(PostgresError::BadStartupLength)?;
    let mut packet = vec![0u8; len];
    packet[..4].copy_from_slice(&header);
    r.read_exact(&mut packet[4..])
        .await
        .map_err(|_| PostgresError::IncompleteStartup)?;
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(e: PostgresError) -> (ErrorResponse, bool) {
        let r = e.into_refusal().expect("answered");
        (r.error, r.denied)
    }

    #[test]
    fn startup_errors_map_to_what_the_client_reads() {
        let (e, denied) = refusal(PostgresError::StartupTimeout(Duration::from_secs(10)));
        assert!(!denied);
        assert_eq!(
            e,
            ErrorResponse::fatal(
                "08P01",
                "db-gateway: timeout waiting for the startup packet"
            )
            .with_hint("The client must send its startup message within 10s.")
        );

        let old = pg::parse_startup_packet(&[0, 0, 0, 8, 0, 2, 0, 0]).unwrap_err();
        let message = old.message.clone();
        let (e, _) = refusal(PostgresError::BadStartup(old));
        assert_eq!(
            e,
            ErrorResponse::fatal("0A000", message).with_hint(
                "Use a PostgreSQL client that speaks protocol 3.0 (any libpq since 7.4)."
            )
        );
        let garbage = pg::parse_startup_packet(&[0, 0, 0, 8, 0, 3, 0, 0]).unwrap_err();
        assert_eq!(garbage.sqlstate, "08P01");
        let message = garbage.message.clone();
        let (e, _) = refusal(PostgresError::BadStartup(garbage));
        assert_eq!(
            e,
            ErrorResponse::fatal("08P01", message).with_hint(
                "The client sent a malformed startup packet; is it a PostgreSQL client?"
            )
        );

        let (e, _) = refusal(PostgresError::IncompleteStartup);
        assert_eq!(
            e,
            ErrorResponse::fatal("08P01", "incomplete startup packet")
                .with_hint("The client closed the connection in the middle of its startup packet.")
        );
        let (e, _) = refusal(PostgresError::TooManyEncryptionRequests);
        assert_eq!(
            e,
            ErrorResponse::fatal("08P01", "too many encryption requests")
                .with_hint("Send SSLRequest or GSSENCRequest at most once each.")
        );
        assert!(PostgresError::Gone.into_refusal().is_none());
    }

    #[test]
    fn a_policy_refusal_is_passed_on_as_denied() {
        let policy = ErrorResponse::fatal("28000", "db-gateway: no").with_hint("ask");
        let (e, denied) = refusal(PostgresError::Denied(policy.clone()));
        assert!(denied);
        assert_eq!(e, policy);
    }

    #[test]
    fn a_failed_login_says_which_route_and_user() {
        let source = UpstreamError::Unreachable {
            address: "db:5432".into(),
            reason: "refused".into(),
        };
        let expected = source.to_client("orders", "app");
        let (e, denied) = refusal(PostgresError::Login {
            source,
            route: "orders".into(),
            user: "app".into(),
        });
        assert!(!denied);
        assert_eq!(e, expected);
        assert_eq!(e.sqlstate, "08001");
        assert_eq!(
            e.message,
            "db-gateway: database \"orders\" is unreachable: cannot connect to db:5432: refused"
        );
    }

    #[tokio::test]
    async fn startup_packets_are_read_whole_or_refused() {
        let packet = pg::encode_startup(&[("user", "u")]);
        assert_eq!(read_startup_packet(&mut &packet[..]).await.unwrap(), packet);

        let e = read_startup_packet(&mut &packet[..packet.len() - 1])
            .await
            .unwrap_err();
        assert!(matches!(e, PostgresError::IncompleteStartup), "{e:?}");

        let e = read_startup_packet(&mut &[0u8, 0, 0, 4][..])
            .await
            .unwrap_err();
        let PostgresError::BadStartupLength(p) = &e else {
            panic!("{e:?}");
        };
        assert_eq!(p.sqlstate, "08P01");
        let (e, _) = refusal(e);
        assert_eq!(
            e.hint.as_deref(),
            Some(
                format!(
                    "A startup packet is 8 to {} bytes long.",
                    pg::MAX_STARTUP_PACKET_LENGTH
                )
                .as_str()
            )
        );

        let e = read_startup_packet(&mut &[0u8, 0][..]).await.unwrap_err();
        assert!(matches!(e, PostgresError::Gone), "{e:?}");
    }
}
