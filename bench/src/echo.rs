//! The TCP echo server behind the `tcp` scenarios (round trips, idle connections): every
//! path's `tcp` service ends here, so all paths pay the same for it.
//!
//! It runs on a thread of its own with a single-threaded runtime, apart from the
//! orchestrator's work, and lives as long as the run.

use std::net::SocketAddr;

use anyhow::Result;
use tokio::io::AsyncWriteExt;

/// Starts the echo server on a free loopback port and returns its address.
pub fn start() -> Result<SocketAddr> {
    // A deep accept queue: the idle scenario connects in batches of hundreds, and a full
    // queue drops SYNs (one second of retransmit each).
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let addr = socket.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("echo".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = socket.listen(4096) else {
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // EMFILE and the like: wait instead of spinning.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let (mut r, mut w) = stream.into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                }
            });
        })?;
    Ok(addr)
}

/// Raises this process's open-files limit (children inherit it): the idle scenario holds
/// 10 000 connections, which need 10 000 descriptors in the client, the echo server and
/// each hop, two per connection in a tunnel process.
pub fn raise_open_files_limit() {
    gateway::admin::raise_open_files_limit();
}

/// The open-files limit every process of the run has (after raising it).
pub fn open_files_limit() -> u64 {
    gateway::admin::open_files_limit()
}

/// Connections a tunnel process can relay at once: it holds two sockets per connection,
/// and keeps some descriptors for listeners, logs and the runtime.
pub fn max_relayed_connections() -> usize {
    (open_files_limit().saturating_sub(200) / 2) as usize
}
