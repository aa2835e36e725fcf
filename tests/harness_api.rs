//! Proof tests on the real kube-apiserver of the local harness: the CRD and its CEL rules, RBAC,
//! PodSecurity against injected pods, and `tailnode inject` output accepted by kubectl.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use support::*;
use tailnode::api::TailscaleNode;
use tailnode::inject::{ClusterFacts, Outcome, PodSecurityLevel, inject_pod};

fn tsn_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("tailnode.dev", "v1alpha1", "TailscaleNode"))
}

fn tsn(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

#[tokio::test]
async fn crd_applies_and_the_apiserver_enforces_every_cel_rule() {
    let h = harness();
    let client = h.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, "crd", json!({})).await;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &tsn_resource());

    let valid = json!({
        "mode": "auto", "hostname": "web", "tags": ["tag:k8s"],
        "credentials": {"headscale": {"url": "http://127.0.0.1:8080", "apiKeySecretName": "hs", "user": "1"}},
        "serve": [{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080", "funnel": true},
                  {"port": 5432, "protocol": "tcp", "target": "tcp://127.0.0.1:5432"}],
        "outbound": {"socks5Port": 1055, "exportEnv": true},
        "routes": {"advertise": ["10.0.0.0/24"]}
    });
    let stored = api.create(&PostParams::default(), &tsn("valid", valid)).await.unwrap();
    // Defaults are applied by the schema and the stored object reads back as our typed value.
    let typed: TailscaleNode = serde_json::from_value(serde_json::to_value(&stored).unwrap()).unwrap();
    assert_eq!(typed.spec.serve[0].port, 443);
    assert!(!typed.spec.ephemeral);

    let invalid = [
        (
            json!({"serve": [{"port": 9000, "protocol": "https", "target": "http://127.0.0.1:1", "funnel": true}]}),
            "funnel works only with protocol https on port 443, 8443 or 10000",
        ),
        (
            json!({"serve": [{"port": 443, "protocol": "http", "target": "http://127.0.0.1:1", "funnel": true}]}),
            "funnel works only with protocol https",
        ),
        (
            json!({"credentials": {"oauth": {"secretName": "o"}, "authKey": {"secretName": "k"}}}),
            "set exactly one of oauth, headscale or authKey",
        ),
        (json!({"hostname": "Bad_Name"}), "hostname must be a DNS label"),
        (json!({"tags": ["k8s"]}), "every tag must look like 'tag:<name>'"),
        (
            json!({"serve": [{"port": 80, "protocol": "http", "target": "http://127.0.0.1:1"},
                          {"port": 80, "protocol": "https", "target": "http://127.0.0.1:2"}]}),
            "serve ports must be unique",
        ),
        (
            json!({"serve": [{"port": 22, "protocol": "tcp", "target": "http://127.0.0.1:22"}]}),
            "target must be tcp://host:port",
        ),
        (
            json!({"serve": [{"port": 22, "protocol": "tcp", "target": "tcp://127.0.0.1:22", "path": "/"}]}),
            "path applies only to http and https",
        ),
        (
            json!({"serve": [{"port": 80, "protocol": "http", "target": "http://127.0.0.1:1", "path": "x"}]}),
            "path must start with '/'",
        ),
        (
            json!({"controlURL": "ftp://x"}),
            "controlURL must be an http:// or https:// URL",
        ),
        (
            json!({"credentials": {"headscale": {"url": "x", "apiKeySecretName": "k", "user": "1"}}}),
            "headscale.url must be an http:// or https:// URL",
        ),
        (
            json!({"outbound": {"exportEnv": true}}),
            "outbound: set socks5Port, httpProxyPort, or both",
        ),
        (
            json!({"routes": {"advertise": ["10.0.0.1"]}}),
            "routes.advertise entries must be CIDRs",
        ),
        (
            json!({"exitNode": {"advertise": true, "use": "100.64.0.1"}}),
            "cannot advertise itself as an exit node",
        ),
        (
            json!({"exitNode": {"use": "100.64.0.1"}, "routes": {"advertise": ["10.0.0.0/24"]}}),
            "cannot advertise routes at the same time",
        ),
        (json!({"mode": "kernel"}), "Unsupported value: \"kernel\""),
        (
            json!({"serve": [{"port": 70000, "protocol": "http", "target": "http://127.0.0.1:1"}]}),
            "less than or equal to 65535",
        ),
    ];
    for (i, (spec, message)) in invalid.into_iter().enumerate() {
        let err = api
            .create(&PostParams::default(), &tsn(&format!("bad-{i}"), spec.clone()))
            .await
            .expect_err(&format!("the apiserver accepted invalid spec {spec}"));
        let text = err.to_string();
        assert!(text.contains(message), "spec {spec}: expected {message:?} in {text}");
    }
    ns.cleanup().await;
}

fn restricted_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"tailnode.dev/node": "web"}},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "app", "image": "nginx",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]
        }
    }))
    .unwrap()
}

fn injected(pod: &Pod, spec: serde_json::Value, level: PodSecurityLevel) -> Pod {
    let node: TailscaleNode = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": spec})).unwrap();
    let facts = ClusterFacts {
        pod_security: level,
        ..ClusterFacts::default()
    };
    match inject_pod(pod, &node, &facts).unwrap() {
        Outcome::Injected { object, .. } => object,
        Outcome::Skipped(s) => panic!("not injected: {s:?}"),
        Outcome::Refreshed { .. } => panic!("refreshed, not injected"),
    }
}

#[tokio::test]
async fn pod_security_restricted_admits_userspace_and_refuses_tun() {
    let h = harness();
    let client = h.client().await;
    let labels = json!({"pod-security.kubernetes.io/enforce": "restricted"});
    let ns = TestNamespace::new(&client, "psa", labels).await;
    let pods: Api<Pod> = ns.api();

    let userspace = injected(
        &restricted_pod("userspace"),
        json!({"mode": "userspace"}),
        PodSecurityLevel::Restricted,
    );
    pods.create(&PostParams::default(), &userspace)
        .await
        .expect("the restricted namespace admits the userspace-injected pod");

    // The engine itself refuses TUN here; force it (as a privileged namespace would get) and
    // show the apiserver refusing NET_ADMIN.
    let tun = injected(
        &restricted_pod("tun"),
        json!({"mode": "tun"}),
        PodSecurityLevel::Privileged,
    );
    let err = pods
        .create(&PostParams::default(), &tun)
        .await
        .expect_err("NET_ADMIN must be refused");
    let text = err.to_string();
    assert!(text.contains("violates PodSecurity \"restricted"), "{text}");
    assert!(text.contains("NET_ADMIN"), "{text}");
    ns.cleanup().await;
}

#[tokio::test]
async fn rbac_limits_a_service_account_to_named_secrets() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "rbac", json!({})).await;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "pod-a"}})).unwrap();
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    for name in ["ts-a", "ts-b"] {
        let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
    }
    let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 600}});
    let tr: serde_json::Value = ns
        .api::<ServiceAccount>()
        .create_subresource("token", "pod-a", &PostParams::default(), &request)
        .await
        .expect("TokenRequest works");
    let token = tr["status"]["token"].as_str().unwrap().to_string();

    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&h.ca_pem()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let get = |secret: &'static str| {
        let url = format!("{}/api/v1/namespaces/{}/secrets/{secret}", h.apiserver_url(), ns.name);
        let req = http.get(url).bearer_auth(token.clone());
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get("ts-a").await, 403, "no Role yet");

    let role: Role = serde_json::from_value(json!({"metadata": {"name": "pod-a"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["ts-a"],
                   "verbs": ["get", "update", "patch"]}]}))
    .unwrap();
    ns.api::<Role>().create(&PostParams::default(), &role).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "pod-a"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-a"},
        "subjects": [{"kind": "ServiceAccount", "name": "pod-a", "namespace": ns.name}]}))
    .unwrap();
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let granted = eventually(Duration::from_secs(10), || async {
        (get("ts-a").await == 200).then_some(())
    })
    .await;
    assert!(granted.is_some(), "the Role never granted access to ts-a");
    assert_eq!(get("ts-b").await, 403, "resourceNames keeps other Secrets out of reach");
    ns.cleanup().await;
}

#[tokio::test]
async fn inject_output_is_accepted_by_kubectl_and_the_apiserver() {
    let h = harness();
    let client = h.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, "cli", json!({})).await;
    let fixture = repo_root().join("tests/fixtures/web.yaml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailnode"))
        .args(["inject", "-f", path_str(&fixture)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout)
        .unwrap()
        .replace("namespace: demo", &format!("namespace: {}", ns.name));
    assert_eq!(
        yaml.matches("name: tailscale\n").count(),
        2,
        "both workloads are injected:\n{yaml}"
    );
    for dry_run in ["--dry-run=client", "--dry-run=server"] {
        let (ok, stdout, stderr) = h.run("kubectl", &["apply", dry_run, "-f", "-"], Some(&yaml));
        assert!(
            ok,
            "kubectl apply {dry_run} refused the injected manifests:\n{stderr}\n{yaml}"
        );
        assert!(stdout.contains("deployment.apps/web created"), "{stdout}");
        assert!(stdout.contains("tailscalenode.tailnode.dev/web created"), "{stdout}");
    }

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_tailnode"))
        .args(["inject", "-f", "-"])
        .stdin(std::fs::File::open(repo_root().join("tests/fixtures/bad-node.yaml")).unwrap())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("document 1") && err.contains("spec.serve[0]") && err.contains("funnel"),
        "{err}"
    );
    ns.cleanup().await;
}
