//! What the controller keeps of the objects it watches. An injected pod is 8 KB of JSON and three
//! times that in memory; the controller reads a dozen fields of it, so the pod cache holds only
//! those (`strip_pod`, applied to every watch event before the store sees it). At 5,000 pods
//! that is the difference between a few MB and a few hundred.

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};

/// Annotations the controller reads all live under this prefix.
const OWN_PREFIX: &str = "tailnode.dev/";

/// PURE: `pod` reduced to what `desired::replicas` reads: name, namespace, uid, labels, owners,
/// deletion, tailnode's own annotations, the ServiceAccount, the scheduling gates and the phase.
pub fn strip_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k.starts_with(OWN_PREFIX));
    }
    let spec = pod.spec.take().map(|s| PodSpec {
        service_account_name: s.service_account_name,
        scheduling_gates: s.scheduling_gates,
        ..Default::default()
    });
    pod.spec = spec;
    let status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..Default::default()
    });
    pod.status = status;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::TailscaleNode;
    use crate::controller::desired::replicas;
    use serde_json::json;

    /// A pod as the apiserver stores it after injection, with what a real one carries besides.
    fn stored_pod(name: &str, gated: bool, phase: &str) -> Pod {
        let gates = if gated {
            json!([{"name": "example.com/other"}, {"name": crate::api::CREDENTIALS_GATE}])
        } else {
            json!([{"name": "example.com/other"}])
        };
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "namespace": "apps", "uid": format!("uid-{name}"),
                "labels": {"tailnode.dev/node": "web", "app": "web", "apps.kubernetes.io/pod-index": "1"},
                "annotations": {
                    "tailnode.dev/injected": "true", "tailnode.dev/spec": "abc",
                    "tailnode.dev/tailnet-name": "web-1", "tailnode.dev/tailnet-ips": "100.64.0.1",
                    "tailnode.dev/reset": "1",
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4000)
                },
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web",
                                     "uid": "s", "controller": true}],
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:spec": {}}}],
                "finalizers": ["example.com/keep"]
            },
            "spec": {
                "serviceAccountName": "web-sa",
                "schedulingGates": gates,
                "containers": [{"name": "app", "image": "nginx", "env": [{"name": "A", "value": "b"}]}],
                "initContainers": [{"name": "tailscale", "image": "tailscale/tailscale", "restartPolicy": "Always"}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "False"}],
                       "containerStatuses": [{"name": "app", "image": "nginx", "imageID": "", "ready": false,
                                              "restartCount": 3}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_controller_sees_the_same_replicas_in_a_stripped_pod() {
        let node = TailscaleNode::new("web", Default::default());
        for (gated, phase) in [(true, "Pending"), (false, "Running"), (false, "Succeeded")] {
            let full = stored_pod("web-1", gated, phase);
            let mut stripped = full.clone();
            strip_pod(&mut stripped);
            assert_eq!(replicas(&node, [&full]), replicas(&node, [&stripped]));
            assert_eq!(
                crate::controller::desired::finished(&full),
                crate::controller::desired::finished(&stripped)
            );
        }
    }

    #[test]
    fn a_stripped_pod_keeps_only_what_is_read_and_is_much_smaller() {
        let full = stored_pod("web-1", true, "Pending");
        let mut stripped = full.clone();
        strip_pod(&mut stripped);
        let spec = stripped.spec.as_ref().unwrap();
        assert!(spec.containers.is_empty() && spec.init_containers.is_none() && spec.volumes.is_none());
        assert_eq!(spec.service_account_name.as_deref(), Some("web-sa"));
        assert_eq!(spec.scheduling_gates.as_ref().map(Vec::len), Some(2));
        let annotations = stripped.metadata.annotations.as_ref().unwrap();
        assert!(annotations.keys().all(|k| k.starts_with("tailnode.dev/")));
        assert_eq!(annotations.len(), 5);
        assert!(stripped.metadata.managed_fields.is_none());
        assert_eq!(stripped.status.as_ref().unwrap().phase.as_deref(), Some("Pending"));
        assert!(stripped.status.as_ref().unwrap().conditions.is_none());
        let size = |p: &Pod| serde_json::to_vec(p).unwrap().len();
        assert!(
            size(&stripped) * 5 < size(&full),
            "{} vs {}",
            size(&stripped),
            size(&full)
        );
    }
}
