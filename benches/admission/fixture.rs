//! The fixed request of the admission benchmark: a Deployment's Pod as the apiserver sends it to a
//! mutating webhook (after the built-in admission plugins: the service-account token volume and
//! the default tolerations are in), and the webhook's state (a TailscaleNode, a namespace that
//! enforces PodSecurity `restricted`).

use std::sync::Arc;

use axum::body::Bytes;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};
use tailnode::api::TailscaleNode;
use tailnode::inject::OperatorDefaults;
use tailnode::metrics::Metrics;
use tailnode::webhook::WebhookState;

/// The uid of the template; every request overwrites it with its own of the same length.
const UID_TEMPLATE: &str = "00000000-0000-4000-8000-000000000000";

/// The webhook's caches: one TailscaleNode `apps/web`, the namespace `apps` (restricted).
pub fn state() -> WebhookState {
    let mut nodes = Writer::<TailscaleNode>::default();
    let node: TailscaleNode = serde_json::from_value(json!({
        "apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"mode": "auto", "tags": ["tag:k8s"], "serve": [{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080"}],
                 "outbound": {"socks5Port": 1055, "exportEnv": true}}
    }))
    .expect("the TailscaleNode fixture parses");
    nodes.apply_watcher_event(&Event::Apply(node));
    let mut namespaces = Writer::<Namespace>::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "apps",
        "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}))
    .expect("the Namespace fixture parses");
    namespaces.apply_watcher_event(&Event::Apply(ns));
    WebhookState {
        nodes: nodes.as_reader(),
        namespaces: namespaces.as_reader(),
        native_sidecars: true,
        defaults: OperatorDefaults::default(),
        api_server_host: None,
        metrics: Arc::new(Metrics::default()),
        protected_namespaces: vec!["kube-system".into()],
    }
}

fn container(name: &str, image: &str, port: u16, extra_env: Value) -> Value {
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}),
        json!({"name": "LOG_LEVEL", "value": "info"}),
    ];
    env.extend(extra_env.as_array().cloned().unwrap_or_default());
    json!({
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": port, "scheme": "HTTP"},
            "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": port, "scheme": "HTTP"},
            "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/web", "readOnly": true},
            {"name": "cache", "mountPath": "/var/cache/web"},
            {"name": "kube-api-access-7xk2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}
        ],
        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}},
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"
    })
}

/// A Deployment's Pod: three containers and an init container, env, probes, resources, volumes,
/// labels, annotations, an owner reference and the controller-manager's managed fields.
pub fn pod() -> Value {
    let hash = "7d9f8c6b5d";
    let app = container(
        "web",
        "registry.example.com/shop/web:1.27.3",
        8080,
        json!([
            {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "web-db", "key": "url"}}},
            {"name": "CACHE_DIR", "value": "/var/cache/web"},
            {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"containerName": "web", "resource": "limits.cpu", "divisor": "1"}}}
        ]),
    );
    let exporter = container("metrics", "registry.example.com/ops/exporter:0.15.0", 9113, json!([]));
    let shipper = container(
        "logs",
        "registry.example.com/ops/fluent-bit:3.1.4",
        2020,
        json!([{"name": "FLUENT_HOST", "value": "logs.observability.svc"}]),
    );
    let mut migrate = container(
        "migrate",
        "registry.example.com/shop/web:1.27.3",
        8081,
        json!([{"name": "MODE", "value": "migrate"}]),
    );
    if let Some(init) = migrate.as_object_mut() {
        for probe in ["livenessProbe", "readinessProbe", "ports"] {
            init.remove(probe);
        }
        init.insert("command".into(), json!(["/app/web", "migrate", "--wait"]));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": format!("web-{hash}-"), "namespace": "apps",
            "labels": {"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": "web-prod",
                "app.kubernetes.io/version": "1.27.3", "app.kubernetes.io/component": "frontend",
                "pod-template-hash": hash, "tailnode.dev/node": "web"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9113",
                "kubectl.kubernetes.io/restartedAt": "2025-01-14T09:12:44Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("web-{hash}"),
                "uid": "3f1c2a9e-5b7d-4c1e-9a0f-6d2e8b4c7a11", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2025-01-14T09:12:45Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app.kubernetes.io/name": {},
                    "f:pod-template-hash": {}, "f:tailnode.dev/node": {}}, "f:ownerReferences": {".": {},
                    "k:{\"uid\":\"3f1c2a9e-5b7d-4c1e-9a0f-6d2e8b4c7a11\"}": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:env": {}, "f:image": {}, "f:livenessProbe": {},
                        "f:ports": {}, "f:readinessProbe": {}, "f:resources": {}, "f:volumeMounts": {}},
                        "k:{\"name\":\"metrics\"}": {".": {}, "f:image": {}}, "k:{\"name\":\"logs\"}": {".": {}, "f:image": {}}},
                        "f:securityContext": {}, "f:volumes": {}}}}]
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config", "defaultMode": 420}},
                {"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
                {"name": "kube-api-access-7xk2p", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ]}}
            ],
            "initContainers": [migrate],
            "containers": [app, exporter, shipper],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web", "serviceAccount": "web", "enableServiceLinks": true,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}},
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100,
                "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "web"}}}}]}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "web"}}}],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "schedulerName": "default-scheduler", "priority": 0, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {"phase": "Pending", "qosClass": "Burstable"}
    })
}

/// The AdmissionReview the apiserver sends for the Pod's CREATE by the ReplicaSet controller, as
/// bytes; [`Review::body`] gives each request its own uid.
pub struct Review {
    template: Vec<u8>,
    uid_at: usize,
    /// Bytes of the Pod alone.
    pub pod_bytes: usize,
}

impl Review {
    pub fn new() -> Review {
        let pod = pod();
        let pod_bytes = serde_json::to_vec(&pod).expect("the pod serialises").len();
        let kind = json!({"group": "", "version": "v1", "kind": "Pod"});
        let resource = json!({"group": "", "version": "v1", "resource": "pods"});
        let template = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": UID_TEMPLATE, "kind": kind, "resource": resource, "requestKind": kind, "requestResource": resource,
                "namespace": "apps", "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                    "uid": "8d3e5f0a-1c2b-4e6d-9f7a-0b1c2d3e4f5a",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
                "object": pod, "oldObject": null, "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        }))
        .expect("the review serialises");
        let uid_at = template
            .windows(UID_TEMPLATE.len())
            .position(|w| w == UID_TEMPLATE.as_bytes())
            .expect("the template holds its uid");
        Review {
            template,
            uid_at,
            pod_bytes,
        }
    }

    /// Bytes of the whole AdmissionReview.
    pub fn review_bytes(&self) -> usize {
        self.template.len()
    }

    /// The uid of request `i`.
    pub fn uid(i: u64) -> String {
        format!("00000000-0000-4000-8000-{:012}", i % 1_000_000_000_000)
    }

    /// The body of request `i`, with [`Review::uid`] of `i`.
    pub fn body(&self, i: u64) -> Bytes {
        let mut body = self.template.clone();
        body[self.uid_at..self.uid_at + UID_TEMPLATE.len()].copy_from_slice(Self::uid(i).as_bytes());
        Bytes::from(body)
    }
}
