//! A server verifier whose roots can be replaced while connections use it: what the node
//! verifies the CA with (`interception.ca.ca`), so that a root rotation's bundle is taken
//! without rebuilding the TLS clients that hold it (the join renewal's and the workload
//! certificate requests'). Each handshake verifies against the roots of that moment.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::TunnelError;

#[derive(Debug)]
pub struct ReloadableRoots(ArcSwap<WebPkiServerVerifier>);

fn verifier(roots: &[CertificateDer<'static>]) -> Result<Arc<WebPkiServerVerifier>, TunnelError> {
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(super::roots(roots)?),
        super::crypto_provider(),
    )
    .build()
    .map_err(|e| TunnelError::Verifier(e.to_string()))
}

impl ReloadableRoots {
    pub fn new(roots: &[CertificateDer<'static>]) -> Result<Self, TunnelError> {
        Ok(Self(ArcSwap::new(verifier(roots)?)))
    }

    /// From the next handshake on, the server must chain to one of `roots`.
    pub fn set(&self, roots: &[CertificateDer<'static>]) -> Result<(), TunnelError> {
        self.0.store(verifier(roots)?);
        Ok(())
    }
}

impl ServerCertVerifier for ReloadableRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .load()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().supported_verify_schemes()
    }
}
