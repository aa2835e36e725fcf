//! Upgrading and uninstalling the chart under running replicas, on the real node. A `helm
//! upgrade` that replaces the operator's pods (new pods, a new leader, the same Secrets) keeps
//! every replica on the tailnet: same device, no new key, no sidecar restart. `helm uninstall`
//! removes the webhook configuration before the webhook's pods go, so labelled pods created
//! while it runs are never refused; what stays behind (TailscaleNodes, state Secrets, devices,
//! running sidecars) is what the README says, and a reinstall picks it all up again with no new
//! key. Runs alone: it replaces and removes the one installed operator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::cluster::{Cluster, Ns, OPERATOR_NS, WAIT, data, is_ready, sidecar_restarts};
use crate::support;
use crate::workloads::{RELEASE, app_container, node, upgrade_operator};

const REPLICAS: usize = 2;
/// Bounds of the admission loop that runs during `helm uninstall`.
const PROBES_MAX: usize = 200;
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Pod → (device id, minted-at) of every registered replica.
async fn identities(ns: &Ns) -> BTreeMap<String, (String, String)> {
    let secrets = ns.api::<Secret>().list(&ListParams::default()).await.unwrap().items;
    secrets
        .iter()
        .filter_map(|s| {
            let a = s.metadata.annotations.as_ref()?;
            let pod = a.get("tailnode.dev/pod")?.clone();
            Some((pod, (data(s, "device_id")?, a.get("tailnode.dev/minted-at")?.clone())))
        })
        .collect()
}

async fn replicas_ready(ns: &Ns) -> Vec<Pod> {
    let lp = ListParams::default().labels("app=web");
    let api = ns.api::<Pod>();
    let ready = support::eventually(WAIT, || async {
        let pods = api.list(&lp).await.ok()?.items;
        (pods.len() == REPLICAS && pods.iter().all(is_ready)).then_some(pods)
    })
    .await;
    ready.expect("the replicas are not all Ready")
}

/// Keys Headscale has issued for `tag:k8s` (the replicas'; the probe pods' node uses
/// `tag:test`). Nothing else mints while this scenario runs alone.
async fn k8s_keys(c: &Cluster) -> usize {
    c.headscale_preauth_keys()
        .await
        .iter()
        .filter(|k| {
            k["aclTags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "tag:k8s"))
        })
        .count()
}

fn operator_pods(c: &Cluster) -> Vec<String> {
    let (_, out, _) = c.kubectl(&["-n", OPERATOR_NS, "get", "pods", "-o", "name"]);
    out.lines().map(str::to_string).collect()
}

/// Every replica still has the device and key it had, its sidecar never restarted, and
/// Headscale still lists its node.
async fn unchanged(c: &Cluster, ns: &Ns, before: &BTreeMap<String, (String, String)>, when: &str) {
    let pods = replicas_ready(ns).await;
    for p in &pods {
        assert_eq!(sidecar_restarts(p), 0, "{when}: sidecar of {} restarted", p.name_any());
    }
    assert_eq!(
        &identities(ns).await,
        before,
        "{when}: a replica got a new device or key"
    );
    for (device, _) in before.values() {
        assert!(
            c.headscale_node(device).await.is_some(),
            "{when}: node {device} left Headscale"
        );
    }
}

pub async fn upgrade_and_uninstall(c: Cluster) {
    let ns = Ns::new(&c, "upgrade", json!({})).await;
    node(&ns, "web", json!({"tags": ["tag:k8s"]})).await;
    node(&ns, "probe", json!({"tags": ["tag:test"]})).await;
    ns.create::<Deployment>(json!({"metadata": {"name": "web"}, "spec": {
        "replicas": REPLICAS, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "web"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(&c, "web")]}}}}))
        .await;
    replicas_ready(&ns).await;
    let registered = support::eventually(WAIT, || async {
        let ids = identities(&ns).await;
        (ids.len() == REPLICAS).then_some(ids)
    })
    .await;
    let before = registered.expect("the replicas never registered");
    let keys = k8s_keys(&c).await;

    // An upgrade that rolls the operator's pods: new pods, new leader, same state.
    let old_pods = operator_pods(&c);
    upgrade_operator(&c, &["podAnnotations.tailnode-e2e/rollout=r1"]).await;
    // helm --wait returns once the new pods are Ready; the old ones may still be terminating.
    let replaced = support::eventually(WAIT, || async {
        let now = operator_pods(&c);
        (!now.is_empty() && now.iter().all(|p| !old_pods.contains(p))).then_some(now)
    })
    .await;
    assert!(
        replaced.is_some(),
        "the upgrade did not replace the operator's pods: {old_pods:?} -> {:?}",
        operator_pods(&c)
    );
    // The new operator works (a scaled-up replica gets its key) and left the others alone.
    let deploys = ns.api::<Deployment>();
    let scale = json!({"spec": {"replicas": REPLICAS + 1}});
    deploys
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&scale),
        )
        .await
        .unwrap();
    let third = support::eventually(WAIT, || async {
        let ids = identities(&ns).await;
        (ids.len() == REPLICAS + 1).then_some(ids)
    })
    .await
    .expect("the operator after the upgrade did not key a new replica");
    let added: Vec<&String> = third.keys().filter(|p| !before.contains_key(*p)).collect();
    assert_eq!(added.len(), 1, "{third:?}");
    let scale = json!({"spec": {"replicas": REPLICAS}});
    deploys
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&scale),
        )
        .await
        .unwrap();
    let back = support::eventually(WAIT, || async { (identities(&ns).await == before).then_some(()) }).await;
    assert!(
        back.is_some(),
        "scaling back down did not retire exactly the added replica"
    );
    unchanged(&c, &ns, &before, "after helm upgrade").await;
    assert_eq!(
        k8s_keys(&c).await,
        keys + 1,
        "keys minted around the upgrade (one for the added replica)"
    );

    // Uninstall while labelled pods keep being created: none is refused.
    let refused = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let prober = {
        let (pods, refused, created, done) = (ns.api::<Pod>(), refused.clone(), created.clone(), done.clone());
        let image = c.app_image.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut stop_at: Option<Instant> = None;
            let finished = done.notified();
            tokio::pin!(finished);
            for i in 0..PROBES_MAX {
                if stop_at.is_some_and(|t| Instant::now() > t) {
                    break;
                }
                let p: Pod = serde_json::from_value(json!({"metadata": {"name": format!("probe-{i}"),
                    "labels": {"tailnode.dev/node": "probe", "app": "probe"}},
                    "spec": {"nodeSelector": {"tailnode.dev/test": "never-scheduled"},
                             "containers": [{"name": "app", "image": image}]}}))
                .unwrap();
                match pods.create(&PostParams::default(), &p).await {
                    Ok(_) => created.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        errors.push(e.to_string());
                        refused.fetch_add(1, Ordering::SeqCst)
                    }
                };
                tokio::select! {
                    _ = &mut finished, if stop_at.is_none() => stop_at = Some(Instant::now() + Duration::from_secs(3)),
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                }
            }
            errors
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let (ok, _, err) = c.run(&c.helm, &["uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait"]);
    assert!(ok, "helm uninstall: {err}");
    println!("helm uninstall took {:.1}s", t.elapsed().as_secs_f64());
    done.notify_one();
    let errors = prober.await.unwrap();
    let (made, lost) = (created.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
    println!("pods created during helm uninstall: {made} admitted, {lost} refused");
    assert_eq!(lost, 0, "labelled pods were refused during helm uninstall: {errors:?}");
    assert!(made >= 4, "the admission loop did not run during the uninstall");
    let hooks = Api::<MutatingWebhookConfiguration>::all(ns.client.clone());
    assert!(
        hooks.get_opt(RELEASE).await.unwrap().is_none(),
        "the webhook configuration stayed"
    );

    // Left behind, as documented: the node, its Secrets and devices, and working sidecars.
    assert!(
        ns.api::<tailnode::api::TailscaleNode>()
            .get_opt("web")
            .await
            .unwrap()
            .is_some()
    );
    unchanged(&c, &ns, &before, "after helm uninstall").await;

    // A reinstall adopts it all: no new key, no restart.
    upgrade_operator(&c, &[]).await;
    unchanged(&c, &ns, &before, "after reinstalling").await;
    let _ = ns
        .api::<Pod>()
        .delete_collection(&DeleteParams::default(), &ListParams::default().labels("app=probe"))
        .await;
    assert_eq!(k8s_keys(&c).await, keys + 1, "keys minted by uninstall + reinstall");
    ns.delete().await;
}
