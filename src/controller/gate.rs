//! Opening the credentials scheduling gate. The webhook gates every injected pod; the controller
//! removes the gate once the pod's sidecar can start with what it needs: its state Secret holds a
//! key (or registered state), the Role names that Secret, the RoleBinding binds the pod's
//! ServiceAccount, and the apiserver itself confirms the grant (SubjectAccessReview). `to_open`
//! is pure; `open` does the I/O.

use std::collections::BTreeSet;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::info;

use super::desired::Replica;
use super::status::Problem;
use crate::api::CREDENTIALS_GATE;

/// The verbs containerboot needs on its state Secret.
pub const SECRET_VERBS: [&str; 3] = ["get", "update", "patch"];

/// PURE: true when a state Secret holds what a starting sidecar needs: a key or registered state.
pub fn credentials_ready(secret: &Secret) -> bool {
    let has = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .is_some_and(|v| !v.0.is_empty())
    };
    secret.metadata.deletion_timestamp.is_none() && (has("authkey") || has("device_id"))
}

/// PURE: the gated replicas whose sidecar may start now: Secret ready, named by the Role, and
/// their ServiceAccount bound.
pub fn to_open<'a>(
    replicas: &'a [Replica],
    secrets: &[Secret],
    role_names: &BTreeSet<String>,
    bound_accounts: &BTreeSet<String>,
) -> Vec<&'a Replica> {
    replicas
        .iter()
        .filter(|r| r.gate.is_some())
        .filter(|r| role_names.contains(&r.secret) && bound_accounts.contains(&r.service_account))
        .filter(|r| {
            secrets
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some(r.secret.as_str()) && credentials_ready(s))
        })
        .collect()
}

/// PURE: the JSON patch that removes the gate at `index`, guarded by a test that it is still ours.
pub fn removal_patch(index: usize) -> serde_json::Value {
    json!([
        {"op": "test", "path": format!("/spec/schedulingGates/{index}/name"), "value": CREDENTIALS_GATE},
        {"op": "remove", "path": format!("/spec/schedulingGates/{index}")},
    ])
}

/// Asks the apiserver whether `account` in `ns` may use Secret `secret` as containerboot does.
async fn granted(client: &kube::Client, ns: &str, account: &str, secret: &str) -> Result<bool, kube::Error> {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    for verb in SECRET_VERBS {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{ns}:{account}")),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.into()),
                    verb: Some(verb.into()),
                    resource: Some("secrets".into()),
                    name: Some(secret.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = api.create(&PostParams::default(), &review).await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Opens the gate of each replica whose grant the apiserver confirms. Returns how many stay
/// closed (not yet granted: RBAC caches catch up within moments, so the caller retries soon).
pub async fn open(client: &kube::Client, ns: &str, ready: &[&Replica]) -> Result<usize, Problem> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut waiting = 0;
    for r in ready {
        let Some(index) = r.gate else { continue };
        let fail = |e: kube::Error| Problem {
            reason: "GateOpenFailed",
            message: format!("opening the credentials gate of pod {}: {e}", r.pod),
        };
        if !granted(client, ns, &r.service_account, &r.secret).await.map_err(fail)? {
            waiting += 1;
            continue;
        }
        let patch: json_patch::Patch = serde_json::from_value(removal_patch(index)).map_err(|e| Problem {
            reason: "GateOpenFailed",
            message: format!("building the gate patch of pod {}: {e}", r.pod),
        })?;
        match pods
            .patch(&r.pod, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => info!(pod = %r.pod, "opened credentials gate"),
            // Gone, or the gate moved (the cache was stale): the next reconcile sees the truth.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 422 => waiting += 1,
            Err(e) => return Err(fail(e)),
        }
    }
    Ok(waiting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn replica(pod: &str, sa: &str, gate: Option<usize>) -> Replica {
        Replica {
            pod: pod.into(),
            pod_uid: "u".into(),
            secret: format!("ts-{pod}"),
            service_account: sa.into(),
            statefulset: None,
            gate,
        }
    }

    fn secret(name: &str, key: Option<&str>) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        if let Some(k) = key {
            s.data = Some([(k.to_string(), ByteString(b"v".to_vec()))].into());
        }
        s
    }

    #[test]
    fn a_gate_opens_only_with_key_role_and_binding() {
        let rs = vec![
            replica("ready", "sa", Some(0)),
            replica("registered", "sa", Some(1)),
            replica("nokey", "sa", Some(0)),
            replica("unbound", "other", Some(0)),
            replica("open", "sa", None),
            replica("unnamed", "sa", Some(0)),
        ];
        let secrets = vec![
            secret("ts-ready", Some("authkey")),
            secret("ts-registered", Some("device_id")),
            secret("ts-nokey", None),
            secret("ts-unbound", Some("authkey")),
            secret("ts-open", Some("authkey")),
            secret("ts-unnamed", Some("authkey")),
        ];
        let names: BTreeSet<String> = ["ts-ready", "ts-registered", "ts-nokey", "ts-unbound", "ts-open"]
            .map(String::from)
            .into();
        let accounts: BTreeSet<String> = ["sa".to_string()].into();
        let open: Vec<&str> = to_open(&rs, &secrets, &names, &accounts)
            .iter()
            .map(|r| r.pod.as_str())
            .collect();
        assert_eq!(open, vec!["ready", "registered"]);
    }

    #[test]
    fn an_empty_key_is_not_a_key() {
        let mut s = secret("ts-a", Some("authkey"));
        s.data = Some([("authkey".to_string(), ByteString(Vec::new()))].into());
        assert!(!credentials_ready(&s));
    }

    #[test]
    fn the_patch_tests_before_it_removes() {
        let p = removal_patch(2);
        assert_eq!(p[0]["op"], "test");
        assert_eq!(p[0]["path"], "/spec/schedulingGates/2/name");
        assert_eq!(p[0]["value"], CREDENTIALS_GATE);
        assert_eq!(p[1], json!({"op": "remove", "path": "/spec/schedulingGates/2"}));
    }
}
