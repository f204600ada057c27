//! A tunnel that passed [`accept`](super::accept): the state both session kinds
//! ([`postgres`](super::postgres), [`tcp`](super::tcp)) start from and a refusal
//! ([`refuse`](super::refuse)) needs. Its own module so that the hops below `accept` can take
//! it without importing `accept` back.

use std::time::Instant;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::admin::GaugeHeld;
use crate::audit::SessionInfo;
use crate::pki::SpiffeId;
use crate::tunnel::Preamble;

/// The node's end of a tunnel, after the TLS handshake.
pub(super) type Client = TlsStream<TcpStream>;

/// A tunnel that passed the TLS handshake and sent its preamble. Phases take it boxed:
/// what a future takes by value stays in it for its whole life.
pub(super) struct Opened {
    pub(super) client: Client,
    pub(super) identity: SpiffeId,
    pub(super) info: SessionInfo,
    pub(super) preamble: Preamble,
    /// When the preamble arrived (a warm tunnel may have waited before it).
    pub(super) started: Instant,
    /// One unit of `gateway_proxy_active_sessions`, until the session ends.
    pub(super) active: GaugeHeld,
}
