//! A static pod inventory: the pod metadata a Kubernetes watch would deliver, from a YAML
//! file, for bare hosts (no API server) and tests.
//!
//! ```yaml
//! pods:
//!   - uid: 0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b
//!     namespace: team-a
//!     name: api-7d9f
//!     service_account: api
//!     node: node-1
//!     labels: { app: api }
//!     containers: ["<64 hex>"]   # optional: only these containers get the identity
//! host:                          # optional: identity for processes outside any pod
//!   namespace: host
//!   service_account: node-tools
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::IdentityError;
use crate::config::{ConfigError, load_yaml, parse_yaml};
use crate::pod::{Pod, PodDirectory};

use crate::pod::HostIdentity;

/// The inventory file as written (`pods:` and `host:`); the harness writes one from this
/// type, so a renamed field breaks at compile time.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    #[serde(default)]
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub host: Option<HostIdentity>,
}

/// Pods by UID, plus the optional host identity.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pods: HashMap<String, Pod>,
    host: Option<HostIdentity>,
}

impl Inventory {
    /// Reads and checks an inventory file; errors name the file (and line and column for
    /// syntax errors).
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let file: InventoryFile = load_yaml(path)?;
        Self::build(path, file)
    }

    /// Parses inventory text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, IdentityError> {
        let file: InventoryFile = parse_yaml(path, text)?;
        Self::build(path, file)
    }

    pub fn lookup(&self, pod_uid: &str) -> Option<&Pod> {
        self.pods.get(pod_uid)
    }

    fn build(path: &Path, file: InventoryFile) -> Result<Self, IdentityError> {
        let invalid = |message: String| {
            IdentityError::Inventory(ConfigError::Invalid {
                path: PathBuf::from(path),
                message,
            })
        };
        let mut pods = HashMap::with_capacity(file.pods.len());
        for (index, mut pod) in file.pods.into_iter().enumerate() {
            let at = format!("pods[{index}]");
            pod.uid = normalise_uid(&pod.uid)
                .ok_or_else(|| invalid(format!("{at}.uid: {:?} is not a pod UID", pod.uid)))?;
            check_name(&pod.namespace, 63, false)
                .map_err(|r| invalid(format!("{at}.namespace: {r}")))?;
            check_name(&pod.service_account, 253, true)
                .map_err(|r| invalid(format!("{at}.service_account: {r}")))?;
            if pod.name.is_empty() || pod.node.is_empty() {
                return Err(invalid(format!("{at}: name and node must not be empty")));
            }
            for id in pod.containers.iter().flatten() {
                if id.len() != 64 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(invalid(format!(
                        "{at}.containers: {id:?} is not a container id (64 lower-case hex digits)"
                    )));
                }
            }
            if let Some(previous) = pods.insert(pod.uid.clone(), pod) {
                return Err(invalid(format!(
                    "{at}.uid: pod {} is listed twice",
                    previous.uid
                )));
            }
        }
        if let Some(host) = &file.host {
            check_name(&host.namespace, 63, false)
                .map_err(|r| invalid(format!("host.namespace: {r}")))?;
            check_name(&host.service_account, 253, true)
                .map_err(|r| invalid(format!("host.service_account: {r}")))?;
        }
        Ok(Self {
            pods,
            host: file.host,
        })
    }
}

impl PodDirectory for Inventory {
    fn pod(&self, uid: &str) -> Option<Pod> {
        self.lookup(uid).cloned()
    }

    fn host(&self) -> Option<&HostIdentity> {
        self.host.as_ref()
    }
}

/// A pod UID in the API server's spelling (8-4-4-4-12 hex, dashes), accepting upper case.
fn normalise_uid(uid: &str) -> Option<String> {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let groups: Vec<&str> = uid.split('-').collect();
    let ok = groups.len() == GROUPS.len()
        && groups
            .iter()
            .zip(GROUPS)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| uid.to_ascii_lowercase())
}

/// Kubernetes names: namespaces are DNS labels (no dots), service accounts DNS subdomains.
/// Both end up in SPIFFE IDs and policy matches, so a typo must fail here, not there.
fn check_name(name: &str, max: usize, dots: bool) -> Result<(), String> {
    let allowed =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.');
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() || name.len() > max {
        return Err(format!("{name:?} must be 1 to {max} characters"));
    }
    if !name.bytes().all(allowed) || !edge(name.as_bytes().first()) || !edge(name.as_bytes().last())
    {
        let what = if dots {
            "lower-case letters, digits, '-' and '.'"
        } else {
            "lower-case letters, digits and '-'"
        };
        return Err(format!(
            "{name:?} must be {what}, starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TempDir;

    const UID: &str = "0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn parse(text: &str) -> Result<Inventory, IdentityError> {
        Inventory::parse(Path::new("inventory.yaml"), text)
    }

    fn invalid_message(text: &str) -> String {
        match parse(text) {
            Err(IdentityError::Inventory(ConfigError::Invalid { message, .. })) => message,
            other => panic!("expected an invalid inventory, got {other:?}"),
        }
    }

    fn one_pod(extra: &str) -> String {
        format!(
            "pods:\n  - uid: {UID}\n    namespace: team-a\n    name: api-7d9f\n    service_account: api\n    node: node-1\n{extra}"
        )
    }

    #[test]
    fn full_example_loads_from_a_file() {
        let tmp = TempDir::new("inventory");
        let path = tmp.path().join("inventory.yaml");
        let text = format!(
            "pods:
  - uid: {}
    namespace: team-a
    name: api-7d9f
    service_account: api
    node: node-1
    labels: {{ app: api }}
    host_network: true
    containers: [\"{CID}\"]
host:
  namespace: host
  service_account: node-tools
",
            UID.to_ascii_uppercase()
        );
        std::fs::write(&path, text).unwrap();
        let inv = Inventory::load(&path).unwrap();
        let pod = inv.lookup(UID).expect("looked up by the normalised UID");
        assert_eq!(pod.uid, UID);
        assert_eq!(pod.namespace, "team-a");
        assert_eq!(pod.name, "api-7d9f");
        assert_eq!(pod.service_account, "api");
        assert_eq!(pod.node, "node-1");
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("api"));
        assert!(pod.host_network);
        assert_eq!(pod.containers, Some(vec![CID.to_owned()]));
        assert_eq!(
            inv.host(),
            Some(&HostIdentity {
                namespace: "host".into(),
                service_account: "node-tools".into()
            })
        );
        assert_eq!(inv.pod(UID).as_ref(), Some(pod));
        assert!(inv.lookup("00000000-0000-0000-0000-000000000000").is_none());
    }

    #[test]
    fn defaults_no_host_no_container_restriction() {
        let inv = parse(&one_pod("")).unwrap();
        let pod = inv.lookup(UID).unwrap();
        assert!(pod.labels.is_empty());
        assert!(!pod.host_network);
        assert_eq!(pod.containers, None);
        assert_eq!(inv.host(), None);
        assert!(parse("{}").unwrap().lookup(UID).is_none());
    }

    #[test]
    fn unknown_fields_are_errors_with_a_position() {
        let err = parse(&one_pod("    serviceAccount: api\n")).unwrap_err();
        match err {
            IdentityError::Inventory(ConfigError::Parse { line, message, .. }) => {
                assert_eq!(line, 7, "the line of the unknown field");
                assert!(message.contains("serviceAccount"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("hosts: {}\n"),
            Err(IdentityError::Inventory(ConfigError::Parse { .. }))
        ));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        assert!(matches!(
            Inventory::load(Path::new("/nonexistent/dbgw-inventory.yaml")),
            Err(IdentityError::Inventory(ConfigError::Read { .. }))
        ));
    }

    #[test]
    fn bad_values_are_named() {
        let bad_uid = invalid_message(&one_pod("").replace(UID, "0f9c1a2b3c4d"));
        assert!(bad_uid.contains("pods[0].uid"), "{bad_uid}");
        let bad_ns = invalid_message(&one_pod("").replace("team-a", "Team_A"));
        assert!(bad_ns.contains("pods[0].namespace"), "{bad_ns}");
        let bad_sa = invalid_message(&one_pod("").replace("account: api", "account: -api"));
        assert!(bad_sa.contains("pods[0].service_account"), "{bad_sa}");
        let bad_cid = invalid_message(&one_pod("    containers: [\"abc\"]\n"));
        assert!(bad_cid.contains("pods[0].containers"), "{bad_cid}");
        let bad_host = invalid_message("host: { namespace: host, service_account: \"a b\" }\n");
        assert!(bad_host.contains("host.service_account"), "{bad_host}");
    }

    #[test]
    fn a_pod_listed_twice_is_an_error() {
        let pod = one_pod("");
        let second = pod.trim_start_matches("pods:\n");
        let twice = invalid_message(&format!("{pod}{second}"));
        assert!(twice.contains("listed twice"), "{twice}");
    }
}
