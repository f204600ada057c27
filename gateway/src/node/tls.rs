//! rustls driven by hand over io_uring: the connection object only ever sees byte slices
//! (`read_tls` / `process_new_packets` / `write_tls`), and the socket I/O is done with
//! owned buffers, which is what io_uring's completion model needs.
//!
//! One type for both ends: the tunnel's client side (`TlsConn<ClientConnection>`) and the
//! application's TLS that the node terminates (`TlsConn<ServerConnection>`, see
//! `client_tls`). Both relay directions share one connection (one task each on the same
//! thread, hence `RefCell`). Sealing records and writing them to the socket happen under one async
//! lock: two tasks writing records out of order would break the TLS sequence numbers.

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::ops::DerefMut;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConnection, SideData};
use rustls_pki_types::ServerName;
use tokio_uring::net::TcpStream;

pub struct TlsConn<C = ClientConnection> {
    sock: Rc<TcpStream>,
    tls: RefCell<C>,
    /// Sealed records waiting for the socket; the lock orders writers.
    out: tokio::sync::Mutex<Vec<u8>>,
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsConn<ClientConnection> {
    /// Whether this tunnel's handshake resumed an earlier TLS session (no certificates
    /// exchanged, no signatures made).
    pub fn resumed(&self) -> bool {
        self.tls.borrow().handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Dials `addr` and completes the TLS 1.3 handshake.
    pub async fn connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Result<Self, ConnectError> {
        let sock = TcpStream::connect(addr).await.map_err(ConnectError::Tcp)?;
        let _ = sock.set_nodelay(true);
        let tls = ClientConnection::new(config, server_name)
            .map_err(|e| ConnectError::Tls(tls_err(e)))?;
        let conn = Self {
            sock: Rc::new(sock),
            tls: RefCell::new(tls),
            // Grows to what sealing needs; an idle connection's stays small.
            out: tokio::sync::Mutex::new(Vec::new()),
        };
        conn.handshake(&mut Vec::new(), "proxy")
            .await
            .map_err(ConnectError::Tls)?;
        Ok(conn)
    }
}

impl TlsConn<ServerConnection> {
    /// The application's side, on its accepted socket: `tls` is not handshaken yet. The
    /// socket stays shared with the caller, which may still write to it in the clear.
    pub fn accept(sock: Rc<TcpStream>, tls: ServerConnection) -> Self {
        Self {
            sock,
            tls: RefCell::new(tls),
            out: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    /// Shuts the socket both ways (a client whose TLS broke gets no more).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// The ALPN protocol both sides agreed on.
    pub fn alpn_is(&self, protocol: &[u8]) -> bool {
        self.tls.borrow().alpn_protocol() == Some(protocol)
    }

    /// Feeds bytes already read from the socket (a ClientHello read while looking at the
    /// first bytes) to rustls; plaintext cannot come before the handshake.
    pub fn ingest_early(&self, cipher: &[u8]) -> io::Result<()> {
        let mut plain = Vec::new();
        self.ingest(cipher, &mut plain).map(|_| ())
    }
}

impl<C, D> TlsConn<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
    D: SideData,
{
    /// Completes the handshake; application data that arrived with the peer's last
    /// handshake flight (a client's startup packet after its Finished) is appended to
    /// `plain`. `peer` names the other side in the error for a close.
    pub async fn handshake(&self, plain: &mut Vec<u8>, peer: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(16 * 1024);
        loop {
            self.flush().await?;
            if !self.tls.borrow().is_handshaking() {
                return Ok(());
            }
            buf.clear();
            let (res, b) = self.sock.read(buf).await;
            buf = b;
            if res? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{peer} closed the connection during the TLS handshake"),
                ));
            }
            if let Err(e) = self.ingest(&buf, plain) {
                // Send our alert (if any) before giving up, so the peer logs why.
                let _ = self.flush().await;
                return Err(e);
            }
        }
    }

    /// Writes out whatever records rustls has ready (handshake messages, alerts,
    /// key updates, close_notify).
    pub async fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock().await;
        self.seal(&[], &mut out)?;
        self.write_out(&mut out).await
    }

    /// Seals `plain` into records and writes them.
    pub async fn send(&self, plain: &[u8]) -> io::Result<()> {
        let mut out = self.out.lock().await;
        self.seal(plain, &mut out)?;
        self.write_out(&mut out).await
    }

    fn seal(&self, mut plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut tls = self.tls.borrow_mut();
        loop {
            // rustls buffers at most its plaintext limit; take what it accepts, drain, repeat.
            let n = tls.writer().write(plain)?;
            plain = &plain[n..];
            while tls.wants_write() {
                tls.write_tls(out)?;
            }
            if plain.is_empty() {
                return Ok(());
            }
        }
    }

    async fn write_out(&self, out: &mut Vec<u8>) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(out);
        let (res, mut buf) = self.sock.write_all(buf).await;
        buf.clear();
        *out = buf;
        res
    }

    /// Reads ciphertext into `buf` and appends the plaintext it yields to `plain` (an
    /// empty `plain` gets a pooled buffer once there is ciphertext). Returns whether the
    /// stream is still open (`false` after close_notify or TCP EOF) and the bytes read.
    pub async fn recv(
        &self,
        mut buf: Vec<u8>,
        plain: &mut Vec<u8>,
    ) -> (io::Result<(bool, usize)>, Vec<u8>) {
        buf.clear();
        let (res, buf) = self.sock.read(buf).await;
        let n = match res {
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        if n == 0 {
            return (Ok((false, 0)), buf);
        }
        if plain.capacity() == 0 {
            *plain = crate::buffer_pool::take(n);
        }
        let r = self.ingest(&buf[..n], plain);
        if r.is_err() {
            let _ = self.flush().await;
        }
        (r.map(|open| (open, n)), buf)
    }

    /// Feeds ciphertext to rustls and drains the plaintext. `Ok(false)` once the peer sent
    /// close_notify.
    fn ingest(&self, mut cipher: &[u8], plain: &mut Vec<u8>) -> io::Result<bool> {
        let mut tls = self.tls.borrow_mut();
        let mut open = true;
        while !cipher.is_empty() {
            let n = tls.read_tls(&mut cipher)?;
            if n == 0 {
                break;
            }
            let state = tls.process_new_packets().map_err(tls_err)?;
            let mut left = state.plaintext_bytes_to_read();
            plain.reserve(left);
            // Copied straight from rustls' buffers (`fill_buf`): `read` would need the
            // destination zeroed first, a memset per record that showed up in profiles.
            let mut reader = tls.reader();
            while left > 0 {
                let chunk = reader.fill_buf()?;
                if chunk.is_empty() {
                    break;
                }
                let n = chunk.len().min(left);
                plain.extend_from_slice(&chunk[..n]);
                reader.consume(n);
                left -= n;
            }
            if state.peer_has_closed() {
                open = false;
            }
        }
        Ok(open)
    }

    /// Sends close_notify and half-closes the socket: the proxy sees a clean end.
    pub async fn close_write(&self) {
        self.tls.borrow_mut().send_close_notify();
        let _ = self.flush().await;
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }

    /// For a tunnel that sat unused: takes in whatever the proxy sent meanwhile (TLS 1.3
    /// session tickets, which rustls stores for resumption) without waiting, and says
    /// whether the tunnel is still good: open, and no application data or alert arrived.
    /// Only valid while no read is posted on the socket.
    pub fn still_open(&self) -> bool {
        let fd = self.sock.as_raw_fd();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: recv(2) into a live stack buffer of the given length; MSG_DONTWAIT
            // never blocks the runtime thread.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                return io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
            }
            if n == 0 {
                return false;
            }
            let mut plain = Vec::new();
            match self.ingest(&buf[..n as usize], &mut plain) {
                Ok(true) if plain.is_empty() => continue,
                _ => return false,
            }
        }
    }

    pub fn wants_write(&self) -> bool {
        self.tls.borrow().wants_write()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tcp(io::Error),
    #[error("{0}")]
    Tls(io::Error),
}
