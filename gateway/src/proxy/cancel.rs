//! Cancel routing. Clients get a proxy-issued `BackendKeyData`, never the server's: the
//! key names a session here, and the real (pid, secret) never leaves the proxy. A cancel
//! is honoured only from the identity that owns the session, and forwarded by [`serve`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::pki::SpiffeId;
use crate::telemetry::proxy::CANCEL_REQUESTS_TOTAL;

#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub upstream: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    pub identity: SpiffeId,
}

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

/// Removes the key when the session ends.
pub struct CancelKey<'a> {
    registry: &'a CancelRegistry,
    pub key: (i32, i32),
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), CancelTarget>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues a fresh random key for `target`.
    pub fn register(&self, target: CancelTarget) -> CancelKey<'_> {
        let mut map = self.lock();
        let key = loop {
            // The pid half stays positive, as real backend pids are; 62 random bits make
            // guessing a live key hopeless.
            let k: (i32, i32) = (rand::random::<i32>() & i32::MAX, rand::random());
            if k.0 != 0 && !map.contains_key(&k) {
                break k;
            }
        };
        map.insert(key, target);
        CancelKey {
            registry: self,
            key,
        }
    }

    /// The target for a cancel from `from`, if the key is live and belongs to it.
    pub fn lookup(&self, key: (i32, i32), from: &SpiffeId) -> Option<CancelTarget> {
        self.lock()
            .get(&key)
            .filter(|t| &t.identity == from)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves a client's `CancelRequest`: forwarded to the server when the key is live and
/// `identity` owns it, dropped silently otherwise.
pub(super) async fn serve(registry: &CancelRegistry, identity: &SpiffeId, pid: i32, secret: i32) {
    let result = match registry.lookup((pid, secret), identity) {
        Some(t) => {
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
            reg.lookup(key.key, &a).map(|t| (t.pid, t.secret)),
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
}
