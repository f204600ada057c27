//! `token` joins: a random secret made by `gateway ca token create` for one node name, for
//! bare hosts and tests. The CA keeps only its SHA-256 (the file name) and what it allows
//! (the file's JSON), so reading the token directory gives no one a token.
//!
//! - time-limited: any number of joins by that node name until it expires; every renewal
//!   presents it again, so the node's certificates end with the token;
//! - one-time (`--one-time`): the first join renames its file to `<hash>.used` (an atomic
//!   rename, so of two racing joins one wins, also across CA replicas sharing the
//!   directory); after that the token only renews, and only over a connection with that
//!   node's valid certificate. Anyone else presenting it again is refused as a reuse.
//!
//! Deleting a token's file (or its `.used` record) revokes it: no join and no renewal.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const USED: &str = "used";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("unknown join token (never created, or revoked)")]
    Unknown,
    #[error("join token expired {0:?} ago")]
    Expired(Duration),
    #[error("one-time join token already used")]
    Reused,
    #[error("join token is for node {token_for:?}, not {asked:?}")]
    OtherNode { token_for: String, asked: String },
    #[error("token store {path}: {reason}")]
    Store { path: PathBuf, reason: String },
}

/// What a token allows, stored under the token's hash.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    node_name: String,
    /// Seconds since the Unix epoch after which the token joins no more.
    expires_unix: u64,
    one_time: bool,
}

/// The CA's side: the directory of hashed tokens.
pub struct TokenStore {
    dir: PathBuf,
}

/// `gateway ca token create`: writes the record and returns the token (printed once,
/// stored nowhere).
pub fn create(
    dir: &Path,
    node_name: &str,
    ttl: Duration,
    one_time: bool,
) -> Result<String, TokenError> {
    let store_err = |e: std::io::Error| TokenError::Store {
        path: dir.to_owned(),
        reason: e.to_string(),
    };
    if !super::valid_node_name(node_name) {
        return Err(TokenError::Store {
            path: dir.to_owned(),
            reason: format!("{node_name:?} is not a valid node name"),
        });
    }
    std::fs::create_dir_all(dir).map_err(store_err)?;
    let token = format!("dbgw-join-{}", super::hex(&rand::random::<[u8; 32]>()));
    let expires = SystemTime::now() + ttl;
    let record = Record {
        node_name: node_name.to_owned(),
        expires_unix: expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        one_time,
    };
    let path = dir.join(hash(&token));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&path).map_err(store_err)?;
    std::io::Write::write_all(
        &mut f,
        &serde_json::to_vec(&record).expect("a record serializes"),
    )
    .map_err(store_err)?;
    Ok(token)
}

/// SHA-256 of the token, hex: its file name.
fn hash(token: &str) -> String {
    super::hex(&Sha256::digest(token.as_bytes()))
}

impl TokenStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn read(&self, path: &Path) -> Result<Option<Record>, TokenError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| TokenError::Store {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TokenError::Store {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// Whether `token` lets `node_name` join (or renew, when `peer_node` is that node's
    /// valid certificate) at `now`; a one-time token is used up by its first join.
    pub fn check(
        &self,
        token: &str,
        node_name: &str,
        peer_node: Option<&str>,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        // Anything that is not one of ours hashes to a file that does not exist; a token
        // with a path in it cannot name a file (the hash is hex).
        let h = hash(token);
        let path = self.dir.join(&h);
        let used = self.dir.join(format!("{h}.{USED}"));
        let Some(record) = self.read(&path)? else {
            let record = self.read(&used)?.ok_or(TokenError::Unknown)?;
            if record.node_name != node_name {
                return Err(TokenError::OtherNode {
                    token_for: record.node_name,
                    asked: node_name.to_owned(),
                });
            }
            // The node that used it renews with its certificate; anyone else is a reuse.
            return match peer_node {
                Some(p) if p == record.node_name => Ok(()),
                _ => Err(TokenError::Reused),
            };
        };
        if record.node_name != node_name {
            return Err(TokenError::OtherNode {
                token_for: record.node_name,
                asked: node_name.to_owned(),
            });
        }
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(record.expires_unix);
        if now >= expires {
            return Err(TokenError::Expired(
                now.duration_since(expires).unwrap_or_default(),
            ));
        }
        if record.one_time {
            match std::fs::rename(&path, &used) {
                Ok(()) => {}
                // Another join took it between our read and the rename.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(TokenError::Reused);
                }
                Err(e) => {
                    return Err(TokenError::Store {
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dbgw-tokens-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn tokens_are_stored_hashed_and_checked_for_name_expiry_and_reuse() {
        let d = dir("check");
        let store = TokenStore::new(d.clone());
        let now = SystemTime::now();
        let t = create(&d, "node-1", Duration::from_secs(600), false).unwrap();
        // Only the hash is on disk.
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            assert_eq!(e.file_name().to_string_lossy(), hash(&t));
            assert!(!std::fs::read_to_string(e.path()).unwrap().contains(&t));
        }
        // Time-limited: joins again and again, only as its node, only until it expires.
        store.check(&t, "node-1", None, now).unwrap();
        store.check(&t, "node-1", None, now).unwrap();
        assert_eq!(
            store.check(&t, "node-2", None, now).unwrap_err(),
            TokenError::OtherNode {
                token_for: "node-1".into(),
                asked: "node-2".into()
            }
        );
        let later = now + Duration::from_secs(700);
        assert!(matches!(
            store.check(&t, "node-1", None, later),
            Err(TokenError::Expired(_))
        ));
        assert_eq!(
            store
                .check("dbgw-join-nope", "node-1", None, now)
                .unwrap_err(),
            TokenError::Unknown
        );
        assert_eq!(
            store
                .check("../../etc/passwd", "node-1", None, now)
                .unwrap_err(),
            TokenError::Unknown
        );

        // One-time: the first join uses it up; then only that node's certificate renews.
        let once = create(&d, "node-1", Duration::from_secs(600), true).unwrap();
        store.check(&once, "node-1", None, now).unwrap();
        assert_eq!(
            store.check(&once, "node-1", None, now).unwrap_err(),
            TokenError::Reused
        );
        assert_eq!(
            store
                .check(&once, "node-1", Some("node-9"), now)
                .unwrap_err(),
            TokenError::Reused
        );
        store.check(&once, "node-1", Some("node-1"), now).unwrap();
        // Revoked by deleting its record: no renewal either.
        std::fs::remove_file(d.join(format!("{}.used", hash(&once)))).unwrap();
        assert_eq!(
            store
                .check(&once, "node-1", Some("node-1"), now)
                .unwrap_err(),
            TokenError::Unknown
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
