//! Blast radius on the real node. With every operator replica down, only labelled pods outside
//! the excluded namespaces are affected, and they are refused with a message that names the
//! webhook; everything else is admitted as usual. And no auth key ever appears in the
//! operator's logs (at debug level), in Events or in any TailscaleNode's status. Both run alone:
//! they stop or reconfigure the one installed operator.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::cluster::{Cluster, Ns, OPERATOR_NS, WAIT, is_ready};
use crate::support;
use crate::workloads::{RELEASE, app_container, node, restricted, upgrade_operator};

async fn dry_run(c: &Cluster, ns: &str, labelled: bool) -> Result<(), String> {
    let mut labels = json!({"app": "blast"});
    if labelled {
        labels["tailnode.dev/node"] = json!("web");
    }
    // PodSecurity `restricted`-compliant: the operator's namespace enforces it.
    let pod: Pod = serde_json::from_value(json!({"metadata": {"generateName": "blast-", "labels": labels},
        "spec": {"containers": [{"name": "app", "image": c.app_image, "securityContext": restricted()}]}}))
    .unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Api::<Pod>::namespaced(c.client().await, ns)
        .create(&pp, &pod)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn scale(c: &Cluster, replicas: u32) {
    let (ok, _, err) = c.kubectl(&[
        "-n",
        OPERATOR_NS,
        "scale",
        &format!("deployment/{RELEASE}"),
        &format!("--replicas={replicas}"),
    ]);
    assert!(ok, "kubectl scale: {err}");
}

pub async fn operator_down(c: Cluster) {
    let ns = Ns::new(&c, "blast", json!({})).await;
    node(&ns, "web", json!({"tags": ["tag:k8s"]})).await;
    assert_eq!(
        dry_run(&c, &ns.name, true).await,
        Ok(()),
        "a labelled pod with the operator up"
    );

    scale(&c, 0);
    let pods = Api::<Pod>::namespaced(ns.client.clone(), OPERATOR_NS);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    let gone = support::eventually(WAIT, || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "the operator's pods did not stop");

    // Not opted in, or in an excluded namespace: admitted as if tailnode did not exist.
    assert_eq!(
        dry_run(&c, &ns.name, false).await,
        Ok(()),
        "an unlabelled pod was refused"
    );
    assert_eq!(
        dry_run(&c, "kube-system", true).await,
        Ok(()),
        "kube-system was affected"
    );
    assert_eq!(
        dry_run(&c, OPERATOR_NS, true).await,
        Ok(()),
        "the operator's namespace was affected"
    );
    // Opted in: refused (failurePolicy Fail: no pod without its sidecar), naming the webhook.
    let refused = dry_run(&c, &ns.name, true).await;
    println!("a labelled pod with every operator replica down: {refused:?}");
    let message = refused.expect_err("a labelled pod was admitted without its sidecar");
    assert!(
        message.contains("inject.tailnode.dev"),
        "the refusal does not say which webhook: {message}"
    );

    scale(&c, 2);
    upgrade_operator(&c, &[]).await;
    assert_eq!(
        dry_run(&c, &ns.name, true).await,
        Ok(()),
        "the webhook did not come back"
    );
    ns.delete().await;
}

/// Every place a key could leak to, as text.
fn exposed(c: &Cluster) -> Vec<(String, String)> {
    let mut texts = Vec::new();
    let (_, pods, _) = c.kubectl(&["-n", OPERATOR_NS, "get", "pods", "-o", "name"]);
    for pod in pods.lines() {
        let (_, logs, _) = c.kubectl(&["-n", OPERATOR_NS, "logs", pod, "--all-containers"]);
        texts.push((format!("logs of {pod}"), logs));
    }
    for what in ["events", "events.events.k8s.io", "tailscalenodes.tailnode.dev"] {
        let (ok, out, err) = c.kubectl(&["get", what, "-A", "-o", "json"]);
        assert!(ok, "kubectl get {what}: {err}");
        texts.push((what.to_string(), out));
    }
    texts
}

pub async fn no_key_leaks(c: Cluster) {
    // Debug logs from fresh operator pods, then real work for them: keys minted, devices joined.
    upgrade_operator(&c, &["logLevel=debug"]).await;
    let ns = Ns::new(&c, "leak", json!({})).await;
    node(&ns, "web", json!({"tags": ["tag:k8s"]})).await;
    ns.create::<k8s_openapi::api::apps::v1::Deployment>(json!({"metadata": {"name": "web"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "web"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(&c, "web")]}}}}))
        .await;
    let api = ns.api::<Pod>();
    let lp = ListParams::default().labels("app=web");
    let ready = support::eventually(WAIT, || async {
        let pods = api.list(&lp).await.ok()?.items;
        (pods.len() == 2 && pods.iter().all(is_ready)).then_some(())
    })
    .await;
    assert!(ready.is_some(), "the replicas never became Ready");

    // Headscale lists every key it issued by its public prefix (`hskey-auth-<prefix>-***`); the
    // secret part follows the prefix, so a leak shows as the prefix followed by anything else.
    let keys = c.headscale_preauth_keys().await;
    let prefixes: Vec<String> = keys
        .iter()
        .filter_map(|k| k["key"].as_str()?.strip_suffix("***").map(str::to_string))
        .collect();
    assert!(prefixes.len() >= 2, "Headscale lists no keys to look for: {keys:?}");
    let texts = exposed(&c);
    assert!(
        texts.iter().any(|(_, t)| t.contains("\"level\":\"DEBUG\"")),
        "the operator's logs are not at debug level"
    );
    let mut leaks = Vec::new();
    for (place, text) in &texts {
        for p in &prefixes {
            for (at, _) in text.match_indices(p.as_str()) {
                if !text[at + p.len()..].starts_with('*') {
                    leaks.push(format!("{p}… in {place}"));
                }
            }
        }
    }
    println!(
        "searched {} keys in {} logs/Events/status texts ({} bytes)",
        prefixes.len(),
        texts.len(),
        texts.iter().map(|(_, t)| t.len()).sum::<usize>()
    );
    assert!(leaks.is_empty(), "auth keys leaked: {leaks:?}");
    ns.delete().await;
    upgrade_operator(&c, &["logLevel=info"]).await;
}
