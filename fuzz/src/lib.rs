//! What the fuzz targets share: realistic JSON bases (Pods, TailscaleNode specs, AdmissionReviews)
//! and a structured mutator that edits them with the fuzzer's bytes, so that most inputs are
//! well-formed enough to reach deep into the engine while still being hostile.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Value, json};

/// Strings that matter to tailnode: label and annotation keys, names, modes, levels, paths.
const WORDS: &[&str] = &[
    "",
    "web",
    "other",
    "apps",
    "tailscale",
    "app",
    "tailnode.dev/node",
    "tailnode.dev/injected",
    "tailnode.dev/mode",
    "tailnode.dev/spec",
    "tailnode.dev/inject",
    "team",
    "tailnode.dev/hostname",
    "tailnode.dev/credentials",
    "tailnode-state",
    "dev-net-tun",
    "kube-api-access",
    "auto",
    "tun",
    "userspace",
    "always",
    "never",
    "Always",
    "IfNotPresent",
    "privileged",
    "baseline",
    "restricted",
    "StatefulSet",
    "ReplicaSet",
    "Pod",
    "CREATE",
    "UPDATE",
    "https",
    "http",
    "tcp",
    "tag:k8s",
    "$(POD_NAME)",
    "$(TS_POD_INDEX)",
    "/dev/net/tun",
    "NET_ADMIN",
    "ALL",
    "RuntimeDefault",
    "http://127.0.0.1:8080",
    "10.0.0.0/8",
    "::/0",
    "/",
    "TS_HOSTNAME",
    "TS_AUTHKEY",
    "containers",
    "initContainers",
    "volumes",
    "env",
    "name",
    "image",
    "labels",
    "annotations",
    "restartPolicy",
    "securityContext",
    "hostNetwork",
    "nodeName",
    "schedulingGates",
    "ownerReferences",
    "automountServiceAccountToken",
    "serviceAccountName",
];

/// A word from [`WORDS`] or an arbitrary string.
pub fn word(u: &mut Unstructured) -> Result<String> {
    if u.ratio(3, 4)? {
        Ok((*u.choose(WORDS)?).to_string())
    } else {
        u.arbitrary()
    }
}

/// A scalar, biased to edge values.
fn scalar(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=7)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => json!(*u.choose(&[0i64, -1, 1, 443, 65535, 65536, i64::from(i32::MAX), i64::from(i32::MIN)])?),
        3 => json!(u.arbitrary::<i64>()?),
        4 => json!(u.arbitrary::<u64>()?),
        5 => json!(u.arbitrary::<f64>()?),
        _ => Value::String(word(u)?),
    })
}

/// Every subtree of `v` (at most `max`), to graft elsewhere.
fn subtrees<'a>(v: &'a Value, out: &mut Vec<&'a Value>, max: usize) {
    if out.len() >= max {
        return;
    }
    out.push(v);
    match v {
        Value::Object(m) => m.values().for_each(|c| subtrees(c, out, max)),
        Value::Array(a) => a.iter().for_each(|c| subtrees(c, out, max)),
        _ => {}
    }
}

/// One edit: walk down from `v` to a random node, then replace, remove, insert, duplicate or
/// graft there.
fn edit(u: &mut Unstructured, v: &mut Value, pool: &[&Value], depth: usize) -> Result<()> {
    if depth < 16 && u.ratio(4, 5)? {
        match v {
            Value::Object(m) if !m.is_empty() => {
                let i = u.choose_index(m.len())?;
                let Some(key) = m.keys().nth(i).cloned() else {
                    return Ok(());
                };
                if u.ratio(1, 8)? {
                    m.remove(&key);
                    return Ok(());
                }
                if let Some(child) = m.get_mut(&key) {
                    return edit(u, child, pool, depth + 1);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let i = u.choose_index(a.len())?;
                match u.int_in_range(0..=7)? {
                    0 => {
                        a.remove(i);
                        return Ok(());
                    }
                    1 => {
                        let copy = a[i].clone();
                        a.insert(i, copy);
                        return Ok(());
                    }
                    _ => return edit(u, &mut a[i], pool, depth + 1),
                }
            }
            _ => {}
        }
    }
    match u.int_in_range(0..=6)? {
        0 | 1 => *v = scalar(u)?,
        2 => match v {
            Value::Object(m) => {
                let value = if u.arbitrary()? { scalar(u)? } else { graft(u, pool)? };
                m.insert(word(u)?, value);
            }
            Value::Array(a) => a.push(graft(u, pool)?),
            _ => *v = Value::Object(Map::new()),
        },
        3 => {
            *v = if u.arbitrary()? {
                Value::Array(Vec::new())
            } else {
                Value::Object(Map::new())
            }
        }
        _ => *v = graft(u, pool)?,
    }
    Ok(())
}

fn graft(u: &mut Unstructured, pool: &[&Value]) -> Result<Value> {
    if pool.is_empty() {
        return scalar(u);
    }
    Ok((*u.choose(pool)?).clone())
}

/// `base` with up to 8 structured edits; grafts come from `base`'s subtrees.
pub fn mutated(u: &mut Unstructured, base: &Value) -> Result<Value> {
    let mut pool = Vec::new();
    subtrees(base, &mut pool, 256);
    let mut v = base.clone();
    for _ in 0..u.int_in_range(0..=8)? {
        edit(u, &mut v, &pool, 0)?;
    }
    Ok(v)
}

/// Picks one of `bases` and edits it (`mutate` false: leaves it as it is).
pub fn pick(u: &mut Unstructured, bases: &[Value], mutate: bool) -> Result<(usize, Value)> {
    let i = u.choose_index(bases.len())?;
    let v = if mutate {
        mutated(u, &bases[i])?
    } else {
        bases[i].clone()
    };
    Ok((i, v))
}

/// Realistic TailscaleNode specs.
pub fn node_specs() -> Vec<Value> {
    vec![
        json!({"mode": "auto"}),
        json!({
            "mode": "userspace", "hostname": "web", "tags": ["tag:k8s", "tag:web"], "ephemeral": true,
            "credentials": {"headscale": {"url": "http://127.0.0.1:8080", "apiKeySecretName": "headscale-api", "user": "1"}},
            "controlURL": "http://127.0.0.1:8080",
            "serve": [
                {"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080", "path": "/api", "funnel": true},
                {"port": 5432, "protocol": "tcp", "target": "tcp://127.0.0.1:5432"}
            ],
            "outbound": {"socks5Port": 1055, "httpProxyPort": 1056, "exportEnv": true, "noProxy": ["localhost", ".svc"]},
            "dns": {"magicDNS": true},
            "sidecar": {
                "image": "tailscale/tailscale:v1.102.5", "imagePullPolicy": "IfNotPresent", "nativeSidecar": "always",
                "env": [{"name": "TS_DEBUG_FIREWALL_MODE", "value": "auto"}], "healthPort": 9002,
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}
            }
        }),
        json!({
            "mode": "tun", "hostname": "router", "tags": ["tag:router"],
            "credentials": {"oauth": {"secretName": "ts-oauth", "tailnet": "example.com"}},
            "routes": {"advertise": ["10.0.0.0/8", "fd7a:115c:a1e0::/48"], "accept": true},
            "exitNode": {"advertise": true},
            "dns": {"magicDNS": true},
            "sidecar": {"nativeSidecar": "never", "privileged": true}
        }),
        json!({
            "mode": "auto",
            "credentials": {"authKey": {"secretName": "ts-key", "key": "authkey"}},
            "exitNode": {"use": "100.64.0.1"},
            "serve": [{"port": 80, "protocol": "http", "target": "http://127.0.0.1:3000"}]
        }),
    ]
}

/// Realistic pods that opt into the TailscaleNode `web`.
pub fn pods() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "namespace": "apps", "labels": {"tailnode.dev/node": "web"}},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]}}),
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "api-0", "namespace": "apps",
            "labels": {"app": "api", "tailnode.dev/node": "web"},
            "annotations": {"tailnode.dev/hostname": "api"}},
        "spec": {
            "automountServiceAccountToken": false, "serviceAccountName": "api",
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "migrate", "image": "api:1", "command": ["/migrate"]}],
            "containers": [{"name": "api", "image": "api:1",
                "ports": [{"containerPort": 8080, "name": "http"}],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }}),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "db-1", "namespace": "apps", "labels": {"tailnode.dev/node": "web"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                    "uid": "0c1b0a63-7d4f-4a8e-9a57-3f8f1d1e2b4c", "controller": true}]},
            "spec": {"containers": [{"name": "db", "image": "postgres:17"}],
                "restartPolicy": "Always", "hostname": "db-1", "subdomain": "db"}}),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "bound", "namespace": "apps", "labels": {"tailnode.dev/node": "web"},
                "annotations": {"note": "x"}},
            "spec": {"nodeName": "node-1", "schedulingGates": [{"name": "example.com/wait"}],
                "containers": [{"name": "a", "image": "busybox", "args": ["sleep", "1d"]},
                    {"name": "b", "image": "busybox", "resources": {"limits": {"cpu": "1"}}}]}}),
    ]
}

/// An AdmissionReview that asks to admit `object`.
pub fn admission_review(object: Value, operation: &str, kind: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps", "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": object, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// A TailscaleNode `name` in namespace `apps` with this spec.
pub fn node(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": name, "namespace": "apps", "uid": "3b1f6a0e-4c1d-4e55-8f1e-2d7c9b0a6e11"},
        "spec": spec})
}

/// The webhook's view of the cluster: TailscaleNodes `web` (full spec), `tun` and `plain` in
/// namespace `apps` (no PodSecurity label) and `locked` (restricted); `web` takes `web_spec`.
pub fn webhook_state(
    web_spec: Value,
    metrics: std::sync::Arc<tailnode::metrics::Metrics>,
) -> tailnode::webhook::WebhookState {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;
    use tailnode::api::TailscaleNode;

    let specs = node_specs();
    let mut nodes = Writer::<TailscaleNode>::default();
    for ns in ["apps", "locked", "team"] {
        let mut named = vec![
            ("web", web_spec.clone()),
            ("tun", specs[2].clone()),
            ("plain", specs[0].clone()),
        ];
        for (name, spec) in named.drain(..) {
            let mut v = node(name, spec);
            v["metadata"]["namespace"] = json!(ns);
            // A spec the fuzzer broke beyond the types is what the apiserver would refuse.
            if let Ok(n) = serde_json::from_value::<TailscaleNode>(v) {
                nodes.apply_watcher_event(&Event::Apply(n));
            }
        }
    }
    let mut namespaces = Writer::<Namespace>::default();
    for (name, level) in [
        ("apps", None),
        ("locked", Some("restricted")),
        ("base", Some("baseline")),
        ("team", None),
    ] {
        let mut labels = level.map_or(json!({}), |l| json!({"pod-security.kubernetes.io/enforce": l}));
        if name == "team" {
            // Opted in as a whole.
            labels["tailnode.dev/node"] = json!("web");
        }
        if let Ok(ns) = serde_json::from_value::<Namespace>(json!({"metadata": {"name": name, "labels": labels}})) {
            namespaces.apply_watcher_event(&Event::Apply(ns));
        }
    }
    tailnode::webhook::WebhookState {
        nodes: nodes.as_reader(),
        namespaces: namespaces.as_reader(),
        native_sidecars: true,
        defaults: tailnode::inject::OperatorDefaults::default(),
        api_server_host: None,
        metrics,
        protected_namespaces: vec!["kube-system".into(), "tailnode-system".into()],
    }
}

/// What the webhook must always do: answer with an AdmissionReview that carries a response
/// (with the request's uid when there was one) and serialises, under a bounded label.
pub fn check_review(body: &[u8], state: &tailnode::webhook::WebhookState) {
    let (out, label) = tailnode::webhook::review(state, body);
    assert!(
        matches!(label, "injected" | "refreshed" | "skipped" | "denied" | "error"),
        "label {label}"
    );
    let Some(response) = out.response.as_ref() else {
        panic!("review without a response")
    };
    if label == "injected" {
        assert!(response.allowed && response.patch.is_some(), "injected without a patch");
    }
    let sent: Option<String> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/request/uid").and_then(Value::as_str).map(str::to_string));
    if let (Some(sent), "injected" | "skipped" | "denied") = (sent, label) {
        assert_eq!(response.uid, sent, "response uid");
    }
    assert!(serde_json::to_vec(&out).is_ok(), "the review does not serialise");
}
