//! What [`super::start`] needs from the host: PostgreSQL's binaries, the user the server
//! runs as when we are root (PostgreSQL refuses root), and a private directory that user owns.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};

/// Overrides the directory holding `initdb`, `postgres`, `pg_isready` and `psql`.
pub const BIN_DIR_ENV: &str = "GATEWAY_PG_BIN_DIR";
/// Where Debian's `postgresql-15` package puts the server binaries.
const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The Debian package to install when the binaries are missing (`cargo xtask setup` does).
const DEBIAN_PACKAGE: &str = "postgresql-15";
/// The system user that owns the cluster when we run as root; also the bootstrap superuser.
const SERVICE_USER: &str = "postgres";
/// Prefix of our temporary directories, so a stray one is easy to recognize in `/tmp`.
const DIR_PREFIX: &str = "db-gateway-pg";
/// `sun_path` holds 108 bytes on Linux including the NUL; PostgreSQL refuses longer socket paths.
const MAX_SOCKET_PATH: usize = 107;
/// The longest socket file name PostgreSQL creates in the socket dir (`.s.PGSQL.65535.lock`).
const SOCKET_NAME_MAX: &str = ".s.PGSQL.65535.lock";
/// Makes directory names unique between servers started by one process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The uid and gid the server runs as when we are root.
#[derive(Debug, Clone, Copy)]
pub(super) struct ServiceUser {
    pub(super) uid: u32,
    pub(super) gid: u32,
}

/// `$GATEWAY_PG_BIN_DIR`, else Debian's PostgreSQL 15 directory, else `pg_config --bindir`.
pub(super) fn find_bin_dir() -> Result<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let dir = PathBuf::from(dir);
        ensure!(
            has_initdb(&dir),
            "{BIN_DIR_ENV}={} has no initdb; point it at PostgreSQL's bin directory",
            dir.display()
        );
        return Ok(dir);
    }
    let default = PathBuf::from(DEFAULT_BIN_DIR);
    if has_initdb(&default) {
        return Ok(default);
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(OsStr::from_bytes(output.stdout.trim_ascii()));
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    bail!(
        "PostgreSQL server binaries not found (no initdb in {DEFAULT_BIN_DIR} or in \
         `pg_config --bindir`); install the Debian package {DEBIAN_PACKAGE} \
         (`cargo xtask setup` does) or set {BIN_DIR_ENV}"
    )
}

/// `None` when we are not root; else the `postgres` user, since PostgreSQL refuses root.
pub(super) fn service_user() -> Result<Option<ServiceUser>> {
    if !crate::harness::machine::is_root() {
        return Ok(None);
    }
    let user = lookup_user(SERVICE_USER)?.with_context(|| {
        format!(
            "running as root, but there is no {SERVICE_USER:?} user to run PostgreSQL as \
             (it refuses root); install {DEBIAN_PACKAGE}, which creates it"
        )
    })?;
    Ok(Some(user))
}

/// Looks a user up with the reentrant `getpwnam_r`: tests start servers on several threads.
pub(super) fn lookup_user(name: &str) -> Result<Option<ServiceUser>> {
    let c_name = CString::new(name).context("user name contains NUL")?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: passwd is plain old data; getpwnam_r fills it in.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is the buffer's size;
        // the strings in `pwd` point into `buf`, which we do not read.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc))
                .with_context(|| format!("failed to look up user {name:?}"));
        }
        if found.is_null() {
            return Ok(None);
        }
        return Ok(Some(ServiceUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

pub(super) fn chown(path: &Path, user: ServiceUser) -> Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).with_context(|| {
        format!(
            "failed to chown {} to {}:{}",
            path.display(),
            user.uid,
            user.gid
        )
    })
}

/// Creates `<tmp>/db-gateway-pg-<pid>-<counter>-<random>` with mode 0700: the pid and counter
/// keep servers of concurrent tests apart, the random part keeps apart runs whose pids repeat.
pub(super) fn create_root_dir(run_as: Option<ServiceUser>) -> Result<PathBuf> {
    let name = format!(
        "{DIR_PREFIX}-{}-{}-{:08x}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    );
    let mut base = std::env::temp_dir();
    // A long $TMPDIR would push the unix socket path past the kernel's limit.
    let socket_len = |base: &Path| {
        base.join(&name)
            .join("sock")
            .join(SOCKET_NAME_MAX)
            .as_os_str()
            .len()
    };
    if socket_len(&base) > MAX_SOCKET_PATH {
        base = PathBuf::from("/tmp");
    }
    let dir = base.join(name);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("failed to create {}", dir.display()))?;
    if let Some(user) = run_as
        && let Err(e) = chown(&dir, user)
    {
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}
