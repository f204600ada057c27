//! Cancel routing. Clients get the server's real backend pid in `BackendKeyData` (so that
//! `PGconn.backend_pid`, `pg_backend_pid()`, `pg_stat_activity.pid` and a notification's
//! pid agree, as programs expect) and a proxy-issued random secret: the server's secret
//! never leaves the proxy. A cancel is looked up by (pid, secret), honoured only from the
//! identity that owns the session, and forwarded by [`serve`] with the server's secret.
//!
//! A cancel and the hand-over of its server session to a later client
//! (`upstream.reuse`) are exclusive: a cancel holds its key's gate (shared) from the
//! look-up until the server has closed the cancel connection (the signal is then sent),
//! and the hand-over ([`CancelKey::release`]) first removes the key, so no new look-up
//! finds it, then takes the gate (exclusive), so every cancel already looked up has
//! reached the server while the session was still idle and its own (PostgreSQL ignores a
//! cancel at an idle backend). Without this, a cancel looked up just before the session
//! ended could reach the server after the next owner's query began.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::pki::SpiffeId;
use crate::telemetry::proxy::CANCEL_REQUESTS_TOTAL;

#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub upstream: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    pub identity: SpiffeId,
}

/// A live key's target and the gate its cancels and its hand-over share.
struct Entry {
    target: CancelTarget,
    gate: Arc<RwLock<()>>,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<(i32, i32), Entry>>,
    /// `replica_index`: written into every secret (see [`crate::tunnel::replica_secret`]).
    replica: Option<u8>,
}

/// Removes the key when the session ends; [`CancelKey::release`] also waits for cancels
/// already under way.
pub struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    pub key: (i32, i32),
    gate: Arc<RwLock<()>>,
}

impl CancelKey<'_> {
    /// Ends the key before its server session goes to another client: no cancel finds it
    /// from now on, and every cancel that found it before has been delivered (or given
    /// up) when this returns.
    pub async fn release(self) {
        let gate = self.gate.clone();
        drop(self);
        let _exclusive = gate.write().await;
    }
}

/// A cancel under way: while it lives, the key's server session is not handed over.
pub struct CancelInFlight {
    pub target: CancelTarget,
    _gate: OwnedRwLockReadGuard<()>,
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A registry whose secrets carry replica `index` (none: all 32 bits random).
    pub fn for_replica(index: Option<u8>) -> Self {
        Self {
            replica: index,
            ..Self::default()
        }
    }

    /// Issues the key for `target`: its server's pid and a fresh random secret (32 bits,
    /// as PostgreSQL's own; and a cancel is honoured only from the session's identity, so a
    /// guess can at most reach a session of the guesser's own). Two servers may share a
    /// pid: the secret tells their sessions apart.
    pub fn register(&self, target: CancelTarget) -> CancelKey<'_> {
        let mut map = self.lock();
        let key = loop {
            let secret = match self.replica {
                Some(i) => crate::tunnel::replica_secret(i, rand::random()),
                None => rand::random(),
            };
            let k: (i32, i32) = (target.pid, secret);
            if !map.contains_key(&k) {
                break k;
            }
        };
        let gate = Arc::new(RwLock::new(()));
        map.insert(
            key,
            Entry {
                target,
                gate: gate.clone(),
            },
        );
        CancelKey {
            registry: self,
            key,
            gate,
        }
    }

    /// The target for a cancel from `from`, if the key is live and belongs to it, with
    /// the gate held until the cancel is done. Taken under the map's lock: a hand-over
    /// removes the key under the same lock before it waits for the gate, so the shared
    /// gate is always free here.
    pub fn lookup(&self, key: (i32, i32), from: &SpiffeId) -> Option<CancelInFlight> {
        let map = self.lock();
        let entry = map.get(&key).filter(|e| &e.target.identity == from)?;
        let gate = entry.gate.clone().try_read_owned().ok()?;
        Some(CancelInFlight {
            target: entry.target.clone(),
            _gate: gate,
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves a client's `CancelRequest`: forwarded to the server when the key is live and
/// `identity` owns it, dropped silently otherwise. Returns what became of it (the
/// metric's `result`, also audited by the caller).
pub(super) async fn serve(
    registry: &CancelRegistry,
    identity: &SpiffeId,
    pid: i32,
    secret: i32,
) -> &'static str {
    let result = match registry.lookup((pid, secret), identity) {
        Some(in_flight) => {
            let t = &in_flight.target;
            match crate::upstream::cancel(t.upstream, t.pid, t.secret, Duration::from_secs(5)).await
            {
                Ok(()) => "forwarded",
                Err(e) => {
                    tracing::warn!(%e, upstream = %t.upstream, "cancel request failed");
                    "upstream_error"
                }
            }
        }
        // Unknown keys are dropped silently, as PostgreSQL does, so keys cannot be probed.
        None => "unknown_key",
    };
    metrics::counter!(CANCEL_REQUESTS_TOTAL, "result" => result).increment(1);
    tracing::info!(%identity, result, "cancel request");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_owned_by_identity_and_removed_on_drop() {
        let reg = CancelRegistry::default();
        let a = SpiffeId::new("td", "a", "a");
        let b = SpiffeId::new("td", "b", "b");
        let key = reg.register(CancelTarget {
            upstream: "127.0.0.1:5432".parse().unwrap(),
            pid: 7,
            secret: 9,
            identity: a.clone(),
        });
        assert_eq!(
            reg.lookup(key.key, &a)
                .map(|c| (c.target.pid, c.target.secret)),
            Some((7, 9))
        );
        assert!(reg.lookup(key.key, &b).is_none());
        assert!(
            reg.lookup((key.key.0, key.key.1.wrapping_add(1)), &a)
                .is_none()
        );
        let k = key.key;
        drop(key);
        assert!(reg.lookup(k, &a).is_none());
        assert!(reg.is_empty());
    }

    #[test]
    fn issue_20_keys_carry_the_server_pid_and_a_secret_of_our_own() {
        let reg = CancelRegistry::default();
        let a = SpiffeId::new("td", "a", "a");
        let target = |upstream: &str| CancelTarget {
            upstream: upstream.parse().unwrap(),
            pid: 4242,
            secret: 77,
            identity: a.clone(),
        };
        // Two servers with the same pid: two live keys, each reaching its own server.
        let k1 = reg.register(target("127.0.0.1:5432"));
        let k2 = reg.register(target("127.0.0.2:5432"));
        assert_eq!((k1.key.0, k2.key.0), (4242, 4242));
        assert_ne!(k1.key.1, k2.key.1);
        let up = |k: (i32, i32)| reg.lookup(k, &a).map(|c| c.target.upstream.to_string());
        assert_eq!(up(k1.key).as_deref(), Some("127.0.0.1:5432"));
        assert_eq!(up(k2.key).as_deref(), Some("127.0.0.2:5432"));
    }

    #[tokio::test]
    async fn hardening_07_hand_over_waits_for_a_cancel_under_way() {
        let reg = CancelRegistry::default();
        let a = SpiffeId::new("td", "a", "a");
        let key = reg.register(CancelTarget {
            upstream: "127.0.0.1:5432".parse().unwrap(),
            pid: 7,
            secret: 9,
            identity: a.clone(),
        });
        let k = key.key;
        let in_flight = reg.lookup(k, &a).expect("live key");
        let mut release = Box::pin(key.release());
        // The hand-over cannot finish while the cancel is being delivered…
        let waited = tokio::time::timeout(Duration::from_millis(100), &mut release).await;
        assert!(waited.is_err(), "hand-over overtook a cancel under way");
        // …and no new cancel finds the key meanwhile.
        assert!(reg.lookup(k, &a).is_none());
        drop(in_flight);
        tokio::time::timeout(Duration::from_secs(1), release)
            .await
            .expect("hand-over once the cancel is done");
        assert!(reg.is_empty());
    }
}
