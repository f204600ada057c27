//! Noticing that files were replaced: what reloads certificates, keys and bundles without
//! a restart (the proxy's TLS files, the node's CA and proxy bundles, the CA's roots)
//! looks at this every couple of seconds.

use std::path::PathBuf;
use std::time::SystemTime;

/// The modification time and size of each of a set of files, as last seen. What changes
/// when a file is replaced by rename, or when a Kubernetes volume swaps the symlink its
/// files go through (metadata follows it). A missing file is a stamp of its own.
pub struct Stamps {
    paths: Vec<PathBuf>,
    seen: Vec<Option<(SystemTime, u64)>>,
}

impl Stamps {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let seen = stamp(&paths);
        Self { paths, seen }
    }

    /// Whether any file changed since the last call (or since [`Stamps::new`]).
    pub fn changed(&mut self) -> bool {
        let now = stamp(&self.paths);
        if now == self.seen {
            return false;
        }
        self.seen = now;
        true
    }
}

fn stamp(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_or_removed_file_is_a_change_once() {
        let dir = std::env::temp_dir().join(format!("dbgw-stamps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.pem");
        std::fs::write(&f, "one").unwrap();
        let mut s = Stamps::new(vec![f.clone()]);
        assert!(!s.changed());
        std::fs::write(&f, "three").unwrap();
        assert!(s.changed());
        assert!(!s.changed(), "seen once");
        std::fs::remove_file(&f).unwrap();
        assert!(s.changed());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
