//! The nodes' side of the CA: a fresh key pair per request, a CSR, and the answer checked
//! to carry a certificate. The private key never leaves this process.

use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::body::Bytes;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::wire::{
    CertificateRequest, CertificateResponse, ErrorBody, SERVER_CERTIFICATES_PATH,
    ServerCertificateRequest, WORKLOAD_CERTIFICATES_PATH,
};
use crate::pki::{self, SpiffeId};

/// An answer is a certificate chain of a few KiB; anything bigger is not one.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the CA at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("CA request failed: {0}")]
    Http(String),
    #[error("CA refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
}

/// A workload certificate with its private key, which never leaves this process.
pub struct IssuedCertificate {
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub key: rustls_pki_types::PrivateKeyDer<'static>,
    pub spiffe_id: SpiffeId,
}

/// A server certificate (client TLS at the node) with its private key, which never leaves
/// this process.
pub struct IssuedServerCertificate {
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub key: rustls_pki_types::PrivateKeyDer<'static>,
}

/// A fresh key pair and a CSR for it; the key stays here.
fn key_and_csr() -> Result<(rcgen::KeyPair, String), ClientError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(pki::PkiError::from)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(pki::PkiError::from)?;
    Ok((key, csr))
}

/// The node's side: asks the CA for a pod's workload certificate, or a server certificate.
#[derive(Clone)]
pub struct CaClient {
    /// `host:port`; a name is looked up at every request.
    pub addr: String,
    pub server_name: ServerName<'static>,
    /// TLS with the node's own certificate.
    pub tls: Arc<ClientConfig>,
}

impl CaClient {
    pub async fn workload_certificate(
        &self,
        pod_uid: Option<&str>,
    ) -> Result<IssuedCertificate, ClientError> {
        let (key, csr) = key_and_csr()?;
        let body = serde_json::to_vec(&CertificateRequest {
            pod_uid: pod_uid.map(str::to_owned),
            csr,
        })
        .map_err(|e| ClientError::Http(e.to_string()))?;
        let chain = self.post(WORKLOAD_CERTIFICATES_PATH, body).await?;
        let first = chain
            .first()
            .ok_or_else(|| ClientError::Http("no certificate in answer".into()))?;
        let spiffe_id = pki::spiffe_id_of(first)?;
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(IssuedCertificate {
            chain,
            key,
            spiffe_id,
        })
    }

    /// A server certificate for `dns_names` and `ips` (client TLS at the node); the CA
    /// refuses names its list does not allow.
    pub async fn server_certificate(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<IssuedServerCertificate, ClientError> {
        let (key, csr) = key_and_csr()?;
        let body = serde_json::to_vec(&ServerCertificateRequest {
            dns_names: dns_names.to_vec(),
            ips: ips.to_vec(),
            csr,
        })
        .map_err(|e| ClientError::Http(e.to_string()))?;
        let chain = self.post(SERVER_CERTIFICATES_PATH, body).await?;
        if chain.is_empty() {
            return Err(ClientError::Http("no certificate in answer".into()));
        }
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(IssuedServerCertificate { chain, key })
    }

    /// One request over a fresh mutual-TLS connection; the answer's certificate chain.
    async fn post(
        &self,
        path: &'static str,
        body: Vec<u8>,
    ) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, ClientError> {
        use rustls_pki_types::pem::PemObject;
        let tcp = TcpStream::connect(self.addr.as_str())
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::post(path)
            .header(hyper::header::HOST, "gateway-ca")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("HTTP {status}"));
            return Err(ClientError::Refused(msg));
        }
        let r: CertificateResponse =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(
            rustls_pki_types::CertificateDer::pem_slice_iter(r.certificate.as_bytes())
                .filter_map(Result::ok)
                .collect(),
        )
    }
}
