//! The pod vocabulary, one for the whole gateway: what a pod is ([`Pod`]), who processes
//! outside any pod are ([`HostIdentity`]), the part of a pod that travels in the preamble and
//! the audit log ([`PodMeta`]), and where pods are looked up ([`PodDirectory`]).
//!
//! One directory answers both the node's resolver (cgroup → pod → identity) and the CA
//! (pod UID → may this node have a certificate for it?): the static inventory
//! (`identity::inventory`) and the Kubernetes watch (`identity::kube`) implement it.
//!
//! Ground floor: imports nothing of ours.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What the gateway knows about one pod, from the inventory file or the Kubernetes watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    /// The pod UID, lower-case with dashes (normalised on load).
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// The node the pod is scheduled on; the resolver refuses pods of other nodes, since a
    /// cgroup here cannot belong to them (a stale or copied inventory would say otherwise),
    /// and the CA signs only for the node that asks.
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Informational: a host-network pod still has its own cgroup, so its identity is
    /// resolved the same way.
    #[serde(default)]
    pub host_network: bool,
    /// If set, only processes in these containers (64-hex ids) get the pod's identity;
    /// the pod-level cgroup and any other container are refused.
    #[serde(default)]
    pub containers: Option<Vec<String>>,
}

impl Pod {
    /// The preamble's view of this pod, for a process in container `container_id` (`None`:
    /// the pod-level cgroup). Consumes the pod: the resolver has no further use for it, and
    /// moving the strings saves copying them per connection.
    pub fn into_meta(self, container_id: Option<String>) -> PodMeta {
        PodMeta {
            namespace: Some(self.namespace),
            name: Some(self.name),
            uid: Some(self.uid),
            container_id,
            service_account: Some(self.service_account),
        }
    }
}

/// The identity given to processes outside any pod, when one is configured: in the
/// inventory file (`host:`) or in the node's `interception.identity.kubernetes.host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl HostIdentity {
    /// The preamble's view of a host process: no pod name, UID or container.
    pub fn meta(&self) -> PodMeta {
        PodMeta {
            namespace: Some(self.namespace.clone()),
            service_account: Some(self.service_account.clone()),
            ..PodMeta::default()
        }
    }
}

/// Pod metadata as the node reports it in the preamble (and the proxy writes it to the
/// audit log); in explicit mode it comes from the listener's configuration. Every field is
/// optional because a host process has no pod and an explicit listener may name none; absent
/// fields are left out of the JSON, so the preamble stays as short as older nodes sent it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// Where pods are looked up: the static inventory, or a Kubernetes watch of a node's pods.
/// `None` from [`PodDirectory::pod`] means "not known (yet)", which for a watch includes a
/// pod created a moment ago.
///
/// A watch is only as complete as its scope: one of a single node's pods vouches for that
/// node's pods alone, which suits the node's resolver and a CA per node; a central CA needs
/// a watch of every node's pods.
pub trait PodDirectory: Send + Sync {
    /// The pod with this UID (lower-case, dashes).
    fn pod(&self, uid: &str) -> Option<Pod>;
    /// The identity for processes outside any pod, if they may have one at all.
    fn host(&self) -> Option<&HostIdentity>;
}

/// A shared directory (a Kubernetes watch also read by `/readyz`) serves as one too.
impl<T: PodDirectory + ?Sized> PodDirectory for Arc<T> {
    fn pod(&self, uid: &str) -> Option<Pod> {
        (**self).pod(uid)
    }

    fn host(&self) -> Option<&HostIdentity> {
        (**self).host()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod {
            uid: "0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into(),
            namespace: "team-a".into(),
            name: "api-7d9f".into(),
            service_account: "api".into(),
            node: "node-1".into(),
            labels: [("app".to_owned(), "api".to_owned())].into(),
            host_network: false,
            containers: None,
        }
    }

    #[test]
    fn a_pod_becomes_the_preamble_metadata_of_its_container() {
        let meta = pod().into_meta(Some("c0ffee".into()));
        assert_eq!(
            meta,
            PodMeta {
                namespace: Some("team-a".into()),
                name: Some("api-7d9f".into()),
                uid: Some("0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
                container_id: Some("c0ffee".into()),
                service_account: Some("api".into()),
            }
        );
        // The node is ours to check, not the proxy's to read; labels stay out of the wire.
        let json = serde_json::to_string(&meta).unwrap();
        assert_eq!(
            json,
            r#"{"namespace":"team-a","name":"api-7d9f","uid":"0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b","container_id":"c0ffee","service_account":"api"}"#
        );
    }

    #[test]
    fn a_host_process_carries_only_namespace_and_service_account() {
        let host = HostIdentity {
            namespace: "host".into(),
            service_account: "node-tools".into(),
        };
        let meta = host.meta();
        assert_eq!(meta.name, None);
        assert_eq!(meta.uid, None);
        assert_eq!(meta.container_id, None);
        assert_eq!(
            serde_json::to_string(&meta).unwrap(),
            r#"{"namespace":"host","service_account":"node-tools"}"#
        );
        // Absent fields read back as absent, and an empty object is a pod of nothing.
        assert_eq!(
            serde_json::from_str::<PodMeta>(
                r#"{"namespace":"host","service_account":"node-tools"}"#
            )
            .unwrap(),
            meta
        );
        assert_eq!(
            serde_json::from_str::<PodMeta>("{}").unwrap(),
            PodMeta::default()
        );
    }

    #[test]
    fn host_identity_refuses_unknown_fields() {
        let e = serde_json::from_str::<HostIdentity>(
            r#"{"namespace":"host","service_account":"a","serviceAccount":"b"}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("unknown field `serviceAccount`"),
            "{e}"
        );
    }

    #[test]
    fn a_shared_directory_answers_like_the_directory() {
        struct One(Pod, Option<HostIdentity>);
        impl PodDirectory for One {
            fn pod(&self, uid: &str) -> Option<Pod> {
                (self.0.uid == uid).then(|| self.0.clone())
            }
            fn host(&self) -> Option<&HostIdentity> {
                self.1.as_ref()
            }
        }
        let host = HostIdentity {
            namespace: "host".into(),
            service_account: "tools".into(),
        };
        let shared: Box<dyn PodDirectory> = Box::new(Arc::new(One(pod(), Some(host.clone()))));
        assert_eq!(shared.pod(&pod().uid), Some(pod()));
        assert_eq!(shared.pod("11111111-2222-3333-4444-555555555555"), None);
        assert_eq!(shared.host(), Some(&host));
    }
}
