//! Slot identity (`replicaIdentity: slots`) in the injected pod.

use serde_json::json;

use super::tests::{env_of, env_value, facts, injected, node, pod, sidecar};
use super::*;
use crate::api::{IDENTITY_ANNOTATION, SLOT_ANNOTATION};

fn annotation(p: &Pod, k: &str) -> Option<String> {
    p.metadata.annotations.as_ref()?.get(k).cloned()
}

#[test]
fn a_slot_pod_reads_its_slot_secret_and_hostname_from_the_slot_annotation() {
    let n = node(json!({"replicaIdentity": "slots", "hostname": "api"}));
    // Whatever slot the pod claims for itself is dropped.
    let p = pod(json!({"metadata": {"annotations": {SLOT_ANNOTATION: "7", IDENTITY_ANNOTATION: "x"}}}));
    let (p, _) = injected(&p, &n, &facts(PodSecurityLevel::Restricted, true));
    assert_eq!(annotation(&p, SLOT_ANNOTATION), None);
    assert_eq!(annotation(&p, IDENTITY_ANNOTATION).as_deref(), Some("slots"));
    let c = sidecar(&p);
    let slot = env_of(c, "TS_SLOT").unwrap().value_from.as_ref().unwrap();
    assert_eq!(
        slot.field_ref.as_ref().unwrap().field_path,
        "metadata.annotations['tailnode.dev/slot']"
    );
    assert_eq!(
        env_value(c, "TS_KUBE_SECRET").as_deref(),
        Some("ts-web-slot-$(TS_SLOT)")
    );
    assert_eq!(env_value(c, "TS_HOSTNAME").as_deref(), Some("api-$(TS_SLOT)"));
    // TS_SLOT comes before the variables that expand it.
    let names: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(pos("TS_SLOT") < pos("TS_KUBE_SECRET") && pos("TS_SLOT") < pos("TS_HOSTNAME"));
    assert!(is_gated(p.spec.as_ref()));
}

#[test]
fn statefulset_bound_and_per_pod_pods_take_no_slot() {
    let slots = node(json!({"replicaIdentity": "slots"}));
    let f = facts(PodSecurityLevel::Restricted, true);
    let sts = pod(json!({"metadata": {"name": "db-2", "generateName": null,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "u", "controller": true}]}}));
    let bound = pod(json!({"spec": {"nodeName": "n1"}}));
    for p in [sts, bound] {
        let (out, _) = injected(&p, &slots, &f);
        assert_eq!(annotation(&out, IDENTITY_ANNOTATION), None);
        assert!(env_of(sidecar(&out), "TS_SLOT").is_none());
    }
    let (out, _) = injected(&pod(json!({})), &node(json!({})), &f);
    assert_eq!(
        env_value(sidecar(&out), "TS_KUBE_SECRET").as_deref(),
        Some("ts-$(POD_NAME)")
    );
    assert!(env_of(sidecar(&out), "TS_SLOT").is_none());
}

#[test]
fn the_default_identity_leaves_the_spec_hash_of_existing_nodes_alone() {
    let before = node(json!({"hostname": "api"}));
    let explicit = node(json!({"hostname": "api", "replicaIdentity": "pod"}));
    assert_eq!(node_spec_hash(&before.spec), node_spec_hash(&explicit.spec));
    let slots = node(json!({"hostname": "api", "replicaIdentity": "slots"}));
    assert_ne!(node_spec_hash(&before.spec), node_spec_hash(&slots.spec));
}
