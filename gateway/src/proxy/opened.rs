//! A tunnel that passed [`accept`](super::accept): the state both session kinds
//! ([`postgres`](super::postgres), [`tcp`](super::tcp)) start from and a refusal
//! ([`refuse`](super::refuse)) needs. Its own module so that the hops below `accept` can take
//! it without importing `accept` back.

use std::time::Instant;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::limits::Slot;
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
    /// The session's hold on the process, until it ends.
    pub(super) active: Active,
}

/// One unit of `gateway_proxy_active_sessions` and the session's slot under the identity
/// and route caps ([`super::limits`]), both given back when the session ends.
pub(super) struct Active {
    _gauge: GaugeHeld,
    _slot: Slot,
}

impl Active {
    pub(super) fn new(gauge: GaugeHeld, slot: Slot) -> Self {
        Self {
            _gauge: gauge,
            _slot: slot,
        }
    }
}
