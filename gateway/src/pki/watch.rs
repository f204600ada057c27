//! Noticing that files were replaced: what reloads certificates, keys and bundles without
//! a restart (the proxy's TLS files, the node's CA and proxy bundles, the CA's roots)
//! looks at this every couple of seconds.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// What identifies one version of a file: inode, change and modification times, size.
/// A replacement by rename (how keys and certificates are written here) or a Kubernetes
/// volume swapping the symlink its files go through (metadata follows it) changes the
/// inode and ctime even when size and mtime are kept. A missing file is a stamp of its own.
type Stamp = Option<(u64, i64, i64, i64, i64, u64)>;

/// The stamps of a set of files, as last loaded.
pub struct Stamps {
    paths: Vec<PathBuf>,
    loaded: Vec<Stamp>,
    /// What the previous look saw: a change is reported once it has held still for one look,
    /// so a set written file by file (a certificate, then its key) is not loaded half-way.
    last: Vec<Stamp>,
}

impl Stamps {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let loaded = stamp(&paths);
        Self {
            paths,
            last: loaded.clone(),
            loaded,
        }
    }

    /// Whether the files changed since they were last reported (or since
    /// [`Stamps::new`]) and have not changed since the previous call.
    pub fn changed(&mut self) -> bool {
        let now = stamp(&self.paths);
        let settled = now == self.last;
        self.last = now;
        if settled && self.last != self.loaded {
            self.loaded = self.last.clone();
            return true;
        }
        false
    }
}

fn stamp(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.ino(),
                    m.ctime(),
                    m.ctime_nsec(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.size(),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_once_it_holds_still() {
        let dir = std::env::temp_dir().join(format!("dbgw-stamps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("a.crt"), dir.join("a.key"));
        std::fs::write(&cert, "one").unwrap();
        std::fs::write(&key, "one").unwrap();
        let mut s = Stamps::new(vec![cert.clone(), key.clone()]);
        assert!(!s.changed());
        // The certificate is replaced; the key follows before the next look.
        crate::pki::write_public(&cert, "two").unwrap();
        assert!(!s.changed(), "not yet still");
        crate::pki::write_public(&key, "two").unwrap();
        assert!(!s.changed(), "moved again");
        assert!(s.changed(), "held still: reported");
        assert!(!s.changed(), "once");
        // Same size, same content length: a rename is still a change.
        crate::pki::write_public(&cert, "two").unwrap();
        assert!(!s.changed());
        assert!(s.changed());
        std::fs::remove_file(&key).unwrap();
        assert!(!s.changed());
        assert!(s.changed(), "a removed file too");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
