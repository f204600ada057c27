//! Server-session reuse (`databases[].upstream.reuse`): a server session whose client
//! ended cleanly while it was idle is reset with `DISCARD ALL` and kept for the next
//! client session with the same database user, database name and startup parameters.
//!
//! Kept sessions live on the proxy thread that logged them in (one map per thread, no
//! lock, no cross-thread wake-ups: the socket stays registered with the runtime that
//! polls it). A session is reused only if it is younger than `max_lifetime`, was idle for
//! less than `idle_timeout`, and its socket has nothing to read (a server that closed it,
//! or sent anything unasked, is not handed out). A sweeper per thread closes expired ones
//! and, on drain, all of them.
//!
//! Reuse never crosses workload identities or database users: the key holds the identity
//! and the user the policy chose. The identity is in it because `DISCARD ALL` does not
//! reset everything a session holds (PL globals, dblink/postgres_fdw connections, the
//! backend pid): two identities that policy maps to the same database user must not see
//! each other's leftovers, so each gets its own server sessions.

use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::ReuseConfig;
use crate::pg;
use crate::pki::SpiffeId;
use crate::telemetry::proxy::{UPSTREAM_KEPT_SESSIONS, UPSTREAM_REUSE_TOTAL};
use crate::upstream::{Login, ServerStream, is_forwarded_param};

/// What a kept session can serve: the workload identity it served, route, database user,
/// database name and the startup parameters the server got (sorted), all of which shape
/// the session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    identity: String,
    route: String,
    user: String,
    database: String,
    params: Vec<(String, String)>,
}

impl Key {
    pub fn new(
        identity: &SpiffeId,
        route: &str,
        user: &str,
        database: &str,
        params: &[(String, String)],
    ) -> Self {
        let mut params: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| is_forwarded_param(k))
            .cloned()
            .collect();
        params.sort();
        Self {
            identity: identity.to_string(),
            route: route.to_owned(),
            user: user.to_owned(),
            database: database.to_owned(),
            params,
        }
    }
}

/// A logged-in server session waiting for a client.
struct Kept {
    login: Login,
    born: Instant,
    idle_until: Instant,
    live_until: Instant,
}

impl Kept {
    fn expired(&self, now: Instant) -> Option<&'static str> {
        if now >= self.live_until {
            Some("max_lifetime")
        } else if now >= self.idle_until {
            Some("idle_timeout")
        } else {
            None
        }
    }
}

thread_local! {
    static KEPT: RefCell<HashMap<Key, Vec<Kept>>> = RefCell::new(HashMap::new());
}

fn count(result: &'static str) {
    metrics::counter!(UPSTREAM_REUSE_TOTAL, "result" => result).increment(1);
}

/// A kept session for `key`, newest first, with when it logged in; `None` means log in.
pub fn take(key: &Key) -> Option<(Login, Instant)> {
    let now = Instant::now();
    loop {
        let kept = KEPT.with(|k| {
            let mut map = k.borrow_mut();
            let list = map.get_mut(key)?;
            let kept = list.pop();
            if list.is_empty() {
                map.remove(key);
            }
            kept
        })?;
        metrics::gauge!(UPSTREAM_KEPT_SESSIONS).decrement(1.0);
        if let Some(why) = kept.expired(now) {
            count(why);
            close(kept.login);
            continue;
        }
        if !quiet(&kept.login.stream) {
            // Closed by the server (restart, pg_terminate_backend, idle_session_timeout)
            // or sent something unasked: not something to hand to a client.
            count("server_closed");
            continue;
        }
        count("reused");
        return Some((kept.login, kept.born));
    }
}

/// Resets the session and keeps it; closes it when the reset fails, the session is too
/// old, or `max_idle` sessions are kept for the key already.
pub async fn keep(key: Key, cfg: &ReuseConfig, mut login: Login, born: Instant, timeout: Duration) {
    let now = Instant::now();
    let live_until = born + cfg.max_lifetime;
    if now >= live_until {
        count("max_lifetime");
        close(login);
        return;
    }
    match tokio::time::timeout(timeout, reset(&mut login)).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            tracing::info!(upstream = %login.backend.addr, reason = %why, "server session not kept: reset failed");
            count("reset_failed");
            close(login);
            return;
        }
        Err(_) => {
            tracing::info!(upstream = %login.backend.addr, "server session not kept: reset timed out");
            count("reset_failed");
            close(login);
            return;
        }
    }
    let kept = Kept {
        login,
        born,
        idle_until: Instant::now() + cfg.idle_timeout,
        live_until,
    };
    let refused = KEPT.with(|k| {
        let mut map = k.borrow_mut();
        let list = map.entry(key).or_default();
        if list.len() >= cfg.max_idle {
            Some(kept)
        } else {
            list.push(kept);
            None
        }
    });
    match refused {
        Some(kept) => {
            count("full");
            close(kept.login);
        }
        None => {
            metrics::gauge!(UPSTREAM_KEPT_SESSIONS).increment(1.0);
        }
    }
}

/// Closes this thread's expired sessions every second; on drain, closes all of them.
pub async fn sweep(mut drain: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let draining = tokio::select! {
            _ = tick.tick() => *drain.borrow(),
            r = drain.changed() => r.is_err() || *drain.borrow(),
        };
        let now = Instant::now();
        let closing: Vec<(Kept, &'static str)> = KEPT.with(|k| {
            let mut map = k.borrow_mut();
            let mut out = Vec::new();
            for list in map.values_mut() {
                let mut i = 0;
                while i < list.len() {
                    let why = if draining {
                        Some("drain")
                    } else {
                        list[i].expired(now)
                    };
                    match why {
                        Some(why) => out.push((list.swap_remove(i), why)),
                        None => i += 1,
                    }
                }
            }
            map.retain(|_, l| !l.is_empty());
            out
        });
        for (kept, why) in closing {
            metrics::gauge!(UPSTREAM_KEPT_SESSIONS).decrement(1.0);
            count(why);
            close(kept.login);
        }
        if draining {
            return;
        }
    }
}

/// `DISCARD ALL` (roles, settings, prepared statements, portals, temporary tables,
/// advisory locks, `LISTEN`s, cached plans, sequences), read up to `ReadyForQuery` `I`.
/// The `ParameterStatus` messages the reset sends replace the greeting's values, so the
/// next client is greeted with what the server now reports.
async fn reset(login: &mut Login) -> Result<(), String> {
    if !login.rest.is_empty() {
        return Err("server bytes left unread".into());
    }
    login
        .stream
        .write_all(&pg::query("DISCARD ALL"))
        .await
        .map_err(|e| e.to_string())?;
    login.stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    let mut status = Vec::new();
    let mut done = false;
    loop {
        while let Some((tag, body, used)) =
            pg::split_message(&buf, pg::MAX_LOGIN_MESSAGE_LENGTH).map_err(|e| e.message)?
        {
            match tag {
                b'C' => done = true,
                b'S' => status.push(buf[..used].to_vec()),
                // Notices, and notifications that were on their way before the UNLISTEN.
                b'N' | b'A' => {}
                b'E' => {
                    return Err(pg::ErrorResponse::parse(body)
                        .map(|e| format!("{} ({})", e.message, e.sqlstate))
                        .unwrap_or_else(|| "malformed ErrorResponse".into()));
                }
                b'Z' => {
                    if !done || body != b"I" || used != buf.len() {
                        return Err("unexpected state after DISCARD ALL".into());
                    }
                    login.backend.greeting =
                        merge_parameter_status(&login.backend.greeting, &status);
                    return Ok(());
                }
                other => return Err(format!("unexpected message {:?}", other as char)),
            }
            buf.drain(..used);
        }
        let n = login
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("server closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parameter_name(message: &[u8]) -> &[u8] {
    let body = message.get(5..).unwrap_or_default();
    body.split(|b| *b == 0).next().unwrap_or_default()
}

/// The greeting's `ParameterStatus` messages with `updates` applied by name (new names
/// appended); login notices are not repeated to later clients.
fn merge_parameter_status(greeting: &[u8], updates: &[Vec<u8>]) -> Vec<u8> {
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut rest = greeting;
    while let Ok(Some((tag, _, used))) = pg::split_message(rest, pg::MAX_LOGIN_MESSAGE_LENGTH) {
        if tag == b'S' {
            messages.push(rest[..used].to_vec());
        }
        rest = &rest[used..];
    }
    for u in updates {
        match messages
            .iter_mut()
            .find(|m| parameter_name(m) == parameter_name(u))
        {
            Some(m) => m.clone_from(u),
            None => messages.push(u.clone()),
        }
    }
    messages.concat()
}

/// Nothing to read and not closed: a non-blocking peek says `WouldBlock`.
fn quiet(stream: &ServerStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let tcp = stream.get_ref().0;
    matches!(
        socket2::SockRef::from(tcp).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

/// Says goodbye to the server (`Terminate`, close_notify, FIN) without making anyone wait.
fn close(mut login: Login) {
    tokio::spawn(async move {
        let _ = login.stream.write_all(&pg::TERMINATE).await;
        let _ = login.stream.shutdown().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, value: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
        let mut m = vec![b'S'];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn greeting_takes_the_reset_values_by_name() {
        let notice = [b'N', 0, 0, 0, 5, 0];
        let greeting = [
            status("application_name", "psql"),
            notice.to_vec(),
            status("TimeZone", "UTC"),
        ]
        .concat();
        let merged = merge_parameter_status(
            &greeting,
            &[
                status("TimeZone", "Europe/Paris"),
                status("in_hot_standby", "on"),
            ],
        );
        assert_eq!(
            merged,
            [
                status("application_name", "psql"),
                status("TimeZone", "Europe/Paris"),
                status("in_hot_standby", "on"),
            ]
            .concat()
        );
    }

    #[test]
    fn key_ignores_parameter_order_and_what_is_not_forwarded() {
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let id = SpiffeId::new("td", "team-a", "api");
        let a = Key::new(
            &id,
            "main",
            "api",
            "app",
            &p(&[
                ("application_name", "x"),
                ("client_encoding", "UTF8"),
                ("user", "zz"),
            ]),
        );
        let b = Key::new(
            &id,
            "main",
            "api",
            "app",
            &p(&[
                ("client_encoding", "UTF8"),
                ("_pq_.x", "1"),
                ("application_name", "x"),
            ]),
        );
        assert_eq!(a, b);
        let other_user = Key::new(
            &id,
            "main",
            "worker",
            "app",
            &p(&[("application_name", "x")]),
        );
        assert_ne!(a, other_user);
        let other_params = Key::new(&id, "main", "api", "app", &p(&[("application_name", "y")]));
        assert_ne!(
            Key::new(&id, "main", "api", "app", &p(&[("application_name", "x")])),
            other_params
        );
    }
}
