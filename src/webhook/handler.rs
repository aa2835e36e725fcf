//! One AdmissionReview in, one out. Never panics: every failure becomes a response the user reads.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Resource;
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{ObjectRef, Store};
use tracing::{info, info_span, warn};

use crate::api::{NODE_LABEL, TailscaleNode};
use crate::inject::{
    ClusterFacts, INJECT_LABEL, Membership, OperatorDefaults, Outcome, PodSecurityLevel, WorkloadKind, inject_pod,
    membership,
};
use crate::metrics::Metrics;

/// What the handler reads.
pub struct WebhookState {
    /// TailscaleNodes, from a reflector.
    pub nodes: Store<TailscaleNode>,
    /// Namespaces (for their PodSecurity label), from a reflector.
    pub namespaces: Store<Namespace>,
    /// The apiserver runs native sidecars.
    pub native_sidecars: bool,
    /// Operator defaults.
    pub defaults: OperatorDefaults,
    /// The apiserver's service host as pods see it (the webhook's own `KUBERNETES_SERVICE_HOST`).
    pub api_server_host: Option<String>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Namespaces that can never be opted in as a whole (kube-system, the operator's own).
    pub protected_namespaces: Vec<String>,
}

const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

fn deny<T: Resource>(req: &AdmissionRequest<T>, message: String) -> AdmissionReview<DynamicObject> {
    AdmissionResponse::from(req).deny(message).into_review()
}

/// Answers one AdmissionReview (raw JSON). Returns the review and a bounded result label:
/// `injected`, `refreshed` (a reinvocation gave later-added containers the proxy env),
/// `skipped`, `denied` or `error`.
pub fn review(state: &WebhookState, body: &[u8]) -> (AdmissionReview<DynamicObject>, &'static str) {
    // The common case in one typed parse (the dynamic path below parses the object twice more). A
    // body that does not parse so (not a review, not a Pod, a broken Pod) takes the dynamic path,
    // which says what is wrong.
    if let Ok(typed) = serde_json::from_slice::<AdmissionReview<Pod>>(body)
        && let Ok(mut req) = TryInto::<AdmissionRequest<Pod>>::try_into(typed)
    {
        let object = req.object.take();
        return decide(state, &req, || object.map(Ok));
    }
    review_dynamic(state, body)
}

/// [`review`] without its typed fast path: the object read as a `DynamicObject`, then as a Pod.
pub(super) fn review_dynamic(state: &WebhookState, body: &[u8]) -> (AdmissionReview<DynamicObject>, &'static str) {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "malformed admission review");
            let msg = format!("tailnode: the request is not an admission.k8s.io/v1 AdmissionReview: {e}");
            return (AdmissionResponse::invalid(msg).into_review(), "error");
        }
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("tailnode: the AdmissionReview carries no request: {e}");
            return (AdmissionResponse::invalid(msg).into_review(), "error");
        }
    };
    decide(state, &req, || {
        req.object
            .as_ref()
            .map(|object| serde_json::to_value(object).and_then(serde_json::from_value))
    })
}

/// Answers a parsed request; `pod` gives its object as a Pod (`None` when it has none), read only
/// for a Pod CREATE.
fn decide<T: Resource>(
    state: &WebhookState,
    req: &AdmissionRequest<T>,
    pod: impl FnOnce() -> Option<Result<Pod, serde_json::Error>>,
) -> (AdmissionReview<DynamicObject>, &'static str) {
    let ns = req.namespace.clone().unwrap_or_default();
    let span = info_span!("admission", uid = %req.uid, namespace = %ns, dry_run = req.dry_run);
    let _guard = span.enter();
    let kind = &req.kind;
    if !(kind.group.is_empty() && kind.kind == "Pod" && req.operation == Operation::Create) {
        let msg = format!(
            "tailnode mutates only Pod CREATE requests, but got {:?} of {}/{} {}; fix the rules of the MutatingWebhookConfiguration",
            req.operation, kind.group, kind.version, kind.kind
        );
        return (deny(req, msg), "error");
    }
    let pod: Pod = match pod() {
        Some(Ok(p)) => p,
        None => {
            return (
                deny(req, "tailnode: the Pod CREATE request has no object".into()),
                "error",
            );
        }
        Some(Err(e)) => {
            return (
                deny(req, format!("tailnode: the object is not a valid Pod: {e}")),
                "error",
            );
        }
    };
    let namespace = state.namespaces.get(&ObjectRef::new(&ns));
    let (node_name, by_namespace) = match membership(&pod, namespace.as_deref(), &state.protected_namespaces) {
        Membership::Pod(n) => (n, false),
        Membership::Namespace(n) => (n, true),
        Membership::None => return (AdmissionResponse::from(req).into_review(), "skipped"),
    };
    let Some(node) = state.nodes.get(&ObjectRef::new(&node_name).within(&ns)) else {
        let msg = if by_namespace {
            format!(
                "namespace {ns} opts every pod into tailnode with label {NODE_LABEL}={node_name}, but there is no TailscaleNode {node_name} in it; create it, fix the namespace's label, or label the pod {INJECT_LABEL}=false"
            )
        } else {
            format!(
                "pod opts into tailnode with label {NODE_LABEL}={node_name}, but there is no TailscaleNode {node_name} in namespace {ns}; create it (kubectl get tsn -n {ns}) or fix the label"
            )
        };
        return (deny(req, msg), "denied");
    };
    let level = namespace
        .as_ref()
        .and_then(|n| n.metadata.labels.as_ref().and_then(|l| l.get(ENFORCE_LABEL)).cloned());
    let facts = ClusterFacts {
        native_sidecars: state.native_sidecars,
        pod_security: level.as_deref().map_or(state.defaults.unlabelled_namespace_level, |l| {
            PodSecurityLevel::from_label(Some(l))
        }),
        workload: WorkloadKind::Other,
        defaults: state.defaults.clone(),
        api_server_host: state.api_server_host.clone(),
        namespace: Some(ns.clone()),
    };
    // A pod opted in by its namespace is injected as if it carried the label, and gets it: the
    // controller finds its replicas by that label.
    let pod_in = if by_namespace {
        let mut labelled = pod.clone();
        labelled
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(NODE_LABEL.to_string(), node_name.clone());
        std::borrow::Cow::Owned(labelled)
    } else {
        std::borrow::Cow::Borrowed(&pod)
    };
    match inject_pod(&pod_in, &node, &facts) {
        Ok(Outcome::Skipped(_)) => (AdmissionResponse::from(req).into_review(), "skipped"),
        Ok(Outcome::Injected { object, mode }) => {
            let reply = patched(req, &pod, &object, "injected");
            if reply.1 == "injected" {
                info!(node = %node_name, mode = mode.as_str(), "injected sidecar");
            }
            reply
        }
        Ok(Outcome::Refreshed { object }) => {
            let reply = patched(req, &pod, &object, "refreshed");
            if reply.1 == "refreshed" {
                info!(node = %node_name, "gave proxy env to containers added since injection");
            }
            reply
        }
        Err(e) => (deny(req, format!("tailnode: {e}")), "denied"),
    }
}

/// Allows the pod with the JSONPatch from `before` to `after`, both serialised through the same
/// typed Pod. An empty diff is a plain allow without a patch, labelled `skipped`.
fn patched<T: Resource>(
    req: &AdmissionRequest<T>,
    before: &Pod,
    after: &Pod,
    label: &'static str,
) -> (AdmissionReview<DynamicObject>, &'static str) {
    let (Ok(before), Ok(after)) = (serde_json::to_value(before), serde_json::to_value(after)) else {
        return (deny(req, "tailnode: could not serialise the pod".into()), "error");
    };
    let patch = json_patch::diff(&before, &after);
    if patch.0.is_empty() {
        return (AdmissionResponse::from(req).into_review(), "skipped");
    }
    match AdmissionResponse::from(req).with_patch(patch) {
        Ok(resp) => (resp.into_review(), label),
        Err(e) => (deny(req, format!("tailnode: could not encode the patch: {e}")), "error"),
    }
}
