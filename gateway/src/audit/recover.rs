//! Crash recovery of an audit file: sessions a previous run of the proxy started and never
//! ended (it was killed, or the machine stopped) get their `db.session.end` at start-up, so
//! that every admitted session has exactly one end record.
//!
//! One file per proxy process is assumed (as the deploy manifests do): a file shared by two
//! live proxies would have the other's open sessions closed here.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::pg::sqlstate;

/// Whether the file's last line was cut (a crash mid-write): the next record must then
/// start on a line of its own.
pub(super) fn ends_mid_line(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// What an end record written at recovery says.
pub const RECOVERED_MESSAGE: &str =
    "the proxy stopped before this session's end was recorded; closed at the next start-up";

/// The end records owed by `path`: one per `db.session.start` whose session id has no
/// `db.session.end`, built from the start record's fields. Lines that are not JSON (a
/// crash can cut the last one) are skipped.
pub(super) fn owed_ends(path: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // A device or a pipe (`/dev/stdout`, a FIFO to a log shipper) has no history to read.
    if !file.metadata()?.is_file() {
        return Ok(Vec::new());
    }
    // In file order, so the records written come out in the order the sessions started.
    let mut open: HashMap<String, (usize, serde_json::Value)> = HashMap::new();
    for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(&line?) else {
            continue;
        };
        let (Some(kind), Some(id)) = (
            event["event"].as_str(),
            event["session_id"].as_str().map(str::to_owned),
        ) else {
            continue;
        };
        match kind {
            "db.session.start" => {
                open.insert(id, (n, event));
            }
            "db.session.end" => {
                open.remove(&id);
            }
            _ => {}
        }
    }
    let mut owed: Vec<(usize, serde_json::Value)> = open.into_values().collect();
    owed.sort_by_key(|(n, _)| *n);
    Ok(owed
        .into_iter()
        .map(|(_, mut e)| {
            e["event"] = "db.session.end".into();
            e["time"] = super::now_rfc3339().into();
            e["result"] = "error".into();
            e["error_code"] = sqlstate::CONNECTION_FAILURE.into();
            e["error_message"] = RECOVERED_MESSAGE.into();
            e["recovered"] = true.into();
            e
        })
        .collect())
}
