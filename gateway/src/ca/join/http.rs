//! The CA's outbound HTTP for joins: the issuer's OIDC discovery document and JWKS, and the
//! STS request a node signed. One request per connection (these are rare), HTTPS verified
//! against the system's roots (plus an optional bundle), or plain HTTP where the operator
//! configured an `http://` URL (local test servers).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Discovery documents, key sets and STS answers are a few KiB.
const MAX_BODY: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: {reason}")]
    Failed { url: String, reason: String },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// An HTTP(S) client for the CA's few outbound calls.
#[derive(Clone)]
pub struct Outbound {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl Outbound {
    /// Trusts the system's roots and `extra` (e.g. a private issuer's CA).
    pub fn new(extra: &[CertificateDer<'static>], timeout: Duration) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        for c in extra {
            let _ = roots.add(c.clone());
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tunnel::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            tls: Arc::new(tls),
            timeout,
        }
    }

    pub async fn get(&self, url: &str) -> Result<(u16, Bytes), HttpError> {
        self.request(Method::GET, url, &[], Bytes::new()).await
    }

    /// One request; answers the status and the body (whatever the status).
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<(u16, Bytes), HttpError> {
        tokio::time::timeout(self.timeout, self.send(method, url, headers, body))
            .await
            .unwrap_or_else(|_| {
                Err(HttpError::Timeout {
                    url: url.to_owned(),
                    timeout: self.timeout,
                })
            })
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<(u16, Bytes), HttpError> {
        let fail = |reason: String| HttpError::Failed {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|e| fail(format!("bad URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(fail("only http:// and https:// URLs".into())),
        };
        let host = uri.host().ok_or_else(|| fail("no host".into()))?.to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut req = Request::builder().method(method).uri(path);
        // The signed STS request carries its own Host header.
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or(&host);
            req = req.header(hyper::header::HOST, authority);
        }
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(body)).map_err(|e| fail(e.to_string()))?;
        let resp = if https {
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| fail(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| fail(e.to_string()))?;
            send_on(hyper_util::rt::TokioIo::new(tls), req).await
        } else {
            send_on(hyper_util::rt::TokioIo::new(tcp), req).await
        }
        .map_err(fail)?;
        Ok(resp)
    }
}

async fn send_on<T>(io: T, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}
