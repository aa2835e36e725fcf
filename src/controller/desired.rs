//! PURE: from what the controller observed (a TailscaleNode, its pods, its state Secrets) to what
//! should exist (Secrets, Role, RoleBinding, serve ConfigMap), what to do per replica, and the
//! status. No client, no clock: `now` is an argument.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use super::slots::SlotOf;
use crate::api::{
    CREDENTIALS_GATE, INJECTED_ANNOTATION, NODE_LABEL, POD_INDEX_LABEL, ReplicaState, ReplicaStatus, SLOT_ANNOTATION,
    SPEC_ANNOTATION, TAILNET_IPS_ANNOTATION, TAILNET_NAME_ANNOTATION, TailscaleNode, serve_config_map_name,
    slot_secret_name, state_secret_name,
};
use crate::inject::render_serve_config;

/// Finalizer on state Secrets: the device is deleted before the Secret goes.
pub const DEVICE_FINALIZER: &str = "tailnode.dev/device-cleanup";
/// Finalizer on TailscaleNodes: every replica is cleaned up before the node goes.
pub const NODE_FINALIZER: &str = "tailnode.dev/cleanup";
/// Secret annotation: the pod the Secret belongs to.
pub const POD_ANNOTATION: &str = "tailnode.dev/pod";
/// Secret annotation: the uid of the pod named by [`POD_ANNOTATION`] (slot Secrets).
pub const POD_UID_ANNOTATION: &str = "tailnode.dev/pod-uid";
/// Secret annotation: the StatefulSet and ordinal, for Secrets that outlive their pod.
pub const STATEFULSET_ANNOTATION: &str = "tailnode.dev/statefulset";
/// Secret annotation: the ordinal within the StatefulSet.
pub const ORDINAL_ANNOTATION: &str = "tailnode.dev/ordinal";
/// Secret annotation: when the current key was minted (RFC 3339).
pub const MINTED_AT_ANNOTATION: &str = "tailnode.dev/minted-at";
/// Secret annotation: the API's id of the current key (an id, not the key), to revoke it.
pub const KEY_ID_ANNOTATION: &str = "tailnode.dev/key-id";
/// Label on everything the controller creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tailnode");

/// One replica: an injected pod labelled for the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Pod name.
    pub pod: String,
    /// Pod UID (for the owner reference).
    pub pod_uid: String,
    /// State Secret name.
    pub secret: String,
    /// The pod's service account.
    pub service_account: String,
    /// StatefulSet name and ordinal, when the pod belongs to one.
    pub statefulset: Option<(String, u32)>,
    /// The slot the pod holds (`replicaIdentity: slots`).
    pub slot: Option<u32>,
    /// Index of the credentials scheduling gate in the pod's gates, while it is closed.
    pub gate: Option<usize>,
    /// Hash of the TailscaleNode spec the pod was injected from (`tailnode.dev/spec`).
    pub spec_hash: Option<String>,
    /// The pod's `tailnode.dev/tailnet-*` annotations as they are.
    pub tailnet: BTreeMap<String, String>,
    /// The pod's `tailnode.dev/reset` (see `reset`).
    pub reset: Option<String>,
    /// A controller (ReplicaSet, StatefulSet, Job...) owns the pod and would recreate it.
    pub owned: bool,
    /// The pod is being deleted.
    pub terminating: bool,
}

impl Replica {
    /// The replica of pod `pod` (uid `pod_uid`) with state Secret `secret`, running as the
    /// namespace's default ServiceAccount, owned by a controller, and nothing else known yet.
    pub fn new(pod: &str, pod_uid: &str, secret: String) -> Self {
        Self {
            pod: pod.to_string(),
            pod_uid: pod_uid.to_string(),
            secret,
            service_account: "default".to_string(),
            statefulset: None,
            slot: None,
            gate: None,
            spec_hash: None,
            tailnet: BTreeMap::new(),
            reset: None,
            owned: true,
            terminating: false,
        }
    }
}

/// True when a pod has finished for good (`Succeeded` or `Failed`: a Job's pod, an evicted pod).
pub fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The replicas among `pods`: injected, labelled for `node`, named. A finished pod that no
/// StatefulSet will replace under the same name is no replica any more: its device leaves the
/// tailnet without waiting for the pod object to be deleted.
pub fn replicas<'a>(node: &TailscaleNode, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<Replica> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let mut out: Vec<Replica> = pods
        .into_iter()
        .filter(|p| injected_for(p, name))
        .filter_map(|p| {
            let pod = p.metadata.name.clone()?;
            let statefulset = p
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "StatefulSet" && o.controller == Some(true))
                .and_then(|o| Some((o.name.clone(), ordinal(p, &o.name, &pod)?)));
            if statefulset.is_none() && finished(p) {
                return None;
            }
            // A slot pod is a replica once it holds its slot; until then it waits behind its gate.
            let slot = match super::slots::slot_of(p) {
                SlotOf::Held(n) => Some(n),
                SlotOf::Waiting => return None,
                SlotOf::NotSlotted => None,
            };
            Some(Replica {
                secret: slot.map_or_else(|| state_secret_name(&pod), |n| slot_secret_name(name, n)),
                slot,
                pod_uid: p.metadata.uid.clone().unwrap_or_default(),
                service_account: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".to_string()),
                statefulset,
                gate: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.scheduling_gates.as_ref())
                    .and_then(|g| g.iter().position(|g| g.name == CREDENTIALS_GATE)),
                spec_hash: p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SPEC_ANNOTATION))
                    .cloned(),
                tailnet: p
                    .metadata
                    .annotations
                    .iter()
                    .flatten()
                    .filter(|(k, _)| *k == TAILNET_NAME_ANNOTATION || *k == TAILNET_IPS_ANNOTATION)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                reset: p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(super::reset::RESET_ANNOTATION))
                    .cloned(),
                owned: p
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.controller == Some(true)),
                terminating: p.metadata.deletion_timestamp.is_some(),
                pod,
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

/// True when `pod` is labelled for the node named `node` and was injected.
pub fn injected_for(pod: &Pod, node: &str) -> bool {
    let meta = &pod.metadata;
    meta.labels.as_ref().and_then(|l| l.get(NODE_LABEL)).map(String::as_str) == Some(node)
        && meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION))
}

fn ordinal(pod: &Pod, sts: &str, name: &str) -> Option<u32> {
    let from_label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(POD_INDEX_LABEL))
        .and_then(|v| v.parse().ok());
    from_label.or_else(|| name.strip_prefix(sts)?.strip_prefix('-')?.parse().ok())
}

fn owner(node: &TailscaleNode) -> Option<OwnerReference> {
    node.controller_owner_ref(&())
}

fn base_labels(node: &TailscaleNode) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NODE_LABEL.to_string(), node.metadata.name.clone().unwrap_or_default()),
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
    ])
}

/// The state Secret of a replica as tailnode creates it: empty, labelled, with the device
/// finalizer. Non-StatefulSet Secrets are owned by their pod (they follow its life); StatefulSet
/// Secrets by the TailscaleNode (they survive pod restarts and rescheduling).
pub fn state_secret(node: &TailscaleNode, r: &Replica) -> Secret {
    let mut annotations = BTreeMap::from([(POD_ANNOTATION.to_string(), r.pod.clone())]);
    // Born after the node's last reset request: nothing to reset.
    if let Some(v) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::reset::RESET_ANNOTATION))
    {
        annotations.insert(super::reset::NODE_RESET_DONE_ANNOTATION.to_string(), v.clone());
    }
    let owner = match (&r.statefulset, r.slot) {
        (Some((sts, ord)), _) => {
            annotations.insert(STATEFULSET_ANNOTATION.to_string(), sts.clone());
            annotations.insert(ORDINAL_ANNOTATION.to_string(), ord.to_string());
            owner(node)
        }
        // A slot outlives its pods: the node owns it.
        (None, Some(n)) => {
            annotations.insert(SLOT_ANNOTATION.to_string(), n.to_string());
            annotations.insert(POD_UID_ANNOTATION.to_string(), r.pod_uid.clone());
            owner(node)
        }
        (None, None) => Some(OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: r.pod.clone(),
            uid: r.pod_uid.clone(),
            ..Default::default()
        }),
    };
    Secret {
        metadata: ObjectMeta {
            name: Some(r.secret.clone()),
            namespace: node.metadata.namespace.clone(),
            labels: Some(base_labels(node)),
            annotations: Some(annotations),
            owner_references: owner.map(|o| vec![o]),
            finalizers: Some(vec![DEVICE_FINALIZER.to_string()]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Name of the Role and RoleBinding of a node.
pub fn rbac_name(node: &TailscaleNode) -> String {
    format!("tsn-{}", node.metadata.name.as_deref().unwrap_or_default())
}

/// The Role: `get`/`update`/`patch` on exactly the replicas' Secrets (no rule at all when there
/// are none: an empty `resourceNames` would mean every Secret), plus Events for the sidecar.
pub fn role(node: &TailscaleNode, secrets: &BTreeSet<String>) -> Role {
    let mut rules = Vec::new();
    if !secrets.is_empty() {
        rules.push(PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(secrets.iter().cloned().collect()),
            verbs: super::gate::SECRET_VERBS.map(String::from).to_vec(),
            ..Default::default()
        });
    }
    rules.push(PolicyRule {
        api_groups: Some(vec![String::new(), "events.k8s.io".into()]),
        resources: Some(vec!["events".into()]),
        verbs: vec!["get".into(), "create".into(), "patch".into()],
        ..Default::default()
    });
    Role {
        metadata: meta(node, rbac_name(node)),
        rules: Some(rules),
    }
}

/// The RoleBinding: every service account the replicas run as.
pub fn role_binding(node: &TailscaleNode, service_accounts: &BTreeSet<String>) -> RoleBinding {
    RoleBinding {
        metadata: meta(node, rbac_name(node)),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: rbac_name(node),
        },
        subjects: Some(
            service_accounts
                .iter()
                .map(|sa| Subject {
                    kind: "ServiceAccount".into(),
                    name: sa.clone(),
                    namespace: node.metadata.namespace.clone(),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// The serve ConfigMap, when the node serves anything.
pub fn serve_config_map(node: &TailscaleNode) -> Option<ConfigMap> {
    if node.spec.serve.is_empty() {
        return None;
    }
    let name = node.metadata.name.as_deref().unwrap_or_default();
    Some(ConfigMap {
        metadata: meta(node, serve_config_map_name(name)),
        data: Some(BTreeMap::from([(
            crate::inject::SERVE_FILE.to_string(),
            render_serve_config(&node.spec.serve),
        )])),
        ..Default::default()
    })
}

fn meta(node: &TailscaleNode, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: node.metadata.namespace.clone(),
        labels: Some(base_labels(node)),
        owner_references: owner(node).map(|o| vec![o]),
        ..Default::default()
    }
}

/// True when `secret` is tailnode's state Secret of `pod` for `node`: labelled for the node and
/// annotated with the pod. Anything else of that name is someone else's and is never adopted.
pub fn owned_by(secret: &Secret, node: &TailscaleNode, pod: &str) -> bool {
    let labelled = secret.metadata.labels.as_ref().and_then(|l| l.get(NODE_LABEL)) == node.metadata.name.as_ref();
    let for_pod = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(POD_ANNOTATION))
        .is_some_and(|p| p == pod);
    labelled && for_pod
}

/// A Secret's string value.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|v| !v.is_empty())
}

/// What to do with one state Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretAction {
    /// No device and no usable key: mint one for this replica.
    Mint { secret: String, pod: String },
    /// The key was never used and has expired (the pod stayed Pending, unschedulable, pulling):
    /// mint a new one, then revoke the old one (`old_key_id`) where the API can.
    Replace {
        secret: String,
        pod: String,
        old_key_id: Option<String>,
    },
    /// The device registered but the key is still there: remove it.
    StripKey { secret: String },
    /// The replica is gone for good: delete its device (if any), then the Secret.
    Retire { secret: String, device_id: Option<String> },
}

/// The work for this reconcile. `statefulset_replicas` maps the StatefulSets named by Secrets to
/// their `spec.replicas` (absent: the StatefulSet is gone). `kept_slots`: the slot Secrets to keep
/// though no replica uses them (`slots::plan`). `deleting`: the node is being deleted.
pub fn plan(
    replicas: &[Replica],
    secrets: &[Secret],
    statefulset_replicas: &BTreeMap<String, i32>,
    kept_slots: &BTreeSet<String>,
    key_ttl: chrono::Duration,
    now: DateTime<Utc>,
    deleting: bool,
) -> (Vec<Replica>, Vec<SecretAction>) {
    let live: BTreeSet<&str> = replicas.iter().map(|r| r.secret.as_str()).collect();
    let existing: BTreeSet<&str> = secrets.iter().filter_map(|s| s.metadata.name.as_deref()).collect();
    let to_create = if deleting {
        vec![]
    } else {
        replicas
            .iter()
            .filter(|r| !existing.contains(r.secret.as_str()))
            .cloned()
            .collect()
    };
    // A Secret created now gets its key in the same pass (the caller skips any whose creation
    // found a Secret that is not tailnode's).
    let mut actions: Vec<SecretAction> = to_create
        .iter()
        .map(|r| SecretAction::Mint {
            secret: r.secret.clone(),
            pod: r.pod.clone(),
        })
        .collect();
    for s in secrets {
        let Some(name) = s.metadata.name.clone() else { continue };
        let annotations = s.metadata.annotations.clone().unwrap_or_default();
        let device_id = secret_value(s, "device_id");
        let retained = || {
            let sts = annotations.get(STATEFULSET_ANNOTATION)?;
            let ord: i32 = annotations.get(ORDINAL_ANNOTATION)?.parse().ok()?;
            let want = statefulset_replicas.get(sts)?;
            (ord < *want).then_some(())
        };
        let gone = deleting
            || s.metadata.deletion_timestamp.is_some()
            || (!live.contains(name.as_str()) && retained().is_none() && !kept_slots.contains(&name));
        if gone {
            actions.push(SecretAction::Retire {
                secret: name,
                device_id,
            });
            continue;
        }
        let has_key = secret_value(s, "authkey").is_some();
        if device_id.is_some() {
            if has_key {
                actions.push(SecretAction::StripKey { secret: name });
            }
            continue;
        }
        if has_key {
            if live.contains(name.as_str()) && key_expired(s, key_ttl, now) {
                let pod = annotations.get(POD_ANNOTATION).cloned().unwrap_or_default();
                let old_key_id = annotations.get(KEY_ID_ANNOTATION).cloned();
                actions.push(SecretAction::Replace {
                    secret: name,
                    pod,
                    old_key_id,
                });
            }
            continue;
        }
        let minted_recently = annotations
            .get(MINTED_AT_ANNOTATION)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| now.signed_duration_since(t.with_timezone(&Utc)) < key_ttl);
        // A key may be in use (consumed but the device not yet written): wait out its lifetime.
        if !has_key && !minted_recently && live.contains(name.as_str()) {
            let pod = annotations.get(POD_ANNOTATION).cloned().unwrap_or_default();
            actions.push(SecretAction::Mint { secret: name, pod });
        }
    }
    (to_create, actions)
}

/// The tailnet annotations each registered replica's pod should carry and does not yet: pod name
/// and the annotations to merge (`kubectl get pod -o wide` users see the name and IPs there).
pub fn tailnet_annotations(
    replicas: &[Replica],
    statuses: &[ReplicaStatus],
) -> Vec<(String, BTreeMap<String, String>)> {
    let by_pod: BTreeMap<&str, &ReplicaStatus> = statuses.iter().map(|s| (s.pod.as_str(), s)).collect();
    replicas
        .iter()
        .filter_map(|r| {
            let s = by_pod.get(r.pod.as_str())?;
            if s.state != ReplicaState::Registered || s.ips.is_empty() {
                return None;
            }
            let mut want = BTreeMap::from([(TAILNET_IPS_ANNOTATION.to_string(), s.ips.join(","))]);
            if let Some(name) = s.fqdn.clone().or_else(|| s.hostname.clone()) {
                want.insert(TAILNET_NAME_ANNOTATION.to_string(), name);
            }
            (want != r.tailnet).then(|| (r.pod.clone(), want))
        })
        .collect()
}

/// The replicas injected from another spec than `node`'s current one: the sidecar's settings are
/// fixed in the pod, so these need a new pod (a rollout restart) to pick the change up. Pods
/// injected before the hash was recorded are not named (nothing is known about them).
pub fn restart_needed(node: &TailscaleNode, replicas: &[Replica]) -> Vec<String> {
    let current = crate::inject::node_spec_hash(&node.spec);
    replicas
        .iter()
        .filter(|r| r.spec_hash.as_ref().is_some_and(|h| *h != current))
        .map(|r| r.pod.clone())
        .collect()
}

/// When the key in `secret` was minted (its `minted-at` annotation).
pub fn minted_at(secret: &Secret) -> Option<DateTime<Utc>> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(MINTED_AT_ANNOTATION)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// True when `secret` holds a key that was never used (no device yet) and whose lifetime has
/// run out: the API refuses it, so the sidecar could never join with it. A key without a
/// `minted-at` annotation is taken as valid.
pub fn key_expired(secret: &Secret, key_ttl: chrono::Duration, now: DateTime<Utc>) -> bool {
    secret_value(secret, "device_id").is_none()
        && secret_value(secret, "authkey").is_some()
        && minted_at(secret).is_some_and(|t| now.signed_duration_since(t) >= key_ttl)
}

/// The earliest moment an unused key among `secrets` expires: the controller looks again then.
pub fn next_key_expiry(secrets: &[Secret], key_ttl: chrono::Duration) -> Option<DateTime<Utc>> {
    secrets
        .iter()
        .filter(|s| secret_value(s, "device_id").is_none() && secret_value(s, "authkey").is_some())
        .filter_map(|s| minted_at(s)?.checked_add_signed(key_ttl))
        .min()
}

/// The id of the unused key still in `secret` (no device registered with it), to revoke when
/// the replica goes or the key is replaced.
pub fn unused_key_id(secret: &Secret) -> Option<String> {
    if secret_value(secret, "device_id").is_some() || secret_value(secret, "authkey").is_none() {
        return None;
    }
    secret.metadata.annotations.as_ref()?.get(KEY_ID_ANNOTATION).cloned()
}

/// Per-replica status from the Secrets (sorted by pod), and how many are registered.
pub fn replica_statuses(replicas: &[Replica], secrets: &[Secret], failed: &BTreeSet<String>) -> Vec<ReplicaStatus> {
    let by_name: BTreeMap<&str, &Secret> = secrets
        .iter()
        .filter_map(|s| Some((s.metadata.name.as_deref()?, s)))
        .collect();
    replicas
        .iter()
        .map(|r| {
            let s = by_name.get(r.secret.as_str());
            let value = |k: &str| s.and_then(|s| secret_value(s, k));
            let fqdn = value("device_fqdn").map(|f| f.trim_end_matches('.').to_string());
            let device_id = value("device_id");
            let state = if device_id.is_some() {
                ReplicaState::Registered
            } else if failed.contains(&r.secret) {
                ReplicaState::Failed
            } else if value("authkey").is_some() {
                ReplicaState::KeyIssued
            } else {
                ReplicaState::Pending
            };
            ReplicaStatus {
                pod: r.pod.clone(),
                secret: r.secret.clone(),
                hostname: fqdn.as_ref().and_then(|f| f.split('.').next()).map(str::to_string),
                ips: value("device_ips")
                    .and_then(|v| serde_json::from_str::<Vec<String>>(&v).ok())
                    .unwrap_or_default(),
                device_id,
                fqdn,
                state,
                last_reset: s.and_then(|s| super::reset::last_reset(s)),
                slot: r.slot,
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "desired_tests.rs"]
mod tests;
