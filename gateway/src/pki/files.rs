//! Writing keys and certificates to disk without trusting what is already there.
//!
//! A key file is written as a new file beside its target (created exclusively, never
//! through a symlink, mode 0600 from the first byte), flushed to disk, then renamed over the
//! target. Why: opening the target itself would follow a symlink planted there (writing the
//! key wherever it points, or truncating that file) and a crash half-way would leave a
//! truncated key; `rename` replaces a symlink instead of following it and is atomic, so a
//! reader sees the old file or the whole new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::PkiError;

/// Writes a private key (or any secret) with mode 0600.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), PkiError> {
    replace(path, contents.as_bytes(), 0o600)
}

/// Writes a certificate or other public file with mode 0644.
pub fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    replace(path, contents.as_bytes(), 0o644)
}

fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let werr = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let (tmp, mut f) = create_beside(path, mode).map_err(werr)?;
    let written = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(werr(e));
    }
    // The rename itself is durable only once the directory is.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(werr)?;
    }
    Ok(())
}

/// A new file in `path`'s directory with an unpredictable name: `O_CREAT | O_EXCL` (fails
/// on anything already there, symlinks included) and `O_NOFOLLOW`.
fn create_beside(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    for _ in 0..16 {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
        let tmp = path.with_file_name(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name beside the file",
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn hardening_12_write_secret_replaces_instead_of_following_or_truncating() {
        let dir = TempDir(std::env::temp_dir().join(format!(
            "dbgw-files-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        )));
        fs::create_dir(dir.path()).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "do not touch").unwrap();
        let key = dir.path().join("node.key");
        symlink(&victim, &key).unwrap();

        write_secret(&key, "SECRET").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "do not touch");
        let meta = fs::symlink_metadata(&key).unwrap();
        assert!(meta.file_type().is_file(), "the link itself was replaced");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::read_to_string(&key).unwrap(), "SECRET");

        // An existing key is replaced whole: a reader holding the old file still reads it
        // complete (no truncation in place), a new reader gets the new one.
        let mut old = File::open(&key).unwrap();
        write_secret(&key, "NEW").unwrap();
        let mut s = String::new();
        io::Read::read_to_string(&mut old, &mut s).unwrap();
        assert_eq!(s, "SECRET");
        assert_eq!(fs::read_to_string(&key).unwrap(), "NEW");

        // No temporary file is left behind; a public file gets 0644.
        write_public(&dir.path().join("node.crt"), "CERT").unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["node.crt", "node.key", "victim"]);
        let mode = fs::metadata(dir.path().join("node.crt")).unwrap().mode();
        assert_eq!(mode & 0o777, 0o644);

        // A directory that is not there is a clear error naming the path.
        let e = write_secret(&dir.path().join("nope/k.key"), "x").unwrap_err();
        assert!(e.to_string().contains("nope/k.key"), "{e}");
    }
}
