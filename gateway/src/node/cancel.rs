//! Cancel requests across proxy replicas (issue 20).
//!
//! A client cancels a query by opening a new connection with a `CancelRequest` (its
//! session's pid and secret). The session lives in one proxy replica; the cancel must reach
//! that one, since only it holds the key and the server's own secret. Sessions reach the
//! replicas through `proxy.address`, typically a Kubernetes Service whose load balancing
//! picks a replica per connection, so the node cannot tell where a session went, and a
//! cancel sent the same way lands on a random replica.
//!
//! The design needs no shared state and no per-session memory: each replica writes its
//! `replica_index` into the secrets it issues (`tunnel::replica_secret`), and a node that
//! lists the replicas' own addresses in `proxy.replicas` (in index order, e.g. the
//! StatefulSet pods' names under a headless Service) sends a cancel straight to the
//! replica its secret names. Rejected alternative: the node remembering, per session,
//! (pid, secret) → replica from the greeting it relays. It would have to parse the relayed
//! stream, keep a table with expiry, forget everything on a restart, and still not know
//! the replica behind a load-balanced address.
//!
//! A cancel for a key no replica holds (a stale or forged one) is dropped by the replica
//! it reaches, as PostgreSQL drops it; the client hears nothing either way.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::pg::CANCEL_REQUEST_CODE;
use crate::tunnel::{MAX_REPLICAS, replica_of};

#[derive(Debug, thiserror::Error)]
pub enum CancelRouteError {
    #[error("proxy.replicas[{index}] {address:?} does not resolve: {source}")]
    Resolve {
        index: usize,
        address: String,
        source: std::io::Error,
    },
    #[error("proxy.replicas[{index}] {address:?} has no address")]
    NoAddress { index: usize, address: String },
    #[error("proxy.replicas lists {0} replicas; at most {MAX_REPLICAS} can be told apart")]
    TooMany(usize),
}

/// The proxy replicas' own addresses, by `replica_index`; empty when cancels go to
/// `proxy.address` like everything else.
#[derive(Debug, Default, Clone)]
pub struct Replicas(Vec<SocketAddr>);

impl Replicas {
    /// Resolves `proxy.replicas` once, at start-up, like `proxy.address`.
    pub fn resolve(list: &[String]) -> Result<Self, CancelRouteError> {
        if list.len() > MAX_REPLICAS {
            return Err(CancelRouteError::TooMany(list.len()));
        }
        list.iter()
            .enumerate()
            .map(|(index, address)| {
                address
                    .to_socket_addrs()
                    .map_err(|source| CancelRouteError::Resolve {
                        index,
                        address: address.clone(),
                        source,
                    })?
                    .next()
                    .ok_or_else(|| CancelRouteError::NoAddress {
                        index,
                        address: address.clone(),
                    })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Where a connection whose first packet is `initial` must go instead of
    /// `proxy.address`: the replica a `CancelRequest`'s secret names. `None` for anything
    /// else (a startup packet), without replicas, or for an index beyond the list (then
    /// `proxy.address` gets it, as before).
    pub fn for_cancel(&self, initial: &[u8]) -> Option<SocketAddr> {
        if self.0.is_empty() || initial.len() != 16 {
            return None;
        }
        let code = u32::from_be_bytes(initial[4..8].try_into().ok()?);
        if code != CANCEL_REQUEST_CODE {
            return None;
        }
        let secret = i32::from_be_bytes(initial[12..16].try_into().ok()?);
        self.0.get(replica_of(secret)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::{encode_cancel_request, encode_startup};
    use crate::tunnel::replica_secret;

    #[test]
    fn issue_20_a_cancel_goes_to_the_replica_its_secret_names() {
        let list = ["127.0.0.1:7001".to_owned(), "127.0.0.1:7002".to_owned()];
        let r = Replicas::resolve(&list).unwrap();
        for (index, want) in [(0u8, 7001), (1, 7002)] {
            let cancel = encode_cancel_request(4242, replica_secret(index, 0xdead_beef));
            assert_eq!(r.for_cancel(&cancel).unwrap().port(), want);
        }
        // An index beyond the list, a startup packet, no replicas: proxy.address.
        let cancel = encode_cancel_request(4242, replica_secret(9, 1));
        assert_eq!(r.for_cancel(&cancel), None);
        assert_eq!(r.for_cancel(&encode_startup(&[("user", "a")])), None);
        let cancel = encode_cancel_request(4242, replica_secret(0, 1));
        assert_eq!(Replicas::default().for_cancel(&cancel), None);
        let e = Replicas::resolve(&["nowhere.invalid:1".to_owned()]).unwrap_err();
        assert!(e.to_string().starts_with("proxy.replicas[0]"), "{e}");
    }
}
