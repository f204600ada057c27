//! The tunnel servers' TLS 1.3 session store (the proxy's and the CA's): resumption tickets
//! that end with the client certificate they carry.
//!
//! On resumption rustls restores the client chain stored with the session and does not
//! verify it again, and each resumed handshake stores a fresh session with the same chain:
//! with a plain store, a chain of resumptions outlives a one-hour workload certificate (or
//! a node certificate) for good. This store bounds every stored session by its client
//! certificate's `notAfter`, so a resumption after that falls back to a full handshake,
//! which the verifier refuses for the expired certificate. (The lifetime hint rustls sends
//! with a stateful ticket is fixed; the bound is enforced here, where the ticket is
//! redeemed.) A session whose certificate cannot be read is not stored at all: no
//! resumption is the safe side.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};

/// As many sessions as rustls keeps by default (`ServerConfig::builder`).
const SESSIONS: usize = 256;
/// Bytes of the `notAfter` (unix seconds, big endian) put before each stored session.
const STAMP: usize = 8;

/// A session store whose entries expire with their client certificate.
#[derive(Debug)]
pub struct CertificateBoundSessions {
    inner: Arc<ServerSessionMemoryCache>,
}

impl CertificateBoundSessions {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: ServerSessionMemoryCache::new(SESSIONS),
        })
    }
}

/// The stored session if its client certificate is still valid.
fn unstamp(stored: Vec<u8>) -> Option<Vec<u8>> {
    let not_after = i64::from_be_bytes(stored.get(..STAMP)?.try_into().ok()?);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (now <= not_after).then(|| stored[STAMP..].to_vec())
}

impl StoresServerSessions for CertificateBoundSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let Some(not_after) = client_not_after(&value) else {
            return false;
        };
        let mut stamped = Vec::with_capacity(STAMP + value.len());
        stamped.extend_from_slice(&not_after.to_be_bytes());
        stamped.extend_from_slice(&value);
        self.inner.put(key, stamped)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(key).and_then(unstamp)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(key).and_then(unstamp)
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

/// Splits `n` bytes off the front of `r`.
fn split<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, tail) = r.split_at(n);
    *r = tail;
    Some(head)
}

fn u24(r: &mut &[u8]) -> Option<usize> {
    let b = split(r, 3)?;
    Some(((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
}

/// The `notAfter` of the client's end-entity certificate in a stored session value
/// (rustls 0.23's `ServerSessionValue` encoding: SNI, version, cipher suite, master
/// secret, extended master secret, then the client chain as a TLS certificate list).
/// `None` when there is none or the layout is not that; a unit test holds the layout to
/// the rustls in use.
fn client_not_after(value: &[u8]) -> Option<i64> {
    let mut r = value;
    if split(&mut r, 1)? == [1] {
        let len = split(&mut r, 1)?[0] as usize;
        split(&mut r, len)?;
    }
    split(&mut r, 4)?; // version, cipher suite
    let secret = split(&mut r, 1)?[0] as usize;
    split(&mut r, secret)?;
    split(&mut r, 1)?; // extended master secret
    if split(&mut r, 1)? != [1] {
        return None;
    }
    let total = u24(&mut r)?;
    let mut chain = split(&mut r, total)?;
    let len = u24(&mut chain)?;
    let der = split(&mut chain, len)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::HandshakeKind;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use crate::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};

    type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

    fn pair((cert, key): (String, String)) -> Pair {
        (
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
    }

    /// One handshake (and one byte from the server, which carries its tickets): how the
    /// client's end of it went.
    async fn handshake(
        acceptor: &TlsAcceptor,
        connector: &TlsConnector,
    ) -> Result<HandshakeKind, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = async {
            let mut tls = acceptor.accept(a).await.map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(tls)
        };
        let client = async {
            let name = ServerName::try_from("proxy.test").unwrap();
            let mut tls = connector
                .connect(name, b)
                .await
                .map_err(|e| e.to_string())?;
            let mut one = [0u8; 1];
            tls.read_exact(&mut one).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(tls.get_ref().1.handshake_kind())
        };
        let (server, client) = tokio::join!(server, client);
        let _server = server?;
        client?.ok_or_else(|| "no handshake kind".into())
    }

    #[tokio::test]
    async fn hardening_02_resumption_ends_with_the_client_certificate() {
        let dir = std::env::temp_dir().join(format!("dbgw-sessions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        pki::init_ca(&dir, "unit.test").unwrap();
        let ca = CertificateAuthority::load(
            &dir.join(pki::WORKLOAD_CA_CERT),
            &dir.join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        let roots = pki::load_certs(&dir.join(pki::WORKLOAD_CA_CERT)).unwrap();
        let (chain, key) = pair(
            ca.issue(
                &LeafSpec::server(vec!["proxy.test".into()], vec![]),
                Duration::from_secs(600),
            )
            .unwrap(),
        );
        let server = super::super::server_config(chain, key, &roots).unwrap();
        let acceptor = TlsAcceptor::from(std::sync::Arc::new(server));
        let id = LeafSpec::workload(&SpiffeId::new("unit.test", "a", "b"));
        let now = std::time::SystemTime::now();
        let (chain, key) = pair(
            ca.issue_between(
                &id,
                now - Duration::from_secs(60),
                now + Duration::from_secs(2),
            )
            .unwrap(),
        );
        let client = super::super::client_config(chain, key, &roots).unwrap();
        let connector = TlsConnector::from(std::sync::Arc::new(client));

        assert_eq!(
            handshake(&acceptor, &connector).await,
            Ok(HandshakeKind::Full)
        );
        // The store read the certificate out of the session: the next handshake resumes,
        // and so does the one after it (a chain of resumptions).
        for _ in 0..2 {
            assert_eq!(
                handshake(&acceptor, &connector).await,
                Ok(HandshakeKind::Resumed)
            );
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        // Past notAfter: no resumption, and the full handshake refuses the certificate.
        let after = handshake(&acceptor, &connector).await;
        assert!(after.is_err(), "{after:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
