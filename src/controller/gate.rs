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

use chrono::{DateTime, Utc};

use super::desired::{Replica, key_expired};
use super::status::Problem;
use crate::api::CREDENTIALS_GATE;

/// The verbs containerboot needs on its state Secret.
pub const SECRET_VERBS: [&str; 3] = ["get", "update", "patch"];

/// The verb a SubjectAccessReview asks about before a gate opens: containerboot's first request.
/// One is enough: the Role grants all of [`SECRET_VERBS`] in one rule naming the Secret, so an
/// authorizer that allows one has that rule (three reviews per pod were a third of the
/// operator's apiserver requests at 5,000 pods).
pub const CONFIRMED_VERB: &str = "get";

/// PURE: true when a state Secret holds what a starting sidecar needs: registered state, or a
/// key that has not expired.
pub fn credentials_ready(secret: &Secret, key_ttl: chrono::Duration, now: DateTime<Utc>) -> bool {
    let has = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .is_some_and(|v| !v.0.is_empty())
    };
    // A reset under way keeps the new pod waiting until the old state is wiped.
    let resetting = secret
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(super::reset::RESET_PENDING_ANNOTATION));
    secret.metadata.deletion_timestamp.is_none()
        && !resetting
        && (has("device_id") || (has("authkey") && !key_expired(secret, key_ttl, now)))
}

/// PURE: the gated replicas whose grant is written: their Secret is named by the Role and their
/// ServiceAccount bound. The apiserver confirms each (`confirm`) before it mints or opens.
pub fn grantable<'a>(
    replicas: &'a [Replica],
    role_names: &BTreeSet<String>,
    bound_accounts: &BTreeSet<String>,
) -> Vec<&'a Replica> {
    replicas
        .iter()
        .filter(|r| r.gate.is_some())
        .filter(|r| role_names.contains(&r.secret) && bound_accounts.contains(&r.service_account))
        .collect()
}

/// PURE: the gated replicas whose sidecar may start now: grant confirmed (`granted` holds their
/// Secret names) and the Secret holds registered state or a valid key.
pub fn to_open<'a>(
    replicas: &'a [Replica],
    secrets: &[Secret],
    granted: &BTreeSet<String>,
    key_ttl: chrono::Duration,
    now: DateTime<Utc>,
) -> Vec<&'a Replica> {
    replicas
        .iter()
        .filter(|r| r.gate.is_some() && granted.contains(&r.secret))
        .filter(|r| {
            secrets
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some(r.secret.as_str()) && credentials_ready(s, key_ttl, now))
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

/// Asks the apiserver whether `account` in `ns` may use Secret `secret` as containerboot does
/// (one SubjectAccessReview, for [`CONFIRMED_VERB`]).
async fn granted(client: &kube::Client, ns: &str, account: &str, secret: &str) -> Result<bool, kube::Error> {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
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
                verb: Some(CONFIRMED_VERB.into()),
                resource: Some("secrets".into()),
                name: Some(secret.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

pub async fn confirm(client: &kube::Client, ns: &str, candidates: &[&Replica]) -> Result<BTreeSet<String>, Problem> {
    let mut confirmed = BTreeSet::new();
    for r in candidates {
        let ok = granted(client, ns, &r.service_account, &r.secret)
            .await
            .map_err(|e| Problem {
                reason: "GateOpenFailed",
                message: format!("checking the grant of pod {} on Secret {}: {e}", r.pod, r.secret),
            })?;
        if ok {
            confirmed.insert(r.secret.clone());
        }
    }
    Ok(confirmed)
}

/// Opens the gate of each replica in `ready` (see `to_open`). Returns how many were opened.
pub async fn open(client: &kube::Client, ns: &str, ready: &[&Replica]) -> Result<usize, Problem> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut opened = 0;
    for r in ready {
        let Some(index) = r.gate else { continue };
        let fail = |e: kube::Error| Problem {
            reason: "GateOpenFailed",
            message: format!("opening the credentials gate of pod {}: {e}", r.pod),
        };
        let patch: json_patch::Patch = serde_json::from_value(removal_patch(index)).map_err(|e| Problem {
            reason: "GateOpenFailed",
            message: format!("building the gate patch of pod {}: {e}", r.pod),
        })?;
        match pods
            .patch(&r.pod, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => {
                opened += 1;
                info!(pod = %r.pod, "opened credentials gate");
            }
            // Gone, or the gate moved (the cache was stale): the next reconcile sees the truth.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 422 => {}
            Err(e) => return Err(fail(e)),
        }
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn replica(pod: &str, sa: &str, gate: Option<usize>) -> Replica {
        Replica {
            service_account: sa.into(),
            gate,
            ..Replica::new(pod, "u", format!("ts-{pod}"))
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

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-29T12:00:00Z").unwrap().to_utc()
    }

    fn ttl() -> chrono::Duration {
        chrono::Duration::minutes(10)
    }

    fn minted(mut s: Secret, minutes_ago: i64) -> Secret {
        let at = (now() - chrono::Duration::minutes(minutes_ago)).to_rfc3339();
        s.metadata.annotations = Some([(crate::controller::desired::MINTED_AT_ANNOTATION.to_string(), at)].into());
        s
    }

    #[test]
    fn only_granted_gated_replicas_are_candidates() {
        let rs = vec![
            replica("ready", "sa", Some(0)),
            replica("unbound", "other", Some(0)),
            replica("open", "sa", None),
            replica("unnamed", "sa", Some(0)),
        ];
        let names: BTreeSet<String> = ["ts-ready", "ts-unbound", "ts-open"].map(String::from).into();
        let accounts: BTreeSet<String> = ["sa".to_string()].into();
        let c: Vec<&str> = grantable(&rs, &names, &accounts)
            .iter()
            .map(|r| r.pod.as_str())
            .collect();
        assert_eq!(c, vec!["ready"]);
    }

    #[test]
    fn a_gate_opens_only_with_a_confirmed_grant_and_a_valid_key_or_state() {
        let rs = vec![
            replica("ready", "sa", Some(0)),
            replica("registered", "sa", Some(1)),
            replica("nokey", "sa", Some(0)),
            replica("unconfirmed", "sa", Some(0)),
            replica("open", "sa", None),
            replica("expired", "sa", Some(0)),
            replica("fresh", "sa", Some(0)),
        ];
        let secrets = vec![
            secret("ts-ready", Some("authkey")),
            secret("ts-registered", Some("device_id")),
            secret("ts-nokey", None),
            secret("ts-unconfirmed", Some("authkey")),
            secret("ts-open", Some("authkey")),
            minted(secret("ts-expired", Some("authkey")), 11),
            minted(secret("ts-fresh", Some("authkey")), 9),
        ];
        let granted: BTreeSet<String> = [
            "ts-ready",
            "ts-registered",
            "ts-nokey",
            "ts-open",
            "ts-expired",
            "ts-fresh",
        ]
        .map(String::from)
        .into();
        let open: Vec<&str> = to_open(&rs, &secrets, &granted, ttl(), now())
            .iter()
            .map(|r| r.pod.as_str())
            .collect();
        assert_eq!(open, vec!["ready", "registered", "fresh"]);
    }

    #[test]
    fn an_empty_key_is_not_a_key() {
        let mut s = secret("ts-a", Some("authkey"));
        s.data = Some([("authkey".to_string(), ByteString(Vec::new()))].into());
        assert!(!credentials_ready(&s, ttl(), now()));
    }

    #[test]
    fn an_expired_key_is_not_ready_but_registered_state_is() {
        assert!(!credentials_ready(
            &minted(secret("ts-a", Some("authkey")), 10),
            ttl(),
            now()
        ));
        assert!(credentials_ready(
            &minted(secret("ts-a", Some("device_id")), 60),
            ttl(),
            now()
        ));
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
