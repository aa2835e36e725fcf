//! PURE: resets on demand. `kubectl annotate pod P tailnode.dev/reset=<new value>` (or the same
//! annotation on the TailscaleNode, for all its replicas one at a time) gives a replica a new
//! device: its pod is evicted (the Eviction API, so PodDisruptionBudgets hold) and comes back
//! under a new key. A Deployment's pod comes back as a new pod with a new state Secret (the old
//! one is retired with its device as usual). A StatefulSet's pod comes back under the same name
//! and Secret: the Secret records the old pod's uid (`reset-pending`), the new pod stays behind
//! its credentials gate, and only once the old pod is gone (its sidecar no longer writes the
//! state; tailscaled writes it on shutdown) is the device deleted and the state cleared; the usual
//! mint then follows. A bare pod, which nothing would recreate, is refused. The value handled last
//! is recorded on the state Secret, so each new value resets once.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

use super::desired::Replica;

/// On a pod or a TailscaleNode: set it to a new value to reset the replica (all replicas).
pub const RESET_ANNOTATION: &str = "tailnode.dev/reset";
/// On a state Secret: the pod-level reset value handled last.
pub const RESET_DONE_ANNOTATION: &str = "tailnode.dev/reset-done";
/// On a state Secret: the node-level reset value handled last. Secrets created after a node-level
/// reset carry its value from the start (a new replica has nothing to reset).
pub const NODE_RESET_DONE_ANNOTATION: &str = "tailnode.dev/node-reset-done";
/// On a state Secret: the reset carried out last, for the status (`<value>`, or `node/<value>`).
pub const LAST_RESET_ANNOTATION: &str = "tailnode.dev/last-reset";
/// On a StatefulSet replica's state Secret: the uid of the pod a reset is replacing.
pub const RESET_PENDING_ANNOTATION: &str = "tailnode.dev/reset-pending";

/// The reset values to record as handled on a state Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    /// The pod's `tailnode.dev/reset`.
    pub pod: Option<String>,
    /// The TailscaleNode's `tailnode.dev/reset`.
    pub node: Option<String>,
}

/// One step of a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// A pod no controller would recreate: say so, and record the request as handled.
    Refuse { pod: String, secret: String, marks: Marks },
    /// Evict the pod. For a StatefulSet replica, `pending_uid` is recorded first (the state is
    /// wiped once that pod is gone); otherwise the marks are recorded once the eviction is in.
    Evict {
        pod: String,
        secret: String,
        marks: Marks,
        pending_uid: Option<String>,
    },
    /// The pod that was reset is gone: delete the device, clear the state (a new key follows).
    Wipe {
        pod: String,
        secret: String,
        device_id: Option<String>,
    },
}

fn annotation<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

fn registered(s: &Secret) -> bool {
    s.data
        .as_ref()
        .is_some_and(|d| d.get("device_id").is_some_and(|v| !v.0.is_empty()))
}

/// The steps for this reconcile, from the node's `tailnode.dev/reset` (`node_reset`), the
/// replicas (with their pods' own reset values) and the state Secrets.
pub fn plan(node_reset: Option<&str>, replicas: &[Replica], secrets: &[Secret]) -> Vec<Reset> {
    let by_name: BTreeMap<&str, &Secret> = secrets
        .iter()
        .filter_map(|s| Some((s.metadata.name.as_deref()?, s)))
        .collect();
    let mut out = Vec::new();
    // Resets under way (StatefulSet replicas): wipe once the old pod is gone, else evict again
    // (an eviction a PodDisruptionBudget refused is retried).
    for s in secrets {
        let (Some(uid), Some(name)) = (annotation(s, RESET_PENDING_ANNOTATION), s.metadata.name.as_deref()) else {
            continue;
        };
        match replicas.iter().find(|r| r.secret == name) {
            Some(r) if r.pod_uid == uid => {
                if !r.terminating {
                    out.push(Reset::Evict {
                        pod: r.pod.clone(),
                        secret: name.to_string(),
                        marks: Marks::default(),
                        pending_uid: Some(uid.to_string()),
                    });
                }
            }
            other => out.push(Reset::Wipe {
                pod: other
                    .map_or_else(
                        || annotation(s, super::desired::POD_ANNOTATION).unwrap_or(name),
                        |r| &r.pod,
                    )
                    .to_string(),
                secret: name.to_string(),
                device_id: super::desired::secret_value(s, "device_id"),
            }),
        }
    }
    // A node-level reset goes one replica at a time: only while every replica is registered and
    // none is on its way out or being reset.
    let settled = out.is_empty()
        && replicas
            .iter()
            .all(|r| !r.terminating && by_name.get(r.secret.as_str()).is_some_and(|s| registered(s)));
    let mut node_started = false;
    for r in replicas {
        let Some(s) = by_name.get(r.secret.as_str()) else {
            continue;
        };
        if r.terminating || annotation(s, RESET_PENDING_ANNOTATION).is_some() {
            continue;
        }
        let pod_want = r
            .reset
            .as_deref()
            .filter(|v| Some(*v) != annotation(s, RESET_DONE_ANNOTATION));
        let node_want = node_reset.filter(|v| Some(*v) != annotation(s, NODE_RESET_DONE_ANNOTATION));
        if pod_want.is_none() && (node_want.is_none() || !settled || node_started) {
            continue;
        }
        let marks = Marks {
            pod: pod_want.map(str::to_string),
            node: node_want.map(str::to_string),
        };
        let (pod, secret) = (r.pod.clone(), r.secret.clone());
        if !r.owned {
            out.push(Reset::Refuse { pod, secret, marks });
            continue;
        }
        node_started |= pod_want.is_none();
        // A StatefulSet pod or a slot comes back with the same Secret: wipe it after the old pod.
        let pending_uid = (r.statefulset.is_some() || r.slot.is_some()).then(|| r.pod_uid.clone());
        out.push(Reset::Evict {
            pod,
            secret,
            marks,
            pending_uid,
        });
    }
    out
}

/// The reset last carried out for the replica of this state Secret, for the status.
pub fn last_reset(s: &Secret) -> Option<String> {
    annotation(s, LAST_RESET_ANNOTATION).map(str::to_string)
}

/// The annotations a state Secret gets for `marks` (and, with `pending_uid`, the reset under way).
pub fn mark_annotations(marks: &Marks, pending_uid: Option<&str>) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    if let Some(v) = &marks.pod {
        out.insert(RESET_DONE_ANNOTATION, v.clone());
    }
    if let Some(v) = &marks.node {
        out.insert(NODE_RESET_DONE_ANNOTATION, v.clone());
    }
    let last = marks
        .pod
        .clone()
        .or_else(|| marks.node.as_ref().map(|v| format!("node/{v}")));
    if let Some(v) = last {
        out.insert(LAST_RESET_ANNOTATION, v);
    }
    if let Some(uid) = pending_uid {
        out.insert(RESET_PENDING_ANNOTATION, uid.to_string());
    }
    out
}

#[cfg(test)]
#[path = "reset_tests.rs"]
mod tests;
