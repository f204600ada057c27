//! What the harness needs from this machine, in one copy for the stack, the integration
//! tests and the bench: free ports, temporary directories, whether we are root (and the
//! root-or-skip rule of privileged tests), and stopping child processes.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A free TCP port on loopback. Another process may take it before we bind it again;
/// start-up then fails with a bind error naming the address, and callers retry.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("failed to find a free port")?;
    Ok(listener
        .local_addr()
        .context("failed to read the probe's address")?
        .port())
}

/// `127.0.0.1:<port>`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A new directory `<tmp>/<prefix>-<pid>-<random>`: the pid keeps concurrent test binaries
/// apart, the random part keeps apart runs whose pids repeat.
pub fn temp_dir(prefix: &str) -> Result<PathBuf> {
    let nonce: u64 = rand::random();
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nonce:016x}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    Ok(dir)
}

/// Whether this process runs as root (what interception, namespaces and cgroups need).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether `CI=true`: there a privileged test that cannot run fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Root-or-skip for privileged tests: `true` when `missing` is `None`; otherwise prints why
/// `what` skips and returns `false`, or panics under `CI=true`, where skipping would hide
/// that the test never ran.
pub fn can_run_privileged(what: &str, missing: Option<String>) -> bool {
    let Some(why) = missing else {
        return true;
    };
    assert!(!in_ci(), "CI=true: {what} must run but cannot: {why}");
    eprintln!("skipping {what}: {why}");
    false
}

/// [`can_run_privileged`] with root as the only requirement.
pub fn root_or_skip(what: &str) -> bool {
    can_run_privileged(what, (!is_root()).then(|| "needs root".to_owned()))
}

/// SIGTERM, up to `grace` for the child to exit, then SIGKILL; always reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) {
    stop_children(std::slice::from_mut(child), grace);
}

/// SIGTERM to every child at once, up to `grace` (in all) for them to exit, then SIGKILL to
/// those still running; always reaps them.
pub fn stop_children(children: &mut [Child], grace: Duration) {
    for c in children.iter() {
        // SAFETY: kill(2) on our own unreaped child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    for c in children.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
