//! PURE: slot identity (`replicaIdentity: slots`). The pods of a Deployment (any pod that is no
//! StatefulSet's) take numbered slots; slot `n` is one device, `<hostname>-<n>`, whose state lives
//! in the Secret `ts-<node>-slot-<n>`, so a replacement pod rejoins as the same device.
//!
//! How a slot is taken, and why it is safe:
//! - The webhook marks the pod (`tailnode.dev/identity: slots`) and gates it; its sidecar reads
//!   the slot from the `tailnode.dev/slot` annotation (downward API) when it starts.
//! - The controller claims a slot by writing the pod's name and uid into the slot's Secret: a
//!   create for a new slot, an update at the Secret's resourceVersion for a free one. A stale view
//!   loses with a conflict, so two pods never claim one slot. Then it sets the pod's annotation,
//!   once (a ValidatingAdmissionPolicy refuses any later change). A claim whose annotation did not
//!   land is finished from the Secret on the next pass.
//! - A slot is held by the pod whose annotation names it until that pod is gone or has finished:
//!   a terminating pod still holds it (its tailscaled may still run; two with one node key fight).
//!   The kubelet gives a deleted pod a terminal phase (`Failed`/`Succeeded`) only once all its
//!   containers have stopped, so from then on the slot is free even while the object lingers.
//! - A waiting pod takes, in order: the slot of a pod on its way out (it is that pod's
//!   replacement: it waits behind its gate until the old pod is gone), else the lowest free slot,
//!   else a new one (the lowest unused number). So a rolling update with surge takes one extra
//!   slot, and each later replacement takes over the slot of the pod it replaces.
//! - A slot without a pod is released (`released-at`); after the grace period its Secret is
//!   retired, which deletes its device. A finished pod's slot keeps its device meanwhile.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Pod, Secret};

use super::desired::{POD_ANNOTATION, POD_UID_ANNOTATION, Replica, finished, injected_for, state_secret};
use crate::api::{
    IDENTITY_ANNOTATION, SLOT_ANNOTATION, SLOTS_IDENTITY, TailscaleNode, slot_secret_name, slot_secret_prefix,
};

/// Slot Secret annotation: when the slot lost its last pod (RFC 3339).
pub const RELEASED_AT_ANNOTATION: &str = "tailnode.dev/released-at";

/// Where a pod stands with slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOf {
    /// Not a slot pod (per-pod identity, or a StatefulSet's).
    NotSlotted,
    /// A slot pod that holds no slot yet.
    Waiting,
    /// A slot pod holding slot `n`.
    Held(u32),
}

/// Where `pod` stands with slots, from its annotations.
pub fn slot_of(pod: &Pod) -> SlotOf {
    let annotations = pod.metadata.annotations.as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    if get(IDENTITY_ANNOTATION) != Some(SLOTS_IDENTITY) {
        return SlotOf::NotSlotted;
    }
    match get(SLOT_ANNOTATION).and_then(|v| v.parse().ok()) {
        Some(n) => SlotOf::Held(n),
        None => SlotOf::Waiting,
    }
}

/// One step towards the slots as they should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotAction {
    /// Give `slot` to `pod`: write the holder into the slot's Secret (create it when
    /// `resource_version` is `None`, else update it at that version), then annotate the pod.
    Claim {
        pod: String,
        uid: String,
        slot: u32,
        resource_version: Option<String>,
    },
    /// The slot's Secret already names `pod` (a claim whose annotation did not land): annotate.
    Annotate { pod: String, slot: u32 },
    /// The slot `secret` has no pod: record since when.
    Release { secret: String },
    /// The released slot `secret` is held again: clear `released-at`.
    Hold { secret: String },
}

/// What `plan` decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// The writes, claims first.
    pub actions: Vec<SlotAction>,
    /// Slot Secrets to keep though no replica uses them now (released, within the grace period;
    /// or claimed in this pass).
    pub kept: BTreeSet<String>,
    /// Pods that wait for a terminating pod's slot.
    pub waiting: usize,
    /// When the first released slot runs out of grace: look again then.
    pub next_expiry: Option<DateTime<Utc>>,
}

struct SlotPod<'a> {
    name: &'a str,
    uid: &'a str,
    slot: SlotOf,
    gated: bool,
    terminating: bool,
}

fn annotation<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The slot pods of `node` among `pods` that can hold a slot (finished pods cannot), oldest first.
fn slot_pods<'a>(node: &TailscaleNode, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<SlotPod<'a>> {
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let mut out: Vec<(&'a Pod, SlotPod<'a>)> = pods
        .into_iter()
        .filter(|p| injected_for(p, name) && !finished(p))
        .filter_map(|p| {
            let slot = slot_of(p);
            (slot != SlotOf::NotSlotted).then_some(())?;
            Some((
                p,
                SlotPod {
                    name: p.metadata.name.as_deref()?,
                    uid: p.metadata.uid.as_deref().unwrap_or_default(),
                    slot,
                    gated: crate::inject::is_gated(p.spec.as_ref()),
                    terminating: p.metadata.deletion_timestamp.is_some(),
                },
            ))
        })
        .collect();
    out.sort_by(|(a, pa), (b, pb)| {
        let at = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        at(a).cmp(&at(b)).then(pa.name.cmp(pb.name))
    });
    out.into_iter().map(|(_, p)| p).collect()
}

/// The slot Secrets of `node` among `secrets`, by slot number.
fn slot_secrets<'a>(node: &TailscaleNode, secrets: &'a [Secret]) -> BTreeMap<u32, &'a Secret> {
    let prefix = slot_secret_prefix(node.metadata.name.as_deref().unwrap_or_default());
    secrets
        .iter()
        .filter_map(|s| {
            let n: u32 = s.metadata.name.as_deref()?.strip_prefix(&prefix)?.parse().ok()?;
            (annotation(s, SLOT_ANNOTATION) == Some(n.to_string().as_str())).then_some((n, s))
        })
        .collect()
}

fn released_at(s: &Secret) -> Option<DateTime<Utc>> {
    annotation(s, RELEASED_AT_ANNOTATION)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// The slot work for this reconcile, from the pods of the node's namespace, the node's Secrets,
/// the grace period of a slot without a pod, and the time.
pub fn plan<'a>(
    node: &TailscaleNode,
    pods: impl IntoIterator<Item = &'a Pod>,
    secrets: &[Secret],
    grace: chrono::Duration,
    now: DateTime<Utc>,
) -> SlotPlan {
    let pods = slot_pods(node, pods);
    let by_slot = slot_secrets(node, secrets);
    let mut out = SlotPlan::default();
    // Who holds what: the pods' annotations, then claims whose annotation did not land.
    let mut holders: BTreeMap<u32, &SlotPod<'_>> = BTreeMap::new();
    for p in &pods {
        if let SlotOf::Held(n) = p.slot {
            holders.insert(n, p);
        }
    }
    let mut claiming: BTreeSet<&str> = BTreeSet::new();
    for (n, s) in &by_slot {
        if holders.contains_key(n) || s.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let holder = pods.iter().find(|p| {
            p.slot == SlotOf::Waiting
                && !p.terminating
                && Some(p.name) == annotation(s, POD_ANNOTATION)
                && Some(p.uid) == annotation(s, POD_UID_ANNOTATION)
        });
        if let Some(p) = holder {
            out.actions.push(SlotAction::Annotate {
                pod: p.name.to_string(),
                slot: *n,
            });
            claiming.insert(p.name);
            holders.insert(*n, p);
        }
    }
    // Slots a replacement should wait for, free slots, and numbers in use.
    let mut leaving = holders.values().filter(|p| p.terminating).count();
    let mut free: Vec<u32> = by_slot
        .iter()
        .filter(|(n, s)| !holders.contains_key(n) && s.metadata.deletion_timestamp.is_none())
        .map(|(n, _)| *n)
        .rev()
        .collect();
    let mut used: BTreeSet<u32> = by_slot.keys().chain(holders.keys()).copied().collect();
    let mut claimed: BTreeSet<u32> = BTreeSet::new();
    for p in &pods {
        if p.slot != SlotOf::Waiting || !p.gated || p.terminating || claiming.contains(p.name) {
            continue;
        }
        if leaving > 0 {
            leaving -= 1;
            out.waiting += 1;
            continue;
        }
        let (slot, resource_version) = match free.pop() {
            Some(n) => (n, by_slot.get(&n).and_then(|s| s.metadata.resource_version.clone())),
            None => {
                let n = (0..).find(|n| !used.contains(n)).unwrap_or(u32::MAX);
                used.insert(n);
                (n, None)
            }
        };
        claimed.insert(slot);
        out.actions.push(SlotAction::Claim {
            pod: p.name.to_string(),
            uid: p.uid.to_string(),
            slot,
            resource_version,
        });
    }
    // Free slots: released, kept through the grace period. Held ones: not released.
    for (n, s) in &by_slot {
        // A Secret on its way out is retired already: nothing to release or keep.
        let Some(secret) = s
            .metadata
            .name
            .clone()
            .filter(|_| s.metadata.deletion_timestamp.is_none())
        else {
            continue;
        };
        let held = holders.contains_key(n) || claimed.contains(n);
        let released = released_at(s);
        if held {
            if released.is_some() && !claimed.contains(n) {
                out.actions.push(SlotAction::Hold { secret: secret.clone() });
            }
            out.kept.insert(secret);
            continue;
        }
        match released {
            None => {
                out.actions.push(SlotAction::Release { secret: secret.clone() });
                out.kept.insert(secret);
                out.next_expiry = min_time(out.next_expiry, now + grace);
            }
            Some(at) if now < at + grace => {
                out.kept.insert(secret);
                out.next_expiry = min_time(out.next_expiry, at + grace);
            }
            Some(_) => {}
        }
    }
    out
}

/// The state Secret of a new slot `slot` claimed by `pod` (uid `uid`).
pub fn slot_state_secret(node: &TailscaleNode, pod: &str, uid: &str, slot: u32) -> Secret {
    let secret = slot_secret_name(node.metadata.name.as_deref().unwrap_or_default(), slot);
    let replica = Replica {
        slot: Some(slot),
        ..Replica::new(pod, uid, secret)
    };
    state_secret(node, &replica)
}

fn min_time(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.min(b)))
}

#[cfg(test)]
#[path = "slots_tests.rs"]
mod tests;
