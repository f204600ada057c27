//! Certificates: the workload CA (mTLS between node and proxy), the database-client CA
//! (the proxy's short-lived upstream logins), and the SPIFFE identities inside them.
//!
//! All keys are ECDSA P-256 made with rcgen on ring. A private key leaves the process
//! that made it only as a file with mode 0600.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

mod files;
pub mod rotate;
pub mod watch;
pub use files::{write_public, write_secret};

pub const WORKLOAD_CA_CERT: &str = "workload-ca.crt";
pub const WORKLOAD_CA_KEY: &str = "workload-ca.key";
/// Every root that verifiers trust for workload, node and server certificates: the signing
/// root alone, or during a rotation ([`rotate`]) the old and the new one. Proxies (`tls.client_ca`),
/// nodes (`proxy.ca`, `interception.ca.ca`) and the CA itself read this file, not the root.
pub const WORKLOAD_BUNDLE: &str = "workload-bundle.crt";
pub const DB_CLIENT_CA_CERT: &str = "db-client-ca.crt";
pub const DB_CLIENT_CA_KEY: &str = "db-client-ca.key";
const TRUST_DOMAIN_FILE: &str = "trust-domain";
/// Certificates are back-dated this much so a node whose clock runs a little behind the
/// CA's still accepts them.
const CLOCK_SKEW_LEEWAY: Duration = Duration::from_secs(5 * 60);
/// CA certificates live long; leaf certificates are short-lived (TTL chosen per issue).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Upper bound for workload certificates: DESIGN.md keeps leaf TTLs at an hour or less,
/// except that the CLI allows longer ones for explicit-mode deployments that rotate by hand.
pub const MAX_LEAF_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a CA (remove it first)")]
    Exists { path: PathBuf },
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error("no usable private key in {path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    BadSpiffeId { id: String, reason: String },
    #[error("ttl {0:?} is out of range (1s ..= 90 days)")]
    BadTtl(Duration),
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("certificate expired at {not_after} (unix seconds)")]
    Expired { not_after: i64 },
    #[error("certificate is not valid before {not_before} (unix seconds)")]
    NotYetValid { not_before: i64 },
}

/// A SPIFFE ID of the shape `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
/// the only shape workloads get (it is what Kubernetes identity maps to).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    pub fn parse(id: &str) -> Result<Self, PkiError> {
        let bad = |reason: &str| PkiError::BadSpiffeId {
            id: id.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("must start with spiffe://"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("missing path /ns/<namespace>/sa/<service-account>"))?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !valid(td) || td.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(
                "trust domain must be lower-case letters, digits, '-', '.', '_'",
            ));
        }
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if valid(ns) && valid(sa) => Ok(Self::new(td, ns, sa)),
            _ => Err(bad("path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Reads the first certificate chain from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(PkiError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PkiError::BadKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn validity(params: &mut CertificateParams, ttl: Duration) -> Result<(), PkiError> {
    if ttl < Duration::from_secs(1) || ttl > CA_VALIDITY {
        return Err(PkiError::BadTtl(ttl));
    }
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW_LEEWAY).into();
    params.not_after = (now + ttl).into();
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial);
    serial[0] &= 0x7f; // positive INTEGER
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(())
}

fn ca_params(common_name: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "db-gateway");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_VALIDITY)?;
    Ok(params)
}

/// `gateway ca init`: makes both CAs in `dir`. Refuses to overwrite an existing CA, since
/// that would silently invalidate every certificate it issued.
pub fn init_ca(dir: &Path, trust_domain: &str) -> Result<(), PkiError> {
    // Validates the trust domain with the same rules as IDs.
    SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/x/sa/x"))?;
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;
    for name in [
        WORKLOAD_CA_CERT,
        WORKLOAD_CA_KEY,
        DB_CLIENT_CA_CERT,
        DB_CLIENT_CA_KEY,
    ] {
        let path = dir.join(name);
        if path.exists() {
            return Err(PkiError::Exists { path });
        }
    }
    for (cn, cert_file, key_file) in [
        (
            format!("db-gateway workload CA ({trust_domain})"),
            WORKLOAD_CA_CERT,
            WORKLOAD_CA_KEY,
        ),
        (
            format!("db-gateway database-client CA ({trust_domain})"),
            DB_CLIENT_CA_CERT,
            DB_CLIENT_CA_KEY,
        ),
    ] {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params(&cn)?.self_signed(&key)?;
        write_secret(&dir.join(key_file), &key.serialize_pem())?;
        write_public(&dir.join(cert_file), &cert.pem())?;
        if cert_file == WORKLOAD_CA_CERT {
            write_public(&dir.join(WORKLOAD_BUNDLE), &cert.pem())?;
        }
    }
    write_public(&dir.join(TRUST_DOMAIN_FILE), &format!("{trust_domain}\n"))
}

/// One CA loaded from its PEM files: enough to sign leaves.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let read = |p: &Path| {
            fs::read_to_string(p).map_err(|source| PkiError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let key_pair = KeyPair::from_pem(&read(key)?).map_err(|e| PkiError::BadKey {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
        // A key of another certificate would sign leaves nothing verifies (a rotation's
        // files caught half-replaced, a Secret edited by hand): refuse the pair instead.
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        if x509.public_key().raw
            != rcgen::PublicKeyData::subject_public_key_info(&key_pair).as_slice()
        {
            return Err(PkiError::BadKey {
                path: key.to_owned(),
                reason: format!("it is not the key of {}", cert.display()),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)?;
        Ok(Self { cert_pem, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf with a fresh key; returns (certificate PEM, private key PEM).
    pub fn issue(&self, leaf: &LeafSpec, ttl: Duration) -> Result<(String, String), PkiError> {
        let (cert, key) = self.sign(leaf, ttl)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Like [`Self::issue`], but keeps the key in memory (the proxy's upstream logins).
    pub fn issue_der(
        &self,
        leaf: &LeafSpec,
        ttl: Duration,
    ) -> Result<(CertificateDer<'static>, KeyPair), PkiError> {
        let (cert, key) = self.sign(leaf, ttl)?;
        Ok((cert.der().clone(), key))
    }

    fn sign(
        &self,
        leaf: &LeafSpec,
        ttl: Duration,
    ) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
        if ttl > MAX_LEAF_TTL {
            return Err(PkiError::BadTtl(ttl));
        }
        let mut params = leaf_params(leaf)?;
        validity(&mut params, ttl)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }

    /// Signs a certificate for a public key from a CSR. Only the key is taken from the
    /// request: names and usages come from `leaf`, i.e. from what the CA verified, never
    /// from what the requester asked for.
    pub fn issue_for_csr(
        &self,
        leaf: &LeafSpec,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        if ttl > MAX_LEAF_TTL {
            return Err(PkiError::BadTtl(ttl));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = leaf_params(leaf)?;
        validity(&mut params, ttl)?;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// Issues a leaf valid exactly from `not_before` to `not_after`: for tests of expiry
    /// handling (an already expired certificate) and tools that align validity windows.
    pub fn issue_between(
        &self,
        leaf: &LeafSpec,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String), PkiError> {
        let mut params = leaf_params(leaf)?;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn leaf_params(leaf: &LeafSpec) -> Result<CertificateParams, PkiError> {
    let mut sans = Vec::new();
    for d in &leaf.dns_names {
        sans.push(SanType::DnsName(d.clone().try_into()?));
    }
    for ip in &leaf.ips {
        sans.push(SanType::IpAddress(*ip));
    }
    if let Some(id) = &leaf.spiffe_id {
        sans.push(SanType::URI(id.to_string().try_into()?));
    }
    if let Some(uri) = &leaf.node_uri {
        sans.push(SanType::URI(uri.clone().try_into()?));
    }
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, leaf.common_name.as_str());
    if let Some(node) = &leaf.issued_to_node {
        dn.push(DnType::OrganizationalUnitName, node.as_str());
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = leaf.usages.clone();
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// What goes into a leaf certificate.
#[derive(Debug, Clone, Default)]
pub struct LeafSpec {
    pub common_name: String,
    pub spiffe_id: Option<SpiffeId>,
    /// A node's SPIFFE URI (see [`LeafSpec::node`]).
    pub node_uri: Option<String>,
    /// The SPIFFE ID of the node a workload certificate was issued to (see
    /// [`LeafSpec::on_node`]), in the subject's organizational unit.
    pub issued_to_node: Option<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub usages: Vec<ExtendedKeyUsagePurpose>,
}

impl LeafSpec {
    /// A workload (node → proxy client) certificate.
    pub fn workload(id: &SpiffeId) -> Self {
        Self {
            common_name: id.to_string(),
            spiffe_id: Some(id.clone()),
            usages: vec![ExtendedKeyUsagePurpose::ClientAuth],
            ..Self::default()
        }
    }

    /// The workload certificate bound to the node the CA service issued it to: the proxy
    /// then records that node from the certificate instead of the preamble's claim, and
    /// refuses a preamble naming another. A subject attribute, not a SAN: an X509-SVID
    /// carries exactly one URI, the workload's.
    pub fn on_node(mut self, trust_domain: &str, node_name: &str) -> Self {
        self.issued_to_node = Some(node_spiffe_id(trust_domain, node_name));
        self
    }

    /// A server certificate (the proxy, or a PostgreSQL server in the demo and tests).
    pub fn server(dns_names: Vec<String>, ips: Vec<IpAddr>) -> Self {
        Self {
            common_name: dns_names
                .first()
                .cloned()
                .or_else(|| ips.first().map(IpAddr::to_string))
                .unwrap_or_else(|| "db-gateway".to_owned()),
            dns_names,
            ips,
            usages: vec![ExtendedKeyUsagePurpose::ServerAuth],
            ..Self::default()
        }
    }

    /// A node agent's own certificate (`spiffe://<td>/node/<name>`): it authenticates the
    /// node to the CA, and is never a workload identity ([`SpiffeId::parse`] refuses it).
    pub fn node(trust_domain: &str, node_name: &str) -> Self {
        Self {
            common_name: node_name.to_owned(),
            node_uri: Some(node_spiffe_id(trust_domain, node_name)),
            usages: vec![ExtendedKeyUsagePurpose::ClientAuth],
            ..Self::default()
        }
    }

    /// A database-client certificate: PostgreSQL's `cert` method maps CN to the user.
    pub fn db_client(user: &str) -> Self {
        Self {
            common_name: user.to_owned(),
            usages: vec![ExtendedKeyUsagePurpose::ClientAuth],
            ..Self::default()
        }
    }
}

/// A node's own identity, `spiffe://<td>/node/<name>`.
pub fn node_spiffe_id(trust_domain: &str, node_name: &str) -> String {
    format!("spiffe://{trust_domain}/node/{node_name}")
}

/// The node a workload certificate was issued to ([`LeafSpec::on_node`]), if it names one
/// of `trust_domain`: certificates from `gateway ca issue` (explicit listeners) name none.
pub fn issued_to_node_of(cert: &CertificateDer<'_>, trust_domain: &str) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let prefix = format!("spiffe://{trust_domain}/node/");
    x509.subject()
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .find_map(|ou| ou.strip_prefix(&prefix))
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .map(str::to_owned)
}

/// The node name in a node certificate (`spiffe://<td>/node/<name>` in the trust domain).
pub fn node_name_of(cert: &CertificateDer<'_>, trust_domain: &str) -> Result<String, PkiError> {
    let bad = |reason: String| PkiError::BadSpiffeId {
        id: String::new(),
        reason,
    };
    let uris = spiffe_uris(cert)?;
    let prefix = format!("spiffe://{trust_domain}/node/");
    match uris.as_slice() {
        [one] => one
            .strip_prefix(&prefix)
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("{one} is not a node identity of {trust_domain}"))),
        _ => Err(bad(
            "a node certificate carries exactly one spiffe:// URI".into()
        )),
    }
}

fn spiffe_uris(cert: &CertificateDer<'_>) -> Result<Vec<String>, PkiError> {
    let bad = |reason: String| PkiError::BadSpiffeId {
        id: String::new(),
        reason,
    };
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| bad(format!("certificate does not parse: {e}")))?;
    let Some(san) = x509
        .subject_alternative_name()
        .map_err(|e| bad(format!("bad subjectAltName: {e}")))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                Some((*u).to_owned())
            }
            _ => None,
        })
        .collect())
}

/// Reads the SPIFFE ID from a certificate's URI SANs. Exactly one `spiffe://` URI is
/// allowed, as the X509-SVID spec requires; anything else is no identity at all.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PkiError> {
    let uris = spiffe_uris(cert)?;
    match uris.as_slice() {
        [one] => SpiffeId::parse(one),
        [] => Err(PkiError::BadSpiffeId {
            id: String::new(),
            reason: "certificate has no spiffe:// URI SAN".into(),
        }),
        _ => Err(PkiError::BadSpiffeId {
            id: String::new(),
            reason: "certificate has more than one spiffe:// URI SAN".into(),
        }),
    }
}

/// The validity window of a peer's certificate, checked at `now`; the time it has left.
///
/// For every handshake, resumed or not: on resumption rustls restores the stored chain
/// without verifying it again, so without this check a chain of resumptions would keep an
/// expired certificate's identity alive. `not_before` gets the control plane's
/// [`CLOCK_SKEW_LEEWAY`] (a peer whose clock is ahead of ours); `not_after` gets none, the
/// same as the full handshake's verifier, so a resumed session is never accepted where a
/// full one would be refused.
pub fn check_validity(cert: &CertificateDer<'_>, now: SystemTime) -> Result<Duration, PkiError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let not_before = x509.validity().not_before.timestamp();
    let not_after = x509.validity().not_after.timestamp();
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now + (CLOCK_SKEW_LEEWAY.as_secs() as i64) < not_before {
        return Err(PkiError::NotYetValid { not_before });
    }
    if now > not_after {
        return Err(PkiError::Expired { not_after });
    }
    Ok(Duration::from_secs((not_after - now) as u64))
}

/// Whether `root`'s key signed `cert` (no other check: validity and names are the
/// verifiers' job).
pub fn signed_by(cert: &CertificateDer<'_>, root: &CertificateDer<'_>) -> bool {
    let (Ok((_, cert)), Ok((_, root))) = (
        x509_parser::parse_x509_certificate(cert),
        x509_parser::parse_x509_certificate(root),
    ) else {
        return false;
    };
    cert.verify_signature(Some(root.public_key())).is_ok()
}

/// When `cert` ends.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<SystemTime, PkiError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(SystemTime::UNIX_EPOCH
        + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_parse_accepts_only_kubernetes_shape() {
        let id = SpiffeId::parse("spiffe://example.org/ns/team-a/sa/api").unwrap();
        assert_eq!(id, SpiffeId::new("example.org", "team-a", "api"));
        assert_eq!(id.to_string(), "spiffe://example.org/ns/team-a/sa/api");
        for bad in [
            "http://example.org/ns/a/sa/b",
            "spiffe://example.org",
            "spiffe://Example.org/ns/a/sa/b",
            "spiffe://example.org/ns/a/sa/b/extra",
            "spiffe://example.org/ns//sa/b",
            "spiffe://example.org/ns/a b/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn init_issue_and_read_back_identity() {
        let dir = std::env::temp_dir().join(format!("dbgw-pki-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        init_ca(&dir, "example.org").unwrap();
        use std::os::unix::fs::PermissionsExt;
        for key in [WORKLOAD_CA_KEY, DB_CLIENT_CA_KEY] {
            let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert!(matches!(
            init_ca(&dir, "example.org"),
            Err(PkiError::Exists { .. })
        ));

        let ca =
            CertificateAuthority::load(&dir.join(WORKLOAD_CA_CERT), &dir.join(WORKLOAD_CA_KEY))
                .unwrap();
        let id = SpiffeId::new("example.org", "ns1", "sa1");
        let (cert_pem, key_pem) = ca
            .issue(&LeafSpec::workload(&id), Duration::from_secs(3600))
            .unwrap();
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(spiffe_id_of(&cert).unwrap(), id);
        assert!(PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).is_ok());

        let (_, x509) = x509_parser::parse_x509_certificate(&cert).unwrap();
        let lifetime =
            x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + CLOCK_SKEW_LEEWAY.as_secs() as i64);

        let server = ca
            .issue(
                &LeafSpec::server(vec!["localhost".into()], vec![]),
                Duration::from_secs(60),
            )
            .unwrap();
        let server = CertificateDer::from_pem_slice(server.0.as_bytes()).unwrap();
        assert!(spiffe_id_of(&server).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hardening_02_validity_is_checked_with_leeway_only_before() {
        let dir = std::env::temp_dir().join(format!("dbgw-pki-validity-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        init_ca(&dir, "example.org").unwrap();
        let ca =
            CertificateAuthority::load(&dir.join(WORKLOAD_CA_CERT), &dir.join(WORKLOAD_CA_KEY))
                .unwrap();
        let leaf = LeafSpec::workload(&SpiffeId::new("example.org", "a", "b"));
        let now = SystemTime::now();
        let der =
            |(pem, _): (String, String)| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let short = der(ca
            .issue_between(&leaf, now, now + Duration::from_secs(3))
            .unwrap());
        let left = check_validity(&short, now).unwrap();
        assert!(left <= Duration::from_secs(3), "{left:?}");
        assert!(matches!(
            check_validity(&short, now + Duration::from_secs(5)),
            Err(PkiError::Expired { .. })
        ));
        // A peer a minute ahead of us is within the leeway; an hour ahead is not.
        let ahead = now + Duration::from_secs(60);
        let early = der(ca
            .issue_between(&leaf, ahead, ahead + Duration::from_secs(600))
            .unwrap());
        assert!(check_validity(&early, now).is_ok());
        let far = now + Duration::from_secs(3600);
        let future = der(ca
            .issue_between(&leaf, far, far + Duration::from_secs(600))
            .unwrap());
        assert!(matches!(
            check_validity(&future, now),
            Err(PkiError::NotYetValid { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
