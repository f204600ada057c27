//! A check every stack runs when it stops: no process log (node, proxy, CA) and no audit
//! line carries private key material or a signed token.
//!
//! What it looks for: a PEM private key block, the base64 body of any key file the stack
//! wrote (a key printed without its PEM armour), and AWS SigV4 signatures and session
//! tokens (an RDS IAM token is a presigned URL). Tests that plant each kind check that the
//! scan finds it.

use std::path::{Path, PathBuf};

/// Markers that never belong in a log, whatever the key or token.
const MARKERS: &[&str] = &[
    "PRIVATE KEY-----",
    "X-Amz-Signature=",
    "X-Amz-Security-Token=",
];

/// One finding: the file and what was found in it (never the secret itself).
#[derive(Debug, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    pub what: String,
}

/// Scans the `*.log` and `*.jsonl` files directly in `dir` for the markers and for the
/// bodies of the `*.key` files in `dir` and `key_dirs`.
pub fn scan(dir: &Path, key_dirs: &[&Path]) -> Vec<Finding> {
    let mut bodies = Vec::new();
    for d in std::iter::once(dir).chain(key_dirs.iter().copied()) {
        for key in files_with(d, &["key"]) {
            let Ok(pem) = std::fs::read_to_string(&key) else {
                continue;
            };
            // Each full base64 line of the body: long and random enough to never occur
            // by chance.
            bodies.extend(
                pem.lines()
                    .filter(|l| !l.starts_with("-----") && l.len() >= 40)
                    .map(|l| (l.to_owned(), key.clone())),
            );
        }
    }
    let mut found = Vec::new();
    for log in files_with(dir, &["log", "jsonl"]) {
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        for m in MARKERS {
            if text.contains(m) {
                found.push(Finding {
                    file: log.clone(),
                    what: format!("marker {m:?}"),
                });
            }
        }
        for (line, key) in &bodies {
            if text.contains(line.as_str()) {
                found.push(Finding {
                    file: log.clone(),
                    what: format!("the body of {}", key.display()),
                });
                break;
            }
        }
    }
    found
}

fn files_with(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    out.sort();
    out
}
