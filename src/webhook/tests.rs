use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::*;
use crate::api::TailscaleNode;
use crate::inject::{OperatorDefaults, PodSecurityLevel};
use crate::metrics::Metrics;

fn state(level: Option<&str>) -> WebhookState {
    let mut nodes = Writer::<TailscaleNode>::default();
    let node: TailscaleNode = serde_json::from_value(json!({
        "apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps"}, "spec": {"mode": "auto"}
    }))
    .unwrap();
    nodes.apply_watcher_event(&Event::Apply(node));
    let mut namespaces = Writer::<Namespace>::default();
    let labels = level
        .map(|l| json!({"pod-security.kubernetes.io/enforce": l}))
        .unwrap_or(json!({}));
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "apps", "labels": labels}})).unwrap();
    namespaces.apply_watcher_event(&Event::Apply(ns));
    WebhookState {
        nodes: nodes.as_reader(),
        namespaces: namespaces.as_reader(),
        native_sidecars: true,
        defaults: OperatorDefaults::default(),
        api_server_host: None,
        metrics: std::sync::Arc::new(Metrics::default()),
        protected_namespaces: vec!["kube-system".into(), "tailnode-system".into()],
    }
}

fn request(object: Value, operation: &str, kind: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": kind, "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": kind, "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps", "operation": operation,
            "userInfo": {"username": "admin"}, "object": object, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    }))
    .unwrap()
}

/// The patch bytes (kube serialises them as a JSON array of bytes, which the apiserver accepts).
fn patch_bytes(resp: &Value) -> Vec<u8> {
    resp["patch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect()
}

fn pod_kind() -> Value {
    json!({"group": "", "version": "v1", "kind": "Pod"})
}

fn pod(label: Option<&str>) -> Value {
    let labels = label.map(|l| json!({"tailnode.dev/node": l})).unwrap_or(json!({}));
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "apps", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
}

fn response(review: &kube::core::admission::AdmissionReview<kube::api::DynamicObject>) -> Value {
    serde_json::to_value(review).unwrap()["response"].clone()
}

#[test]
fn labelled_pod_gets_a_patch_that_applies_cleanly() {
    let (out, result) = review(
        &state(Some("restricted")),
        &request(pod(Some("web")), "CREATE", pod_kind()),
    );
    assert_eq!(result, "injected");
    let resp = response(&out);
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(resp["patchType"], "JSONPatch");
    let raw = patch_bytes(&resp);
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut doc = pod(Some("web"));
    json_patch::patch(&mut doc, &patch).unwrap();
    assert_eq!(doc["spec"]["initContainers"][0]["name"], "tailscale");
    // auto in a restricted namespace is userspace.
    assert_eq!(doc["metadata"]["annotations"]["tailnode.dev/mode"], "userspace");
    assert_eq!(
        doc["spec"]["containers"],
        pod(None)["spec"]["containers"],
        "the app container is untouched"
    );
}

fn mode_of(s: &WebhookState) -> String {
    let (out, _) = review(s, &request(pod(Some("web")), "CREATE", pod_kind()));
    let raw = String::from_utf8(patch_bytes(&response(&out))).unwrap();
    let at = raw.find("\"tailnode.dev/mode\":\"").expect("mode annotation") + 21;
    raw[at..].split('"').next().unwrap().to_string()
}

#[test]
fn auto_mode_picks_tun_only_where_privileged_is_explicit_or_the_cluster_default() {
    assert_eq!(mode_of(&state(Some("privileged"))), "tun");
    assert_eq!(mode_of(&state(Some("baseline"))), "userspace");
    // Unlabelled: the operator's --default-pod-security (baseline unless told otherwise).
    assert_eq!(mode_of(&state(None)), "userspace");
    let mut privileged_default = state(None);
    privileged_default.defaults.unlabelled_namespace_level = PodSecurityLevel::Privileged;
    assert_eq!(mode_of(&privileged_default), "tun");
    let mut restricted_default = state(Some("privileged"));
    restricted_default.defaults.unlabelled_namespace_level = PodSecurityLevel::Restricted;
    assert_eq!(mode_of(&restricted_default), "tun", "a label wins over the default");
}

#[test]
fn unlabelled_pods_pass_without_patch() {
    let (out, result) = review(&state(None), &request(pod(None), "CREATE", pod_kind()));
    assert_eq!(result, "skipped");
    let resp = response(&out);
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none() || resp["patch"].is_null());
}

#[test]
fn a_missing_node_is_denied_with_what_to_fix() {
    let (out, result) = review(&state(None), &request(pod(Some("db")), "CREATE", pod_kind()));
    assert_eq!(result, "denied");
    let resp = response(&out);
    assert_eq!(resp["allowed"], false);
    let msg = resp["status"]["message"].as_str().unwrap();
    assert!(msg.contains("no TailscaleNode db in namespace apps"), "{msg}");
}

#[test]
fn not_a_pod_or_not_create_is_refused_clearly() {
    let deploy = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (out, result) = review(&state(None), &request(json!({"kind": "Deployment"}), "CREATE", deploy));
    assert_eq!(result, "error");
    let msg = response(&out)["status"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("only Pod CREATE") && msg.contains("Deployment"), "{msg}");
    let (out, _) = review(&state(None), &request(pod(Some("web")), "UPDATE", pod_kind()));
    assert_eq!(response(&out)["allowed"], false);
}

#[test]
fn malformed_reviews_get_an_error_response_not_a_panic() {
    for body in [
        &b"not json"[..],
        b"{}",
        b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
    ] {
        let (out, result) = review(&state(None), body);
        assert_eq!(result, "error");
        assert_eq!(response(&out)["allowed"], false);
    }
    let bad_pod = json!({"metadata": {"labels": {"tailnode.dev/node": "web"}}, "spec": {"containers": "nope"}});
    let (out, _) = review(&state(None), &request(bad_pod, "CREATE", pod_kind()));
    assert!(
        response(&out)["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not a valid Pod")
    );
}

#[test]
fn tun_refused_in_restricted_namespace_is_explained() {
    let s = state(Some("restricted"));
    let mut w = Writer::<TailscaleNode>::default();
    let node: TailscaleNode =
        serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps"}, "spec": {"mode": "tun"}}))
        .unwrap();
    w.apply_watcher_event(&Event::Apply(node));
    let s = WebhookState {
        nodes: w.as_reader(),
        ..s
    };
    let (out, result) = review(&s, &request(pod(Some("web")), "CREATE", pod_kind()));
    assert_eq!(result, "denied");
    assert!(
        response(&out)["status"]["message"]
            .as_str()
            .unwrap()
            .contains("forbids NET_ADMIN")
    );
}

#[test]
fn the_typed_fast_path_answers_like_the_dynamic_path() {
    let deploy = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let mut big = pod(Some("web"));
    big["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "1"},
        {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]);
    big["spec"]["volumes"] = json!([{"name": "cache", "emptyDir": {}}]);
    big["metadata"]["annotations"] = json!({"unknown.example/field": "kept"});
    big["spec"]["unknownField"] = json!({"x": 1});
    let bodies = [
        request(pod(Some("web")), "CREATE", pod_kind()),
        request(big, "CREATE", pod_kind()),
        request(pod(None), "CREATE", pod_kind()),
        request(pod(Some("db")), "CREATE", pod_kind()),
        request(pod(Some("web")), "UPDATE", pod_kind()),
        request(Value::Null, "CREATE", pod_kind()),
        request(json!({"kind": "Deployment"}), "CREATE", deploy),
        request(json!({"spec": {"containers": "nope"}}), "CREATE", pod_kind()),
    ];
    for body in &bodies[..5] {
        let typed =
            serde_json::from_slice::<kube::core::admission::AdmissionReview<k8s_openapi::api::core::v1::Pod>>(body);
        assert!(typed.is_ok(), "the fast path takes Pod reviews: {typed:?}");
    }
    for level in [None, Some("restricted")] {
        let state = state(level);
        for body in &bodies {
            let (fast, fast_label) = review(&state, body);
            let (dynamic, dynamic_label) = review_dynamic(&state, body);
            assert_eq!(fast_label, dynamic_label, "{}", String::from_utf8_lossy(body));
            assert_eq!(
                serde_json::to_value(&fast).unwrap(),
                serde_json::to_value(&dynamic).unwrap(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}

#[tokio::test]
async fn the_response_body_is_the_review_as_json() {
    let (out, result) = review(&state(None), &request(pod(Some("web")), "CREATE", pod_kind()));
    assert_eq!(result, "injected");
    let response = json_response(&out);
    assert_eq!(response.status(), axum::http::StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    assert_eq!(body, serde_json::to_vec(&out).unwrap());
}

#[test]
fn native_sidecar_support_by_version() {
    assert!(supports_native_sidecars("1", "29"));
    assert!(supports_native_sidecars("1", "36+"));
    assert!(!supports_native_sidecars("1", "28"));
    assert!(!supports_native_sidecars("x", "y"));
}

fn exporting_state(api_server_host: Option<&str>) -> WebhookState {
    let mut w = Writer::<TailscaleNode>::default();
    let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"mode": "userspace", "outbound": {"socks5Port": 1055, "exportEnv": true}}}))
    .unwrap();
    w.apply_watcher_event(&Event::Apply(node));
    WebhookState {
        nodes: w.as_reader(),
        api_server_host: api_server_host.map(str::to_string),
        ..state(None)
    }
}

/// Runs one review of `doc` and applies its patch (if any); returns the result label and the doc.
fn admit(s: &WebhookState, doc: &Value) -> (&'static str, Value, Option<json_patch::Patch>) {
    let (out, result) = review(s, &request(doc.clone(), "CREATE", pod_kind()));
    let resp = response(&out);
    assert_eq!(resp["allowed"], true, "{resp}");
    if resp.get("patch").is_none() || resp["patch"].is_null() {
        return (result, doc.clone(), None);
    }
    let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes(&resp)).unwrap();
    let mut next = doc.clone();
    json_patch::patch(&mut next, &patch).unwrap();
    (result, next, Some(patch))
}

#[test]
fn reinvocation_patches_only_the_env_of_containers_added_since() {
    let s = exporting_state(None);
    let (result, injected, _) = admit(&s, &pod(Some("web")));
    assert_eq!(result, "injected");
    // Reinvoked with nothing new: allowed, no patch.
    let (result, same, patch) = admit(&s, &injected);
    assert_eq!((result, patch), ("skipped", None));
    assert_eq!(same, injected);
    // A later webhook added a container: only its env is patched in.
    let mut added = injected.clone();
    added["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "late", "image": "late"}));
    let (result, refreshed, patch) = admit(&s, &added);
    assert_eq!(result, "refreshed");
    let ops = serde_json::to_value(patch.unwrap()).unwrap();
    assert_eq!(ops.as_array().unwrap().len(), 1, "{ops}");
    assert_eq!(ops[0]["path"], "/spec/containers/1/env");
    assert_eq!(refreshed["spec"]["containers"][1]["env"][0]["name"], "ALL_PROXY");
    let mut back = refreshed.clone();
    back["spec"]["containers"][1].as_object_mut().unwrap().remove("env");
    assert_eq!(back, added, "nothing else changed");
    // And again: nothing to do.
    let (result, _, patch) = admit(&s, &refreshed);
    assert_eq!((result, patch), ("skipped", None));
}

#[test]
fn an_ipv6_apiserver_host_reaches_the_sidecar_bracketed() {
    let (_, doc, _) = admit(&exporting_state(Some("fd00:10:96::1")), &pod(Some("web")));
    let env = doc["spec"]["initContainers"][0]["env"].as_array().unwrap().clone();
    assert!(env.contains(&json!({"name": "KUBERNETES_SERVICE_HOST", "value": "[fd00:10:96::1]"})));
    let (_, doc, _) = admit(&exporting_state(Some("10.96.0.1")), &pod(Some("web")));
    let env = doc["spec"]["initContainers"][0]["env"].as_array().unwrap().clone();
    assert!(env.iter().all(|e| e["name"] != "KUBERNETES_SERVICE_HOST"));
}

/// `state` whose namespace `apps` carries `tailnode.dev/node: <node>`.
fn opted_in_state(node: &str) -> WebhookState {
    let s = state(None);
    let mut namespaces = Writer::<Namespace>::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "apps",
        "labels": {"tailnode.dev/node": node}}}))
    .unwrap();
    namespaces.apply_watcher_event(&Event::Apply(ns));
    WebhookState {
        namespaces: namespaces.as_reader(),
        ..s
    }
}

#[test]
fn a_namespace_label_opts_in_unlabelled_pods_and_labels_them() {
    let (out, result) = review(&opted_in_state("web"), &request(pod(None), "CREATE", pod_kind()));
    assert_eq!(result, "injected");
    let raw = String::from_utf8(patch_bytes(&response(&out))).unwrap();
    assert!(
        raw.contains("/metadata/labels/tailnode.dev~1node"),
        "the pod gets the node label: {raw}"
    );
    assert!(raw.contains("\"name\":\"tailscale\""), "{raw}");
    // Opted out by its own label: left alone.
    let mut out_pod = pod(None);
    out_pod["metadata"]["labels"] = json!({"tailnode.dev/inject": "false"});
    let (out, result) = review(&opted_in_state("web"), &request(out_pod, "CREATE", pod_kind()));
    assert_eq!(result, "skipped");
    assert!(response(&out).get("patch").is_none());
    // A namespace naming a node that does not exist: refused, saying how to get out.
    let (out, result) = review(&opted_in_state("gone"), &request(pod(None), "CREATE", pod_kind()));
    assert_eq!(result, "denied");
    let msg = response(&out)["status"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("namespace apps") && msg.contains("tailnode.dev/inject=false"),
        "{msg}"
    );
}

#[test]
fn protected_namespaces_are_never_opted_in_as_a_whole() {
    let mut s = opted_in_state("web");
    s.protected_namespaces = vec!["apps".into()];
    let (_, result) = review(&s, &request(pod(None), "CREATE", pod_kind()));
    assert_eq!(result, "skipped");
}
