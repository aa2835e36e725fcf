//! The operator against the real harness (kube-apiserver + controller-manager + Headscale), with
//! the contract fake of the Tailscale API: injection, per-replica Secrets and keys, RBAC, status,
//! device cleanup, failure handling, and the webhook's edges.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Secret};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::operator::{Operator, metrics, operator};
use support::*;
use tailnode::api::TailscaleNode;
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale, Scripted};

const WAIT: Duration = Duration::from_secs(60);

struct Env {
    client: Client,
    ns: TestNamespace,
    op: &'static Operator,
}

async fn env(prefix: &str) -> Env {
    let h = harness();
    let op = operator();
    let client = h.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, prefix, json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    Env { client, ns, op }
}

async fn fake(tags: &[&str]) -> FakeTailscale {
    FakeTailscale::start(FakeConfig {
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        client_tags: tags.iter().map(|t| t.to_string()).collect(),
    })
    .await
}

async fn oauth_secret(e: &Env, name: &str) {
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": name},
        "stringData": {"client_id": "cid", "client_secret": "csecret"}}))
    .unwrap();
    e.ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
}

async fn node(e: &Env, name: &str, spec: Value) {
    let n: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": name}, "spec": spec}))
    .unwrap();
    e.ns.api::<TailscaleNode>()
        .create(&PostParams::default(), &n)
        .await
        .unwrap();
}

fn oauth_spec(fake: &FakeTailscale, secret: &str) -> Value {
    json!({"tags": ["tag:k8s"], "credentials": {"oauth": {"secretName": secret, "apiURL": fake.url()}}})
}

async fn deployment(e: &Env, name: &str, node: &str, replicas: i32) {
    let d: Deployment = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
        "replicas": replicas, "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name, "tailnode.dev/node": node}},
                     "spec": {"containers": [{"name": "app", "image": "nginx"}]}}}}))
    .unwrap();
    e.ns.api::<Deployment>()
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
}

async fn pods_of(e: &Env, app: &str) -> Vec<Pod> {
    let lp = ListParams::default().labels(&format!("app={app}"));
    let mut pods: Vec<Pod> = e.ns.api::<Pod>().list(&lp).await.unwrap().items;
    pods.retain(|p| p.metadata.deletion_timestamp.is_none());
    pods.sort_by_key(|p| p.name_any());
    pods
}

async fn secret_with_key(e: &Env, name: &str) -> Secret {
    let api = e.ns.api::<Secret>();
    eventually(WAIT, || async {
        api.get_opt(name)
            .await
            .ok()
            .flatten()
            .filter(|s| data(s, "authkey").is_some())
    })
    .await
    .unwrap_or_else(|| panic!("Secret {name} never held a key"))
}

/// Plays containerboot's part after login: device keys in, auth key out.
async fn register(e: &Env, secret: &str, device: &str, fake: Option<&FakeTailscale>) {
    if let Some(f) = fake {
        f.add_device(device);
    }
    let patch = json!({"data": {"authkey": null}, "stringData": {"device_id": device,
        "device_fqdn": format!("{device}.tailnet.test."), "device_ips": "[\"100.64.0.7\"]"}});
    e.ns.api::<Secret>()
        .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn status(e: &Env, name: &str) -> Value {
    serde_json::to_value(e.ns.api::<TailscaleNode>().get(name).await.unwrap()).unwrap()["status"].clone()
}

async fn condition(e: &Env, name: &str, type_: &str) -> Option<(String, String)> {
    let st = status(e, name).await;
    let c = st["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((c["status"].as_str()?.to_string(), c["reason"].as_str()?.to_string()))
}

async fn wait_condition(e: &Env, name: &str, type_: &str, want: (&str, &str)) {
    let got = eventually(WAIT, || async {
        let c = condition(e, name, type_).await?;
        (c.0 == want.0 && c.1 == want.1).then_some(())
    })
    .await;
    assert!(
        got.is_some(),
        "{type_} never became {want:?}; status: {}",
        status(e, name).await
    );
}

async fn events(e: &Env, reason: &str) -> Vec<String> {
    let evs =
        e.ns.api::<CoreEvent>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
    let mut out: Vec<String> = evs
        .into_iter()
        .filter(|ev| ev.reason.as_deref() == Some(reason))
        .filter_map(|ev| ev.message)
        .collect();
    let new = Api::<k8s_openapi::api::events::v1::Event>::namespaced(e.client.clone(), &e.ns.name)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    out.extend(
        new.into_iter()
            .filter(|ev| ev.reason.as_deref() == Some(reason))
            .filter_map(|ev| ev.note),
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_replicas_get_sidecars_keys_rbac_status_and_cleanup() {
    let e = env("deploy").await;
    let f = fake(&["tag:k8s"]).await;
    oauth_secret(&e, "oauth").await;
    node(&e, "web", oauth_spec(&f, "oauth")).await;
    deployment(&e, "web", "web", 2).await;

    let pods = eventually(WAIT, || async {
        Some(pods_of(&e, "web").await).filter(|p| p.len() == 2)
    })
    .await
    .expect("2 pods");
    assert!(pods.iter().all(has_sidecar), "every pod carries the sidecar");
    let names: Vec<String> = pods.iter().map(|p| format!("ts-{}", p.name_any())).collect();
    for n in &names {
        let s = secret_with_key(&e, n).await;
        assert!(data(&s, "authkey").unwrap().starts_with("tskey-auth-"));
        assert_eq!(s.finalizers(), ["tailnode.dev/device-cleanup"]);
    }
    let ledger = f.ledger();
    assert_eq!(ledger.mints.len(), 2, "one key per replica");
    assert!(
        ledger
            .mints
            .iter()
            .all(|m| m.tags == ["tag:k8s"] && !m.reusable && m.preauthorized)
    );
    assert_eq!(ledger.tokens_issued, 1, "one OAuth token for both mints");

    let role = eventually(WAIT, || async {
        let r = e.ns.api::<Role>().get_opt("tsn-web").await.ok().flatten()?;
        let rule = r
            .rules
            .clone()?
            .into_iter()
            .find(|r| r.resources == Some(vec!["secrets".into()]))?;
        let got: BTreeSet<String> = rule.resource_names.clone()?.into_iter().collect();
        (got == names.iter().cloned().collect()).then_some(rule)
    })
    .await
    .expect("the Role names exactly the replicas' Secrets");
    assert_eq!(role.verbs, ["get", "update", "patch"]);

    // Pod 0 registers; its status fills in.
    register(&e, &names[0], "dev-a", Some(&f)).await;
    let st = eventually(WAIT, || async {
        let st = status(&e, "web").await;
        (st["readyReplicas"] == 1 && st["totalReplicas"] == 2).then_some(st)
    })
    .await
    .expect("status counts the registered replica");
    let reg = st["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["state"] == "Registered")
        .unwrap();
    assert_eq!(reg["ips"], json!(["100.64.0.7"]));
    assert_eq!(reg["hostname"], "dev-a");
    let authkey_gone = e.ns.api::<Secret>().get(&names[0]).await.unwrap();
    assert!(data(&authkey_gone, "authkey").is_none());

    // A reconcile with nothing to do for the keys (a spec change that only a new pod would see)
    // mints and deletes nothing: wait for the status to report the new generation, a positive
    // sign that the reconcile ran, then look.
    let poke = json!({"spec": {"sidecar": {"env": [{"name": "TEST_POKE", "value": "1"}]}}});
    let poked =
        e.ns.api::<TailscaleNode>()
            .patch("web", &PatchParams::default(), &Patch::Merge(&poke))
            .await
            .unwrap();
    let generation = poked.metadata.generation;
    let seen = eventually(WAIT, || async {
        let n = e.ns.api::<TailscaleNode>().get("web").await.ok()?;
        (n.status?.observed_generation == generation).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "the reconcile of generation {generation:?} never reported"
    );
    assert_eq!(f.ledger().mints.len(), 2);
    assert!(f.ledger().deletions.is_empty());

    // Deleting the registered pod deletes its device; the replacement gets a fresh key.
    e.ns.api::<Pod>()
        .delete(&pods[0].name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let deleted = eventually(WAIT, || async {
        f.ledger().deletions.contains(&"dev-a".to_string()).then_some(())
    })
    .await;
    assert!(
        deleted.is_some(),
        "device of the deleted pod is deleted: {:?}",
        f.ledger().deletions
    );
    let gone = eventually(WAIT, || async {
        e.ns.api::<Secret>()
            .get_opt(&names[0])
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the deleted pod's Secret goes");
    let three = eventually(WAIT, || async { (f.ledger().mints.len() == 3).then_some(()) }).await;
    assert!(three.is_some(), "the replacement pod gets its own key");

    // Deleting the TailscaleNode deletes every device and Secret.
    let live = pods_of(&e, "web").await;
    for (i, p) in live.iter().enumerate() {
        let secret = format!("ts-{}", p.name_any());
        secret_with_key(&e, &secret).await;
        register(&e, &secret, &format!("dev-live-{i}"), Some(&f)).await;
    }
    e.ns.api::<Deployment>()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    e.ns.api::<TailscaleNode>()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let node_gone = eventually(WAIT, || async {
        e.ns.api::<TailscaleNode>()
            .get_opt("web")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(node_gone.is_some(), "the TailscaleNode finalizer completes");
    let deletions = f.ledger().deletions;
    assert!(
        deletions.contains(&"dev-live-0".to_string()) && deletions.contains(&"dev-live-1".to_string()),
        "{deletions:?}"
    );
    let lp = ListParams::default().labels("tailnode.dev/node=web");
    let left = eventually(WAIT, || async {
        e.ns.api::<Secret>()
            .list(&lp)
            .await
            .unwrap()
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(left.is_some(), "no state Secret is left");
    e.ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_secrets_survive_pod_deletion_and_use_real_headscale() {
    let e = env("sts").await;
    let h = harness();
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "headscale"},
        "stringData": {"api-key": h.headscale_api_key}}))
    .unwrap();
    e.ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
    node(&e, "db", json!({"tags": ["tag:k8s"], "hostname": "db",
        "credentials": {"headscale": {"url": h.headscale_url, "apiKeySecretName": "headscale", "user": h.headscale_user_id}}}))
    .await;
    let sts: StatefulSet = serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 2, "serviceName": "db", "podManagementPolicy": "Parallel", "selector": {"matchLabels": {"app": "db"}},
        "template": {"metadata": {"labels": {"app": "db", "tailnode.dev/node": "db"}},
                     "spec": {"containers": [{"name": "db", "image": "postgres"}]}}}}))
    .unwrap();
    e.ns.api::<StatefulSet>()
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
    let s0 = secret_with_key(&e, "ts-db-0").await;
    let s1 = secret_with_key(&e, "ts-db-1").await;
    assert_ne!(data(&s0, "authkey"), data(&s1, "authkey"), "one key per replica");
    let uid = s0.metadata.uid.clone();

    // Headscale knows the keys, tagged.
    let keys = h
        .headscale_get(&format!("/api/v1/preauthkey?user={}", h.headscale_user_id))
        .await;
    // Headscale lists keys masked ("hskey-auth-<prefix>-***"): match each minted key by prefix.
    for minted in [data(&s0, "authkey").unwrap(), data(&s1, "authkey").unwrap()] {
        let listed = keys["preAuthKeys"].as_array().into_iter().flatten().find(|k| {
            let shown = k["key"].as_str().unwrap_or_default().trim_end_matches('*');
            !shown.is_empty() && minted.starts_with(shown)
        });
        let listed = listed.unwrap_or_else(|| panic!("Headscale does not list the minted key: {keys}"));
        assert_eq!(listed["aclTags"], json!(["tag:k8s"]), "{listed}");
        assert_eq!(listed["reusable"], json!(false), "{listed}");
    }

    // Deleting a StatefulSet pod keeps its Secret (same object, no new key).
    register(&e, "ts-db-0", "90000", None).await;
    e.ns.api::<Pod>()
        .delete("db-0", &DeleteParams::default())
        .await
        .unwrap();
    let back = eventually(WAIT, || async {
        let p = e.ns.api::<Pod>().get_opt("db-0").await.ok()??;
        (p.metadata.deletion_timestamp.is_none() && has_sidecar(&p)).then_some(p)
    })
    .await;
    assert!(back.is_some(), "the StatefulSet recreates db-0 with the sidecar");
    // The controller has handled the new pod once it opened its gate (registered state is enough).
    let opened = eventually(WAIT, || async {
        let p = e.ns.api::<Pod>().get_opt("db-0").await.ok()??;
        (!tailnode::inject::is_gated(p.spec.as_ref())).then_some(())
    })
    .await;
    assert!(opened.is_some(), "the recreated db-0 was never released");
    let kept = e.ns.api::<Secret>().get("ts-db-0").await.unwrap();
    assert_eq!(kept.metadata.uid, uid, "the Secret survived");
    assert_eq!(data(&kept, "device_id").as_deref(), Some("90000"));
    assert!(data(&kept, "authkey").is_none(), "no new key for a registered replica");

    // Scaling down retires ordinal 1 for good.
    let scale = json!({"spec": {"replicas": 1}});
    e.ns.api::<StatefulSet>()
        .patch("db", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    let retired = eventually(WAIT, || async {
        e.ns.api::<Secret>()
            .get_opt("ts-db-1")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(retired.is_some(), "ts-db-1 is removed after the scale-down");
    assert!(e.ns.api::<Secret>().get_opt("ts-db-0").await.unwrap().is_some());
    e.ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_then_fixed() {
    let e = env("creds").await;
    let f = fake(&["tag:k8s"]).await;
    node(&e, "web", oauth_spec(&f, "late")).await;
    deployment(&e, "late", "web", 1).await;
    wait_condition(&e, "web", "CredentialsValid", ("False", "SecretMissing")).await;
    wait_condition(&e, "web", "Degraded", ("True", "SecretMissing")).await;
    let evs = eventually(WAIT, || async {
        Some(events(&e, "SecretMissing").await).filter(|v| !v.is_empty())
    })
    .await;
    assert!(evs.unwrap()[0].contains("does not exist"));
    assert!(f.ledger().mints.is_empty());
    oauth_secret(&e, "late").await;
    wait_condition(&e, "web", "CredentialsValid", ("True", "Valid")).await;
    assert_eq!(f.ledger().mints.len(), 1);
    e.ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rejection_and_rate_limits_become_conditions_and_recover() {
    let e = env("api").await;
    let f = fake(&["tag:other"]).await;
    oauth_secret(&e, "oauth").await;
    node(&e, "web", oauth_spec(&f, "oauth")).await;
    deployment(&e, "web", "web", 1).await;
    wait_condition(&e, "web", "Degraded", ("True", "ApiRejected")).await;
    let evs = eventually(WAIT, || async {
        Some(events(&e, "MintFailed").await).filter(|v| !v.is_empty())
    })
    .await;
    assert!(evs.unwrap()[0].contains("invalid or not permitted"));
    // Fix the tag ownership, but make the API rate-limit for a while.
    f.script((0..12).map(|_| Scripted::Status(429, Some(0))).collect());
    f.set_client_tags(vec!["tag:k8s".into()]);
    wait_condition(&e, "web", "Degraded", ("True", "ApiRateLimited")).await;
    wait_condition(&e, "web", "Degraded", ("False", "AsExpected")).await;
    assert_eq!(f.ledger().mints.len(), 1, "exactly one key once the API recovers");
    e.ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_mint_against_their_own_endpoints() {
    let e = env("two").await;
    let (a, b) = (fake(&["tag:k8s"]).await, fake(&["tag:k8s"]).await);
    oauth_secret(&e, "oauth").await;
    node(&e, "alpha", oauth_spec(&a, "oauth")).await;
    node(&e, "beta", oauth_spec(&b, "oauth")).await;
    deployment(&e, "alpha", "alpha", 1).await;
    deployment(&e, "beta", "beta", 2).await;
    let ok = eventually(WAIT, || async {
        (a.ledger().mints.len() == 1 && b.ledger().mints.len() == 2).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "alpha {:?} beta {:?}",
        a.ledger().mints.len(),
        b.ledger().mints.len()
    );
    e.ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_edges_dry_run_malformed_and_selectors() {
    let e = env("hook").await;
    let f = fake(&["tag:k8s"]).await;
    oauth_secret(&e, "oauth").await;
    node(&e, "web", oauth_spec(&f, "oauth")).await;
    let count = |text: &str, result: &str| -> u64 {
        let needle = format!("tailnode_admissions_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // Dry run: the answer is injected, nothing is stored, nothing is minted. (The webhook's cache
    // learns of the new TailscaleNode within moments: until then it refuses, so retry.)
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "dry", "labels": {"tailnode.dev/node": "web"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}}),
    )
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pods = e.ns.api::<Pod>();
    let dry = eventually(WAIT, || async { pods.create(&dry_run, &pod).await.ok() })
        .await
        .expect("the dry run was never admitted");
    assert!(has_sidecar(&dry), "dry-run shows the injected pod");
    assert!(e.ns.api::<Pod>().get_opt("dry").await.unwrap().is_none());
    assert!(e.ns.api::<Secret>().get_opt("ts-dry").await.unwrap().is_none());
    assert!(f.ledger().mints.is_empty());

    // Malformed requests get an error response, not a crash.
    let http = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    for body in ["{not json", "{\"kind\":\"AdmissionReview\"}"] {
        let resp = http
            .post(&e.op.webhook_url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["response"]["allowed"], false, "{v}");
    }

    // Unlabelled pods, and labelled pods in the operator's namespace, never reach the webhook.
    let before = metrics(e.op).await;
    let plain: Pod = serde_json::from_value(json!({"metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}}))
    .unwrap();
    e.ns.api::<Pod>().create(&PostParams::default(), &plain).await.unwrap();
    let own: Pod = serde_json::from_value(
        json!({"metadata": {"name": "own", "labels": {"tailnode.dev/node": "web"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}}),
    )
    .unwrap();
    let op_pods: Api<Pod> = Api::namespaced(e.client.clone(), &e.op.namespace);
    let _ = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(e.client.clone(), &e.op.namespace)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap(),
        )
        .await;
    let stored = op_pods.create(&PostParams::default(), &own).await.unwrap();
    assert!(!has_sidecar(&stored));
    let after = metrics(e.op).await;
    // Not "injected": the other tests of this binary share the operator and inject pods of their
    // own meanwhile; that this pod got no sidecar is checked above.
    for result in ["skipped", "denied", "error"] {
        let extra = if result == "error" { 2 } else { 0 };
        assert!(
            count(&after, result) <= count(&before, result) + extra,
            "{result}: {before}\n{after}"
        );
    }
    op_pods.delete("own", &DeleteParams::default()).await.unwrap();
    e.ns.cleanup().await;
}

/// Workload identity federation: the node names only the OAuth client's id and the audience it
/// trusts; the operator asks the apiserver for a token of its own ServiceAccount for that
/// audience and exchanges it, so no client secret is stored anywhere. The fake checks the
/// token's audience and records its subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_identity_mints_without_a_stored_secret() {
    let e = env("wif").await;
    let f = fake(&["tag:k8s"]).await;
    f.trust_audience("tailnode.test");
    // The operator's ServiceAccount (`--service-account`, default `tailnode`) in its namespace.
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "tailnode"}})).unwrap();
    match Api::namespaced(e.client.clone(), &e.op.namespace)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(err)) if err.code == 409 => {}
        Err(err) => panic!("create the operator's ServiceAccount: {err}"),
    }
    node(
        &e,
        "web",
        json!({"tags": ["tag:k8s"], "credentials": {"oauth": {
        "clientID": "cid", "audience": "tailnode.test", "apiURL": f.url()}}}),
    )
    .await;
    deployment(&e, "web", "web", 1).await;
    let pod = eventually(WAIT, || async { pods_of(&e, "web").await.into_iter().next() })
        .await
        .expect("a pod");
    secret_with_key(&e, &format!("ts-{}", pod.name_any())).await;
    let ledger = f.ledger();
    assert_eq!(ledger.mints.len(), 1);
    assert!(!ledger.exchanges.is_empty(), "no token exchange");
    assert_eq!(
        ledger.exchanges[0].subject,
        format!("system:serviceaccount:{}:tailnode", e.op.namespace)
    );
    // Nothing secret in the namespace but the state Secret.
    let secrets = e.ns.api::<Secret>().list(&ListParams::default()).await.unwrap();
    assert!(
        secrets.items.iter().all(|s| s.name_any().starts_with("ts-")),
        "a credential Secret exists"
    );
    e.ns.cleanup().await;
}
