//! PURE: which TailscaleNode a pod belongs to. A pod opts in with its own label
//! `tailnode.dev/node: <name>`; a whole namespace opts in with the same label on the Namespace,
//! and then every new pod in it belongs to that node unless it opts out with the label
//! `tailnode.dev/inject: "false"` (a label, so that webhook selectors can see it). Pods on the
//! host network and static (mirror) pods are never opted in by their namespace, and protected
//! namespaces (kube-system, the operator's own) never are.

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::api::NODE_LABEL;

/// Pod label that keeps a pod in an opted-in namespace out.
pub const INJECT_LABEL: &str = "tailnode.dev/inject";
/// Annotation the kubelet puts on the API mirror of a static pod.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why a pod belongs to a TailscaleNode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// The pod's own label names the node.
    Pod(String),
    /// The pod's namespace names the node (the webhook copies the label onto the pod).
    Namespace(String),
    /// Not opted in.
    None,
}

fn label<'a>(labels: Option<&'a std::collections::BTreeMap<String, String>>, key: &str) -> Option<&'a String> {
    labels.and_then(|l| l.get(key))
}

/// The pod's membership. `protected`: namespaces that can never be opted in as a whole.
pub fn membership(pod: &Pod, namespace: Option<&Namespace>, protected: &[String]) -> Membership {
    if let Some(node) = label(pod.metadata.labels.as_ref(), NODE_LABEL) {
        return Membership::Pod(node.clone());
    }
    let Some(ns) = namespace else {
        return Membership::None;
    };
    let Some(node) = label(ns.metadata.labels.as_ref(), NODE_LABEL) else {
        return Membership::None;
    };
    let ns_name = ns.metadata.name.as_deref().unwrap_or_default();
    let opted_out = label(pod.metadata.labels.as_ref(), INJECT_LABEL).is_some_and(|v| v == "false");
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
    if opted_out || host_network || mirror || protected.iter().any(|p| p == ns_name) || node.is_empty() {
        return Membership::None;
    }
    Membership::Namespace(node.clone())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn ns(name: &str, node: Option<&str>) -> Namespace {
        let labels = node.map_or(json!({}), |n| json!({"tailnode.dev/node": n}));
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    #[test]
    fn a_namespace_label_opts_in_every_pod_but_those_that_opt_out() {
        let protected = vec!["kube-system".to_string(), "tailnode-system".to_string()];
        let plain = pod(json!({"metadata": {"name": "a"}, "spec": {"containers": []}}));
        let apps = ns("apps", Some("web"));
        assert_eq!(
            membership(&plain, Some(&apps), &protected),
            Membership::Namespace("web".into())
        );
        // Its own label wins.
        let own = pod(json!({"metadata": {"labels": {"tailnode.dev/node": "db"}}, "spec": {"containers": []}}));
        assert_eq!(membership(&own, Some(&apps), &protected), Membership::Pod("db".into()));
        // Opted out, host network, static pods, protected namespaces, unlabelled namespaces.
        let out = pod(json!({"metadata": {"labels": {"tailnode.dev/inject": "false"}}, "spec": {"containers": []}}));
        assert_eq!(membership(&out, Some(&apps), &protected), Membership::None);
        let other_value =
            pod(json!({"metadata": {"labels": {"tailnode.dev/inject": "true"}}, "spec": {"containers": []}}));
        assert_eq!(
            membership(&other_value, Some(&apps), &protected),
            Membership::Namespace("web".into())
        );
        let host = pod(json!({"spec": {"hostNetwork": true, "containers": []}}));
        assert_eq!(membership(&host, Some(&apps), &protected), Membership::None);
        let mirror =
            pod(json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "x"}}, "spec": {"containers": []}}));
        assert_eq!(membership(&mirror, Some(&apps), &protected), Membership::None);
        for name in ["kube-system", "tailnode-system"] {
            assert_eq!(
                membership(&plain, Some(&ns(name, Some("web"))), &protected),
                Membership::None
            );
        }
        assert_eq!(
            membership(&plain, Some(&ns("apps", None)), &protected),
            Membership::None
        );
        assert_eq!(membership(&plain, None, &protected), Membership::None);
    }
}
