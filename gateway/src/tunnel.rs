//! What the node and the proxy agree on: the mTLS settings of the tunnel and the
//! versioned preamble the node sends first inside it.
//!
//! Wire format of the preamble (after the TLS handshake, before any PostgreSQL byte):
//!
//! ```text
//! "DBGW" | version: u8 (= 1) | length: u32 BE | JSON body (length bytes)
//! ```
//!
//! The body is informational (route, original destination, pod metadata): the proxy takes
//! the workload's *identity* only from the verified client certificate, never from here.
//!
//! Shared by both wings; imports only the vocabulary the preamble is written in (`route`,
//! `pod`).

mod roots;
mod sessions;

pub use roots::ReloadableRoots;

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::pod::PodMeta;
use crate::route::Protocol;

pub const PREAMBLE_MAGIC: &[u8; 4] = b"DBGW";
pub const PREAMBLE_VERSION: u8 = 1;
/// A preamble is a few hundred bytes; the bound keeps a broken peer from making the proxy
/// allocate.
pub const MAX_PREAMBLE_LEN: usize = 64 * 1024;
pub const PREAMBLE_HEADER_LEN: usize = 9;
/// ALPN protocol id of the tunnel, so a TLS endpoint of something else fails fast.
pub const ALPN: &[u8] = b"dbgw/1";
/// One TLS record of plaintext (RFC 8446's maximum fragment): the unit the relays of both
/// wings coalesce to, and the least buffer budget per direction that can hold one record.
pub const TLS_RECORD_PAYLOAD: usize = 16 * 1024;

/// Cancel keys across proxy replicas (issue 20): a proxy with `replica_index` issues cancel
/// secrets whose top [`REPLICA_BITS`] bits are its index, and a node with `proxy.replicas`
/// sends a `CancelRequest` to the replica its secret names. Why this and not the node
/// remembering each session's replica: sessions reach the replicas through one service
/// address (a load balancer picks), so the node never learns where a session went, and a
/// restarted node would have forgotten; the index in the key needs no shared state and no
/// per-session memory. The cost: 24 of the secret's 32 bits stay random (a cancel is also
/// honoured only from the session's own identity, and the pid must match).
pub const REPLICA_BITS: u32 = 8;

/// The most replicas a cancel can be routed among.
pub const MAX_REPLICAS: usize = 1 << REPLICA_BITS;

/// A cancel secret of replica `index`: the index on top, `random`'s low bits below.
pub fn replica_secret(index: u8, random: u32) -> i32 {
    ((u32::from(index) << (32 - REPLICA_BITS)) | (random >> REPLICA_BITS)) as i32
}

/// The replica index a cancel secret carries (meaningful when its proxy had one).
pub fn replica_of(secret: i32) -> usize {
    (secret as u32 >> (32 - REPLICA_BITS)) as usize
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("bad preamble: {0}")]
    BadPreamble(String),
    #[error("unsupported preamble version {0} (this proxy speaks {PREAMBLE_VERSION})")]
    Version(u8),
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("tls client verifier: {0}")]
    Verifier(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Preamble {
    /// Database route (a `databases[].name` in the proxy policy).
    pub route: String,
    /// The node's name, for the audit log.
    pub node: String,
    /// The application's address as the node saw it.
    pub client_addr: SocketAddr,
    /// The address the application dialled (transparent mode) or the listener (explicit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<SocketAddr>,
    #[serde(default)]
    pub pod: PodMeta,
    /// What the node relays: the proxy refuses a preamble whose protocol is not its
    /// route's (absent = `postgres`, as nodes before `tcp` routes sent).
    #[serde(default, skip_serializing_if = "Protocol::is_postgres")]
    pub protocol: Protocol,
}

impl Preamble {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of strings and addresses cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(PREAMBLE_HEADER_LEN + body.len());
        out.extend_from_slice(PREAMBLE_MAGIC);
        out.push(PREAMBLE_VERSION);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Checks the fixed header and returns the body length to read next.
    pub fn body_len(header: &[u8; PREAMBLE_HEADER_LEN]) -> Result<usize, TunnelError> {
        if &header[..4] != PREAMBLE_MAGIC {
            return Err(TunnelError::BadPreamble(
                "missing DBGW magic: the peer is not a db-gateway node".into(),
            ));
        }
        if header[4] != PREAMBLE_VERSION {
            return Err(TunnelError::Version(header[4]));
        }
        let len = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) as usize;
        if len > MAX_PREAMBLE_LEN {
            return Err(TunnelError::BadPreamble(format!(
                "length {len} exceeds {MAX_PREAMBLE_LEN}"
            )));
        }
        Ok(len)
    }

    pub fn decode_body(body: &[u8]) -> Result<Self, TunnelError> {
        serde_json::from_slice(body).map_err(|e| TunnelError::BadPreamble(e.to_string()))
    }
}

/// Reset, broken pipe, EOF and the like: the normal ways a TCP session ends, which the
/// relays of both wings count as a close, not as an error.
pub fn is_normal_close(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected
    )
}

/// rustls with ring, as DESIGN.md fixes; one place so both ends agree.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TunnelError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    Ok(roots)
}

/// The proxy's (and the CA's) end: TLS 1.3 only, a client certificate from the workload CA
/// required, resumption only while that certificate is valid.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: &[CertificateDer<'static>],
) -> Result<ServerConfig, TunnelError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)?), provider.clone())
            .build()
            .map_err(|e| TunnelError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Resumed sessions end with their client certificate (see `sessions`).
    cfg.session_storage = sessions::CertificateBoundSessions::new();
    Ok(cfg)
}

/// The node's end, per workload identity: TLS 1.3 only, the proxy verified against the CA.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    proxy_ca: &[CertificateDer<'static>],
) -> Result<ClientConfig, TunnelError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots(proxy_ca)?), provider.clone())
            .build()
            .map_err(|e| TunnelError::Verifier(e.to_string()))?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_20_cancel_secrets_carry_their_replica() {
        for index in [0u8, 1, 7, 255] {
            for random in [0u32, 1, 0xffff_ffff, 0x1234_5678] {
                assert_eq!(
                    replica_of(replica_secret(index, random)),
                    usize::from(index)
                );
            }
        }
        // The other 24 bits are the random ones.
        assert_ne!(replica_secret(3, 0x100), replica_secret(3, 0x200));
    }

    #[test]
    fn preamble_round_trips_and_rejects_garbage() {
        let p = Preamble {
            route: "db".into(),
            node: "n1".into(),
            client_addr: "127.0.0.1:5555".parse().unwrap(),
            original_dst: Some("10.0.0.1:5432".parse().unwrap()),
            pod: PodMeta {
                namespace: Some("ns".into()),
                ..PodMeta::default()
            },
            protocol: Protocol::Postgres,
        };
        let bytes = p.encode();
        // Nodes from before `tcp` routes sent no protocol: absent means postgres, and a
        // postgres preamble is still written without it.
        assert!(!String::from_utf8_lossy(&bytes).contains("protocol"));
        let tcp = Preamble {
            protocol: Protocol::Tcp,
            ..p.clone()
        };
        let tcp_bytes = tcp.encode();
        assert_eq!(
            Preamble::decode_body(&tcp_bytes[PREAMBLE_HEADER_LEN..]).unwrap(),
            tcp
        );
        let header: [u8; PREAMBLE_HEADER_LEN] = bytes[..PREAMBLE_HEADER_LEN].try_into().unwrap();
        let len = Preamble::body_len(&header).unwrap();
        assert_eq!(len, bytes.len() - PREAMBLE_HEADER_LEN);
        assert_eq!(
            Preamble::decode_body(&bytes[PREAMBLE_HEADER_LEN..]).unwrap(),
            p
        );

        let mut wrong_version = header;
        wrong_version[4] = 9;
        assert!(matches!(
            Preamble::body_len(&wrong_version),
            Err(TunnelError::Version(9))
        ));
        let mut huge = header;
        huge[5..].copy_from_slice(&(MAX_PREAMBLE_LEN as u32 + 1).to_be_bytes());
        assert!(Preamble::body_len(&huge).is_err());
        assert!(Preamble::body_len(b"\0\0\0\x08\x04\xd2\x16\x2f\0").is_err());
        assert!(Preamble::decode_body(b"{not json").is_err());
    }
}
