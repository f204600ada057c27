//! The CA's wire: one path, a JSON request and answer, a JSON error body. Shared by the
//! service (`ca::service`) and the nodes' client (`ca::client`).

use serde::{Deserialize, Serialize};

pub const WORKLOAD_CERTIFICATES_PATH: &str = "/v1/workload-certificates";
/// Server certificates for client TLS at the node (the original destinations it serves).
pub const SERVER_CERTIFICATES_PATH: &str = "/v1/server-certificates";

/// A node asks for a server certificate naming `dns_names` and `ips`; the CA issues it only
/// if its `--server-names` list allows every one.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerCertificateRequest {
    pub dns_names: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The pod, or `None` for the node's host identity (processes outside any pod).
    pub pod_uid: Option<String>,
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    pub certificate: String,
    pub spiffe_id: String,
}

/// The body of every refusal (`403`, `400`, `404`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
