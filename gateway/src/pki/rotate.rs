//! Rotating the workload CA's root in three steps that never end a session
//! (`gateway ca rotate prepare|activate|finish`). Every verifier reads a bundle
//! ([`WORKLOAD_BUNDLE`]), never the signing root alone, so the steps are:
//!
//! 1. `prepare`: a new root is made beside the current one (`workload-ca.next.*`) and the
//!    bundle becomes old + new. Publish the bundle; proxies, nodes and the CA reload it.
//! 2. `activate`: the new root signs (it becomes `workload-ca.crt`/`.key`; the old key is
//!    deleted). Certificates of the old root stay trusted through the bundle, so nodes and
//!    pods move to the new root at their next renewal, each at its own time.
//! 3. `finish` (after the longest certificate lifetime has passed since `activate`): the
//!    bundle holds the new root only.
//!
//! Each step checks that the previous one was done, and each file is replaced atomically
//! (`files::replace`), so a watcher sees the old file or the whole new one.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{
    CertificateAuthority, PkiError, TRUST_DOMAIN_FILE, WORKLOAD_BUNDLE, WORKLOAD_CA_CERT,
    WORKLOAD_CA_KEY, ca_params, load_certs, write_public, write_secret,
};

/// The prepared next root, until `activate`.
pub const NEXT_CA_CERT: &str = "workload-ca.next.crt";
pub const NEXT_CA_KEY: &str = "workload-ca.next.key";

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error(
        "a rotation is already prepared ({0} exists): run `activate`, or remove it to start over"
    )]
    AlreadyPrepared(PathBuf),
    #[error("no rotation is prepared ({0} is missing): run `prepare` first")]
    NotPrepared(PathBuf),
    #[error("the rotation is not activated yet ({0} still exists): run `activate` first")]
    NotActivated(PathBuf),
    #[error(
        "{0} does not hold the signing root: it was edited by hand; write it again with the roots to trust"
    )]
    BundleWithoutRoot(PathBuf),
    #[error(
        "{0} does not hold the prepared root (`prepare` did not finish): remove workload-ca.next.* and run `prepare` again"
    )]
    BundleWithoutNext(PathBuf),
}

/// What each step leaves behind, for the operator's next move.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// Roots in the bundle after the step.
    pub roots_in_bundle: usize,
    pub bundle: PathBuf,
}

/// `prepare`: a new root, and the bundle with the current root(s) and the new one.
pub fn prepare(dir: &Path) -> Result<Step, RotateError> {
    let next_cert = dir.join(NEXT_CA_CERT);
    if next_cert.exists() {
        return Err(RotateError::AlreadyPrepared(next_cert));
    }
    // The current root must load (and match its key) before anything is written.
    let current =
        CertificateAuthority::load(&dir.join(WORKLOAD_CA_CERT), &dir.join(WORKLOAD_CA_KEY))?;
    let trust_domain = read(&dir.join(TRUST_DOMAIN_FILE))?;
    let mut bundle = bundle_pems(dir, current.cert_pem())?;
    // A name of its own, so that logs and `openssl x509` tell the two roots apart.
    let cn = format!(
        "db-gateway workload CA ({}, {})",
        trust_domain.trim(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::from)?;
    let cert = ca_params(&cn)?.self_signed(&key).map_err(PkiError::from)?;
    write_secret(&dir.join(NEXT_CA_KEY), &key.serialize_pem())?;
    write_public(&next_cert, &cert.pem())?;
    bundle.push(cert.pem());
    write_bundle(dir, &bundle)
}

/// `activate`: the prepared root signs from now on; the old key is gone.
pub fn activate(dir: &Path) -> Result<Step, RotateError> {
    let (next_cert, next_key) = (dir.join(NEXT_CA_CERT), dir.join(NEXT_CA_KEY));
    if !next_cert.exists() {
        return Err(RotateError::NotPrepared(next_cert));
    }
    let next = CertificateAuthority::load(&next_cert, &next_key)?;
    let bundle_path = dir.join(WORKLOAD_BUNDLE);
    let bundle = load_certs(&bundle_path)?;
    if !bundle.contains(&pem_to_der(next.cert_pem())?) {
        return Err(RotateError::BundleWithoutNext(bundle_path));
    }
    // Key first: a reader that sees the new key with the old certificate refuses the pair
    // (`CertificateAuthority::load` checks that they match) and keeps the old one.
    write_secret(&dir.join(WORKLOAD_CA_KEY), &read(&next_key)?)?;
    write_public(&dir.join(WORKLOAD_CA_CERT), next.cert_pem())?;
    // The certificate is what marks a prepared rotation: it goes first, so a crash here
    // leaves only a stray key, not a rotation that can neither activate nor start again.
    remove(&next_cert)?;
    remove(&next_key)?;
    Ok(Step {
        roots_in_bundle: bundle.len(),
        bundle: bundle_path,
    })
}

/// `finish`: the bundle holds the signing root only.
pub fn finish(dir: &Path) -> Result<Step, RotateError> {
    let next_cert = dir.join(NEXT_CA_CERT);
    if next_cert.exists() {
        return Err(RotateError::NotActivated(next_cert));
    }
    let root = read(&dir.join(WORKLOAD_CA_CERT))?;
    write_bundle(dir, &[root])
}

/// The bundle's certificates as PEM, or the signing root alone where there is no bundle
/// yet (a CA made before bundles existed). The signing root must be in it.
fn bundle_pems(dir: &Path, root_pem: &str) -> Result<Vec<String>, RotateError> {
    let path = dir.join(WORKLOAD_BUNDLE);
    if !path.exists() {
        return Ok(vec![root_pem.to_owned()]);
    }
    let certs = load_certs(&path)?;
    if !certs.contains(&pem_to_der(root_pem)?) {
        return Err(RotateError::BundleWithoutRoot(path));
    }
    Ok(certificate_blocks(&read(&path)?))
}

fn write_bundle(dir: &Path, pems: &[String]) -> Result<Step, RotateError> {
    let bundle = dir.join(WORKLOAD_BUNDLE);
    write_public(&bundle, &pems.concat())?;
    Ok(Step {
        roots_in_bundle: pems.len(),
        bundle,
    })
}

/// The first certificate of a PEM text.
fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::BadCertificate(e.to_string()))
}

/// Each `CERTIFICATE` block of a PEM text, markers included (other blocks are dropped).
fn certificate_blocks(pem: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        blocks.push(format!(
            "{}
",
            &rest[start..start + len + END.len()]
        ));
        rest = &rest[start + len + END.len()..];
    }
    blocks
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn remove(path: &Path) -> Result<(), PkiError> {
    fs::remove_file(path).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{LeafSpec, init_ca};
    use std::time::Duration;

    /// A fresh directory under the system's temp dir, removed when dropped.
    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("dbgw-rotate-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            Self(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn roots(dir: &Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        load_certs(&dir.join(WORKLOAD_BUNDLE)).unwrap()
    }

    #[test]
    fn the_three_steps_move_signing_and_trust_in_order() {
        let dir = Dir::new("steps");
        init_ca(dir.path(), "rot.example").unwrap();
        let old = load_certs(&dir.path().join(WORKLOAD_CA_CERT)).unwrap();
        assert_eq!(
            roots(dir.path()),
            old,
            "init writes a bundle of its one root"
        );
        // Out of order: nothing to activate or finish.
        assert!(matches!(
            activate(dir.path()),
            Err(RotateError::NotPrepared(_))
        ));

        let step = prepare(dir.path()).unwrap();
        assert_eq!(step.roots_in_bundle, 2);
        assert!(matches!(
            prepare(dir.path()),
            Err(RotateError::AlreadyPrepared(_))
        ));
        assert!(matches!(
            finish(dir.path()),
            Err(RotateError::NotActivated(_))
        ));
        // Prepared: the old root still signs.
        assert_eq!(load_certs(&dir.path().join(WORKLOAD_CA_CERT)).unwrap(), old);
        let new = load_certs(&dir.path().join(NEXT_CA_CERT)).unwrap();
        assert_eq!(roots(dir.path()), [old.clone(), new.clone()].concat());

        assert_eq!(activate(dir.path()).unwrap().roots_in_bundle, 2);
        assert_eq!(load_certs(&dir.path().join(WORKLOAD_CA_CERT)).unwrap(), new);
        assert!(!dir.path().join(NEXT_CA_KEY).exists(), "the next key moved");
        // The new pair signs, and what it signs chains to the new root, not the old.
        let ca = CertificateAuthority::load(
            &dir.path().join(WORKLOAD_CA_CERT),
            &dir.path().join(WORKLOAD_CA_KEY),
        )
        .unwrap();
        let (leaf, _) = ca
            .issue(
                &LeafSpec::node("rot.example", "n1"),
                Duration::from_secs(60),
            )
            .unwrap();
        let leaf = pem_to_der(&leaf).unwrap();
        let issued_by = |root: &rustls_pki_types::CertificateDer<'_>| {
            let (_, root) = x509_parser::parse_x509_certificate(root).unwrap();
            let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
            leaf.verify_signature(Some(root.public_key())).is_ok()
        };
        assert!(issued_by(&new[0]) && !issued_by(&old[0]));

        assert_eq!(finish(dir.path()).unwrap().roots_in_bundle, 1);
        assert_eq!(roots(dir.path()), new);
        // A second rotation starts from the one-root bundle.
        assert_eq!(prepare(dir.path()).unwrap().roots_in_bundle, 2);
    }

    #[test]
    fn a_bundle_without_the_signing_root_is_refused() {
        let (a, b) = (Dir::new("a"), Dir::new("b"));
        init_ca(a.path(), "a.example").unwrap();
        init_ca(b.path(), "b.example").unwrap();
        // Someone wrote another CA's root into the bundle.
        fs::copy(
            b.path().join(WORKLOAD_CA_CERT),
            a.path().join(WORKLOAD_BUNDLE),
        )
        .unwrap();
        assert!(matches!(
            prepare(a.path()),
            Err(RotateError::BundleWithoutRoot(_))
        ));
        assert!(!a.path().join(NEXT_CA_CERT).exists(), "nothing written");
    }
}
