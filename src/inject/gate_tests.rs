//! The credentials scheduling gate: added to unbound pods at admission, once, never to templates.

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use serde_json::json;

use super::*;
use crate::api::{CREDENTIALS_GATE, TailscaleNode};

fn node() -> TailscaleNode {
    serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps"}, "spec": {}}))
    .unwrap()
}

fn pod(spec_extra: serde_json::Value) -> Pod {
    let mut spec = json!({"containers": [{"name": "app", "image": "nginx"}]});
    json_patch::merge(&mut spec, &spec_extra);
    serde_json::from_value(
        json!({"metadata": {"name": "web-1", "labels": {"tailnode.dev/node": "web"}},
        "spec": spec}),
    )
    .unwrap()
}

fn inject(p: &Pod) -> Pod {
    match inject_pod(p, &node(), &ClusterFacts::default()).unwrap() {
        Outcome::Injected { object, .. } => object,
        Outcome::Skipped(s) => panic!("skipped: {s:?}"),
        Outcome::Refreshed { .. } => panic!("refreshed"),
    }
}

fn gate_names(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.name)
        .collect()
}

#[test]
fn unbound_pods_get_the_gate_after_any_gate_of_their_own() {
    let p = inject(&pod(json!({"schedulingGates": [{"name": "example.com/quota"}]})));
    assert_eq!(
        gate_names(&p),
        vec!["example.com/quota".to_string(), CREDENTIALS_GATE.to_string()]
    );
    assert!(is_gated(p.spec.as_ref()));
}

#[test]
fn pods_bound_at_creation_cannot_carry_a_gate() {
    let p = inject(&pod(json!({"nodeName": "n1"})));
    assert!(gate_names(&p).is_empty());
    assert!(!is_gated(p.spec.as_ref()));
}

#[test]
fn templates_never_get_the_gate() {
    let t = PodTemplateSpec {
        metadata: pod(json!({})).metadata.into(),
        spec: pod(json!({})).spec,
    };
    let Outcome::Injected { object, .. } = inject_template(&t, &node(), &ClusterFacts::default()).unwrap() else {
        panic!("not injected")
    };
    assert!(!is_gated(object.spec.as_ref()));
}
