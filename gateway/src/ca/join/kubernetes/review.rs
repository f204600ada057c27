//! The `kubernetes` join's other way to check a token: ask the API server itself with a
//! `TokenReview` (`POST /apis/authentication.k8s.io/v1/tokenreviews`, RBAC `tokenreviews
//! create`). Besides the signature, expiry and audience a key check sees, the API server
//! also refuses a token whose pod (or secret) has been deleted since it was issued: a node
//! agent whose pod is gone cannot renew with its last token.
//!
//! What the review answers stands in for the token's own claims: the user
//! `system:serviceaccount:<namespace>:<name>`, and in `extra` the pod and node the token is
//! bound to (`authentication.kubernetes.io/pod-name`, `…/node-name`, Kubernetes 1.30+).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};

use super::{KubeClaims, KubeJoinError, Named};

/// The `extra` keys the API server adds for a pod-bound service-account token.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const NODE_UID: &str = "authentication.kubernetes.io/node-uid";
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";

/// Reviews `token` for `audience` and returns what the API server vouches for.
pub(super) async fn review(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<KubeClaims, KubeJoinError> {
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let asked = TokenReview {
        metadata: Default::default(),
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(vec![audience.to_owned()]),
        },
        status: None,
    };
    let answer = api
        .create(&kube::api::PostParams::default(), &asked)
        .await
        .map_err(|e| KubeJoinError::Review(e.to_string()))?;
    claims(
        answer
            .status
            .ok_or_else(|| KubeJoinError::Review("the review has no status".into()))?,
        audience,
    )
}

/// The claims of a review's status, or why it does not let anyone join.
fn claims(status: TokenReviewStatus, audience: &str) -> Result<KubeClaims, KubeJoinError> {
    if status.authenticated != Some(true) {
        return Err(KubeJoinError::Rejected(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    // The API server lists the audiences the token was found valid for; ours must be one.
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == audience)
    {
        return Err(KubeJoinError::Audience(audience.to_owned()));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, name)) = username
        .strip_prefix(SERVICE_ACCOUNT_USER)
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(KubeJoinError::Invalid(format!(
            "{username:?} is not a service account"
        )));
    };
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let named = |name: &str, uid: &str| {
        one(name).map(|name| Named {
            name,
            uid: one(uid),
        })
    };
    Ok(KubeClaims {
        namespace: namespace.to_owned(),
        serviceaccount: Named {
            name: name.to_owned(),
            uid: user.uid,
        },
        pod: named(POD_NAME, POD_UID),
        node: named(NODE_NAME, NODE_UID),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(username: &str, extra: &[(&str, &str)], audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(username.into()),
                uid: Some("sa-uid".into()),
                groups: Some(vec!["system:serviceaccounts".into()]),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
            }),
        }
    }

    #[test]
    fn a_pod_bound_token_names_its_service_account_pod_and_node() {
        let c = claims(
            status(
                "system:serviceaccount:db-gateway:gateway-node",
                &[
                    (POD_NAME, "agent-x"),
                    (POD_UID, "p-1"),
                    (NODE_NAME, "node-1"),
                ],
                &["gateway-ca"],
            ),
            "gateway-ca",
        )
        .unwrap();
        assert_eq!(
            (c.namespace.as_str(), c.serviceaccount.name.as_str()),
            ("db-gateway", "gateway-node")
        );
        let pod = c.pod.unwrap();
        assert_eq!(
            (pod.name.as_str(), pod.uid.as_deref()),
            ("agent-x", Some("p-1"))
        );
        let node = c.node.unwrap();
        assert_eq!((node.name.as_str(), node.uid), ("node-1", None));
    }

    #[test]
    fn refusals_say_why() {
        let refused = |s, aud| claims(s, aud).unwrap_err().to_string();
        let mut no = status("system:serviceaccount:a:b", &[], &["gateway-ca"]);
        no.authenticated = Some(false);
        no.error = Some("service account token has been invalidated".into());
        assert_eq!(
            refused(no, "gateway-ca"),
            "the API server rejected the token: service account token has been invalidated"
        );
        assert_eq!(
            refused(
                status(
                    "system:serviceaccount:a:b",
                    &[],
                    &["https://kubernetes.default.svc"]
                ),
                "gateway-ca"
            ),
            "token is not for audience \"gateway-ca\""
        );
        assert_eq!(
            refused(status("alice", &[], &["gateway-ca"]), "gateway-ca"),
            "token rejected: \"alice\" is not a service account"
        );
    }
}
