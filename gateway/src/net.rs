//! Listening sockets shared by the node agent and the proxy.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// A listener on `addr` that other threads can bind too (SO_REUSEPORT): each data-plane
/// thread gets its own, and the kernel spreads connections over them by 4-tuple hash.
/// TCP_NODELAY is set here so accepted sockets inherit it. The socket is blocking; a
/// caller that hands it to a readiness runtime sets it non-blocking.
pub fn reuseport_listener(
    addr: SocketAddr,
    backlog: i32,
) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    Ok(s.into())
}
