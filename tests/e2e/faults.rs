//! Control-plane faults on the real node, local harness only (it restarts the harness's own
//! processes with `e2e/local/restart`): the apiserver is down for 20 s (longer than the lease's
//! renew deadline), then Headscale is down for 10 s. The operator's pods are never restarted
//! (a replica that loses the lease stands for election again in-process), and after each fault
//! a new replica is keyed and joins. Prints one line:
//! `faults apiserver_recovered_s=.. headscale_recovered_s=.. operator_restarts=0`: the time from
//! the webhook admitting pods again (apiserver) or from the restart (Headscale) to a new replica
//! registered and Ready.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

use crate::cluster::{Cluster, Ns, OPERATOR_NS, WAIT, data, is_ready};
use crate::support;
use crate::workloads::{RELEASE, app_container, node};

fn restart(name: &str, down_s: u32) {
    let script = support::repo_root().join("e2e/local/restart");
    let out = Command::new("bash")
        .arg(script)
        .args([name, &down_s.to_string()])
        .output()
        .expect("run e2e/local/restart");
    assert!(
        out.status.success(),
        "e2e/local/restart {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sum of the operator containers' restart counts.
async fn operator_restarts(c: &Cluster) -> i32 {
    let pods = Api::<Pod>::namespaced(c.client().await, OPERATOR_NS);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    let list = support::eventually(WAIT, || async { pods.list(&lp).await.ok() })
        .await
        .unwrap();
    list.items
        .iter()
        .flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()))
        .map(|s| s.restart_count)
        .sum()
}

/// Scales the Deployment to `n` and waits until `n` replicas are registered (a device id in
/// their Secret) and Ready; returns how long that took.
async fn scale_and_join(ns: &Ns, n: usize) -> Duration {
    let t = Instant::now();
    let scale = json!({"spec": {"replicas": n}});
    let deploys = ns.api::<Deployment>();
    let patched = support::eventually(WAIT, || async {
        deploys
            .patch("web", &PatchParams::default(), &Patch::Merge(&scale))
            .await
            .ok()
    })
    .await;
    assert!(patched.is_some(), "could not scale the Deployment");
    let (pods, secrets) = (ns.api::<Pod>(), ns.api::<k8s_openapi::api::core::v1::Secret>());
    let lp = ListParams::default().labels("app=web");
    let joined = support::eventually(Duration::from_secs(180), || async {
        let ps = pods.list(&lp).await.ok()?.items;
        let live: Vec<&Pod> = ps.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        if live.len() != n || !live.iter().all(|p| is_ready(p)) {
            return None;
        }
        for p in live {
            let s = secrets
                .get_opt(&format!("ts-{}", p.metadata.name.as_deref()?))
                .await
                .ok()??;
            data(&s, "device_id")?;
        }
        Some(())
    })
    .await;
    assert!(joined.is_some(), "{n} replicas did not all join after the fault");
    t.elapsed()
}

pub async fn control_plane_faults(c: Cluster) {
    let ns = Ns::new(&c, "faults", json!({})).await;
    node(&ns, "web", json!({"tags": ["tag:k8s"]})).await;
    ns.create::<Deployment>(json!({"metadata": {"name": "web"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "web"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(&c, "web")]}}}}))
        .await;
    scale_and_join(&ns, 1).await;
    let restarts_before = operator_restarts(&c).await;

    // The apiserver goes away for longer than the renew deadline (10 s): the leader steps down.
    restart("kube-apiserver", 20);
    let back = support::eventually(Duration::from_secs(120), || async {
        let client = c.client().await;
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
            .get("default")
            .await
            .ok()
    })
    .await;
    assert!(back.is_some(), "the apiserver did not come back");
    // The node's heartbeats lapsed, so its pods (the operator's too) were not ready for a while
    // and the webhook Service had no endpoints: that is the cluster recovering, not tailnode.
    // Wait until the webhook admits a labelled pod again (a server-side dry run), then measure.
    let t = Instant::now();
    let probe: Pod = serde_json::from_value(
        json!({"metadata": {"name": "probe", "labels": {"tailnode.dev/node": "web"}},
        "spec": {"containers": [{"name": "app", "image": c.app_image}]}}),
    )
    .unwrap();
    let dry = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let pods = ns.api::<Pod>();
    let admitted = support::eventually(Duration::from_secs(300), || async {
        pods.create(&dry, &probe).await.ok()
    })
    .await;
    assert!(
        admitted.is_some(),
        "the webhook never admitted a pod again after the apiserver restart"
    );
    println!(
        "webhook reachable again {:.1}s after the apiserver answered",
        t.elapsed().as_secs_f64()
    );
    let apiserver_recovered = scale_and_join(&ns, 2).await;

    // Headscale goes away: running sidecars reconnect, a new replica is keyed and joins.
    restart("headscale", 10);
    let headscale_recovered = scale_and_join(&ns, 3).await;

    let restarts = operator_restarts(&c).await - restarts_before;
    println!(
        "faults apiserver_recovered_s={:.1} headscale_recovered_s={:.1} operator_restarts={restarts}",
        apiserver_recovered.as_secs_f64(),
        headscale_recovered.as_secs_f64()
    );
    assert_eq!(restarts, 0, "the operator's containers restarted during the faults");
    ns.delete().await;
}
