//! Lifecycle on the real apiserver with the operator in-process and the contract fake of the
//! Tailscale API: the credentials scheduling gate, and Secrets tailnode does not own. The pods
//! here are never run (a nodeSelector no node matches): what matters is what the apiserver
//! stores. Real pods on the real node are in tests/e2e.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Secret};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use support::operator::operator;
use support::*;
use tailnode::api::{CREDENTIALS_GATE, TailscaleNode};
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale};

const WAIT: Duration = Duration::from_secs(60);

async fn setup(prefix: &str) -> (TestNamespace, FakeTailscale) {
    let h = harness();
    let op = operator();
    let client = h.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, prefix, json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    let fake = FakeTailscale::start(FakeConfig {
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        client_tags: vec!["tag:k8s".into()],
    })
    .await;
    create(
        &ns,
        json!({"metadata": {"name": "oauth"},
        "stringData": {"client_id": "cid", "client_secret": "csecret"}}),
    )
    .await;
    (ns, fake)
}

async fn create(ns: &TestNamespace, secret: Value) {
    let s: Secret = serde_json::from_value(secret).unwrap();
    ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
}

async fn node(ns: &TestNamespace, name: &str, secret: &str, fake: &FakeTailscale) {
    let n: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": name},
        "spec": {"tags": ["tag:k8s"], "credentials": {"oauth": {"secretName": secret, "apiURL": fake.url()}}}}))
    .unwrap();
    ns.api::<TailscaleNode>()
        .create(&PostParams::default(), &n)
        .await
        .unwrap();
}

async fn pod(ns: &TestNamespace, name: &str, node: &str) -> Pod {
    let p: Pod = serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"tailnode.dev/node": node}},
        "spec": {"nodeSelector": {"tailnode.dev/test": "never-scheduled"},
                 "containers": [{"name": "app", "image": "nginx"}]}}),
    )
    .unwrap();
    // The webhook's cache learns of a new TailscaleNode within moments; until then it refuses.
    let api = ns.api::<Pod>();
    let last = std::sync::Mutex::new(String::new());
    let admitted = eventually(WAIT, || async {
        match api.create(&PostParams::default(), &p).await {
            Ok(p) => Some(p),
            Err(e) => {
                *last.lock().unwrap() = e.to_string();
                None
            }
        }
    })
    .await;
    admitted.unwrap_or_else(|| panic!("pod {name} was never admitted: {}", last.lock().unwrap()))
}

fn gated(p: &Pod) -> bool {
    tailnode::inject::is_gated(p.spec.as_ref())
}

async fn role_names(ns: &TestNamespace, node: &str) -> Vec<String> {
    let role = ns.api::<Role>().get_opt(&format!("tsn-{node}")).await.unwrap();
    role.and_then(|r| r.rules)
        .into_iter()
        .flatten()
        .filter(|r| r.resources.as_ref().is_some_and(|x| x.contains(&"secrets".to_string())))
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect()
}

/// The webhook gates the pod; the gate opens only once its Secret holds a key and the Role names
/// it. With broken credentials it stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_opens_once_the_key_and_the_grant_are_in_place() {
    let (ns, fake) = setup("gate").await;
    node(&ns, "web", "oauth", &fake).await;
    let created = pod(&ns, "web-1", "web").await;
    assert!(
        gated(&created),
        "the webhook adds the {CREDENTIALS_GATE} gate at CREATE"
    );
    let api = ns.api::<Pod>();
    let opened = eventually(WAIT, || async { api.get("web-1").await.ok().filter(|p| !gated(p)) }).await;
    assert!(opened.is_some(), "the gate never opened");
    let s = ns.api::<Secret>().get("ts-web-1").await.unwrap();
    assert!(
        data(&s, "authkey").is_some(),
        "the gate opened before the key was there"
    );
    assert!(role_names(&ns, "web").await.contains(&"ts-web-1".to_string()));

    // Broken credentials: the node reports them, and its pod stays gated.
    node(&ns, "broken", "missing-secret", &fake).await;
    pod(&ns, "broken-1", "broken").await;
    let reported = eventually(WAIT, || async {
        let c = ns.node_condition("broken", "CredentialsValid").await?;
        (c["status"] == "False").then_some(c)
    })
    .await;
    assert!(reported.is_some(), "CredentialsValid=False never reported");
    assert!(
        gated(&api.get("broken-1").await.unwrap()),
        "a pod without a key was released"
    );
    ns.cleanup().await;
}

/// A Secret named like a replica's state Secret that tailnode did not make is never adopted: the
/// replica is Failed, a condition and an Event name the Secret, the Role never lists it, no key
/// is written into it, and the pod stays gated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_secret_is_never_adopted() {
    let (ns, fake) = setup("foreign").await;
    create(
        &ns,
        json!({"metadata": {"name": "ts-victim"}, "stringData": {"password": "hunter2"}}),
    )
    .await;
    node(&ns, "web", "oauth", &fake).await;
    pod(&ns, "victim", "web").await;
    let degraded = eventually(WAIT, || async {
        let c = ns.node_condition("web", "Degraded").await?;
        (c["reason"] == "SecretConflict").then_some(c)
    })
    .await
    .expect("Degraded=SecretConflict");
    assert!(
        degraded["message"].as_str().unwrap().contains("ts-victim"),
        "{degraded}"
    );
    let n = ns.api::<TailscaleNode>().get("web").await.unwrap();
    let st = serde_json::to_value(n.status.unwrap()).unwrap();
    assert_eq!(st["replicas"][0]["state"], "Failed", "{st}");
    let events = ns.api::<CoreEvent>().list(&ListParams::default()).await.unwrap().items;
    assert!(
        events.iter().any(|e| e.reason.as_deref() == Some("SecretConflict")
            && e.message.as_deref().is_some_and(|m| m.contains("ts-victim"))),
        "no SecretConflict Event"
    );
    assert!(
        !role_names(&ns, "web").await.contains(&"ts-victim".to_string()),
        "the Role grants it"
    );
    let s = ns.api::<Secret>().get("ts-victim").await.unwrap();
    assert_eq!(data(&s, "password").as_deref(), Some("hunter2"));
    assert!(data(&s, "authkey").is_none(), "a key was written into a foreign Secret");
    assert_eq!(fake.ledger().mints.len(), 0, "a key was minted for it");
    assert!(
        gated(&ns.api::<Pod>().get("victim").await.unwrap()),
        "its pod was released"
    );
    ns.cleanup().await;
}

/// The chart's ValidatingAdmissionPolicy: the operator's ServiceAccount may remove its own gate
/// from a pod and nothing else (not an image, a label, another gate); others are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_may_only_open_its_own_gate() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "podpolicy", json!({})).await;
    let release = unique("vap");
    // The chart's policy, for a ServiceAccount of this test's namespace.
    let (ok, rendered, err) = h.run(
        "helm",
        &[
            "template",
            &release,
            path_str(&repo_root().join("charts/tailnode")),
            "--namespace",
            &ns.name,
            "--show-only",
            "templates/podupdatepolicy.yaml",
        ],
        None,
    );
    assert!(ok, "helm template: {err}");
    let (ok, _, err) = h.run("kubectl", &["apply", "-f", "-"], Some(&rendered));
    assert!(ok, "apply the policy: {err}");
    let sa = if release.contains("tailnode") {
        release.clone()
    } else {
        format!("{release}-tailnode")
    };
    let setup = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: patch-pods, namespace: {ns}}}\n\
         rules: [{{apiGroups: [''], resources: [pods], verbs: [get, patch]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: patch-pods, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: patch-pods}}\n\
         subjects: [{{kind: ServiceAccount, name: {sa}, namespace: {ns}}}]\n",
        ns = ns.name
    );
    let (ok, _, err) = h.run("kubectl", &["apply", "-f", "-"], Some(&setup));
    assert!(ok, "{err}");
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "gated", "labels": {"app": "x"}},
        "spec": {"schedulingGates": [{"name": "example.com/other"}, {"name": CREDENTIALS_GATE}],
                 "containers": [{"name": "app", "image": "nginx"}]}}))
    .unwrap();
    ns.api::<Pod>().create(&PostParams::default(), &p).await.unwrap();
    let (_, token, err) = h.run("kubectl", &["create", "token", &sa, "-n", &ns.name], None);
    assert!(!token.trim().is_empty(), "token: {err}");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&h.ca_pem()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("{}/api/v1/namespaces/{}/pods/gated", h.apiserver_url(), ns.name);
    // Refusals are probed with dry runs (admission runs, nothing is stored): a patch let through
    // before the policy is active must not change what the next probe compares against.
    let patch = |body: Value, dry: bool| {
        let url = if dry { format!("{url}?dryRun=All") } else { url.clone() };
        let req = http
            .patch(url)
            .bearer_auth(token.trim())
            .header("content-type", "application/json-patch+json")
            .body(body.to_string());
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let image = json!([{"op": "replace", "path": "/spec/containers/0/image", "value": "evil"}]);
    // The apiserver picks up a new policy within moments.
    let denied = eventually(WAIT, || async {
        let (code, text) = patch(image.clone(), true).await;
        (code >= 400 && text.contains("tailnode may not change a pod's containers")).then_some(())
    })
    .await;
    assert!(denied.is_some(), "an image change by the operator was not refused");
    for (body, why) in [
        (
            json!([{"op": "add", "path": "/metadata/labels/extra", "value": "y"}]),
            "labels",
        ),
        (
            json!([{"op": "remove", "path": "/spec/schedulingGates/0"}]),
            "its own scheduling gate",
        ),
        (
            json!([{"op": "add", "path": "/metadata/annotations", "value": {"other.io/x": "1"}}]),
            "tailnode.dev/ annotations",
        ),
    ] {
        let (code, text) = patch(body.clone(), true).await;
        assert!(
            code >= 400 && text.contains(why),
            "{body} was not refused: {code} {text}"
        );
    }
    let (code, text) = patch(
        json!([
            {"op": "test", "path": "/spec/schedulingGates/1/name", "value": CREDENTIALS_GATE},
            {"op": "remove", "path": "/spec/schedulingGates/1"},
            {"op": "add", "path": "/metadata/annotations", "value": {"tailnode.dev/note": "ok"}}
        ]),
        false,
    )
    .await;
    assert_eq!(code, 200, "removing its own gate was refused: {text}");
    let now = ns.api::<Pod>().get("gated").await.unwrap();
    let gates: Vec<String> = now
        .spec
        .unwrap()
        .scheduling_gates
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(gates, vec!["example.com/other".to_string()]);
    // Anyone else is not bound by it.
    let (ok, _, err) = h.run("kubectl", &["label", "pod", "gated", "-n", &ns.name, "extra=y"], None);
    assert!(ok, "the admin's label change was refused: {err}");
    let name = format!("{sa}-pod-updates");
    let _ = h.run(
        "kubectl",
        &[
            "delete",
            "validatingadmissionpolicybinding,validatingadmissionpolicy",
            &name,
            "--wait=false",
        ],
        None,
    );
    ns.cleanup().await;
}

/// A spec change reaches a sidecar only through a new pod: the status names the pods injected
/// from the older spec (`RestartNeeded`), and a pod created after the change is not named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_from_an_older_spec_are_named_in_restart_needed() {
    let (ns, fake) = setup("restart").await;
    node(&ns, "web", "oauth", &fake).await;
    let old = pod(&ns, "old", "web").await;
    let recorded = old
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("tailnode.dev/spec"));
    assert!(recorded.is_some(), "the webhook did not record the spec hash");
    let up_to_date = eventually(WAIT, || async {
        let c = ns.node_condition("web", "RestartNeeded").await?;
        (c["status"] == "False").then_some(c)
    })
    .await;
    assert!(up_to_date.is_some(), "RestartNeeded=False never reported");

    let change = json!({"spec": {"hostname": "renamed"}});
    ns.api::<TailscaleNode>()
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&change),
        )
        .await
        .unwrap();
    let stale = eventually(WAIT, || async {
        let c = ns.node_condition("web", "RestartNeeded").await?;
        (c["status"] == "True").then_some(c)
    })
    .await
    .expect("RestartNeeded=True never reported after the spec changed");
    assert_eq!(stale["reason"], "SpecChanged");
    let message = stale["message"].as_str().unwrap();
    assert!(
        message.starts_with("1 pod(s)") && message.ends_with(": old"),
        "{message}"
    );

    // A pod admitted after the change carries the new hash and is not named.
    let new = eventually(WAIT, || async {
        let p = pod(&ns, &format!("new-{}", unique("p")), "web").await;
        let h = p.metadata.annotations.as_ref()?.get("tailnode.dev/spec")?.clone();
        (Some(&h) != recorded).then_some(p)
    })
    .await
    .expect("the webhook never saw the new spec");
    // Pods admitted while the webhook's cache still had the old spec are stale too.
    let pods = ns.api::<Pod>().list(&ListParams::default()).await.unwrap().items;
    let stale = pods
        .iter()
        .filter(|p| p.metadata.annotations.as_ref().and_then(|a| a.get("tailnode.dev/spec")) == recorded)
        .count();
    let named = eventually(WAIT, || async {
        let c = ns.node_condition("web", "RestartNeeded").await?;
        let m = c["message"].as_str()?.to_string();
        m.starts_with(&format!("{stale} pod(s)")).then_some(m)
    })
    .await;
    let m = named.expect("RestartNeeded does not count the stale pods");
    assert!(!m.contains(new.metadata.name.as_deref().unwrap()), "{m}");
    ns.cleanup().await;
}
