//! Caps on the sessions one workload identity and one database route may hold in this
//! proxy process (`max_sessions_per_identity`, `max_sessions_per_route`). A session takes
//! a [`Slot`] once its preamble names the route, and gives it back when it ends; past a cap
//! it is refused with `53300`, as PostgreSQL refuses past its own `max_connections`. The
//! per-process connection cap (`max_connections`) is the accept loop's (`proxy.rs`).
//!
//! One map for all threads: a workload's sessions spread over the threads by the kernel's
//! hash, and a cap per thread would be a cap the operator cannot predict.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::telemetry::proxy::LIMIT_REFUSALS_TOTAL;

/// Which cap refused a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum LimitError {
    #[error("too many connections for identity {identity}")]
    Identity { identity: String, max: usize },
    #[error("too many connections for route \"{route}\"")]
    Route { route: String, max: usize },
}

impl LimitError {
    /// The `reason` of `gateway_proxy_limit_refusals_total`.
    fn reason(&self) -> &'static str {
        match self {
            LimitError::Identity { .. } => "identity",
            LimitError::Route { .. } => "route",
        }
    }

    /// What the client is told to do about it.
    pub(super) fn hint(&self) -> String {
        match self {
            LimitError::Identity { max, .. } => format!(
                "This workload identity holds {max} sessions through this proxy already (max_sessions_per_identity); close idle connections or size the client's pool below it."
            ),
            LimitError::Route { max, .. } => format!(
                "This database route holds {max} sessions through this proxy already (max_sessions_per_route); try again later."
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Identity(String),
    Route(String),
}

/// Live sessions per identity and per route.
pub struct Limits {
    per_identity: usize,
    per_route: usize,
    held: Mutex<HashMap<Key, usize>>,
}

impl Limits {
    pub fn new(per_identity: usize, per_route: usize) -> Arc<Self> {
        Arc::new(Self {
            per_identity,
            per_route,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, usize>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for one session of `identity` on `route`, or the cap it would pass (counted).
    pub(super) fn admit(self: &Arc<Self>, identity: &str, route: &str) -> Result<Slot, LimitError> {
        let identity_key = Key::Identity(identity.to_owned());
        let route_key = Key::Route(route.to_owned());
        let mut held = self.lock();
        let refused = if held.get(&identity_key).copied().unwrap_or(0) >= self.per_identity {
            Some(LimitError::Identity {
                identity: identity.to_owned(),
                max: self.per_identity,
            })
        } else if held.get(&route_key).copied().unwrap_or(0) >= self.per_route {
            Some(LimitError::Route {
                route: route.to_owned(),
                max: self.per_route,
            })
        } else {
            None
        };
        if let Some(e) = refused {
            metrics::counter!(LIMIT_REFUSALS_TOTAL, "reason" => e.reason()).increment(1);
            return Err(e);
        }
        *held.entry(identity_key.clone()).or_default() += 1;
        *held.entry(route_key.clone()).or_default() += 1;
        Ok(Slot {
            limits: self.clone(),
            keys: Box::new([identity_key, route_key]),
        })
    }
}

/// One session's place under both caps, given back when dropped.
pub(super) struct Slot {
    limits: Arc<Limits>,
    /// Boxed: a slot lives in every session's state, where a pointer is cheaper.
    keys: Box<[Key; 2]>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.limits.lock();
        for key in self.keys.iter() {
            if let Some(n) = held.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    held.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_08_sessions_are_capped_per_identity_and_route() {
        let limits = Limits::new(2, 3);
        let a1 = limits.admit("a", "main").unwrap();
        let _a2 = limits.admit("a", "main").unwrap();
        assert_eq!(
            limits.admit("a", "other").err(),
            Some(LimitError::Identity {
                identity: "a".into(),
                max: 2
            })
        );
        let _b1 = limits.admit("b", "main").unwrap();
        let Err(refused) = limits.admit("b", "main") else {
            panic!("the route's cap is reached");
        };
        assert_eq!(
            refused.to_string(),
            "too many connections for route \"main\""
        );
        assert!(refused.hint().contains("max_sessions_per_route"));
        // A slot given back is free again; nothing is left behind at the end.
        drop(a1);
        let a3 = limits.admit("a", "other").unwrap();
        drop((a3, _a2, _b1));
        assert!(limits.lock().is_empty());
    }
}
