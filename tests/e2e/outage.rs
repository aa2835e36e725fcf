//! The credentials gate on the real node: with the controller stopped and the webhook still
//! serving, labelled pods stay gated (no container starts, so no interactive login, no crash
//! loop); once the controller is back they all start and join. Runs alone, after the concurrent
//! scenarios, because it stops the controller of the one installed operator.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::cluster::{Cluster, Ns, OPERATOR_NS, WAIT, data, is_ready, sidecar_restarts};
use crate::support;
use crate::workloads::{app_container, node, upgrade_operator};

/// Pods of the outage scenario (the node runs up to 60).
const PODS: i32 = 20;

fn gated(p: &Pod) -> bool {
    tailnode::inject::is_gated(p.spec.as_ref())
        && p.spec.as_ref().is_some_and(|s| s.node_name.is_none())
        && p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "PodScheduled" && c.reason.as_deref() == Some("SchedulingGated"))
        })
}

/// When (seconds after the operator's rollout) each pod was first seen at each stage: its gate
/// open, its sidecar running, its app running, its device registered (the controller's
/// `tailnode.dev/tailnet-ips` annotation), Ready.
#[derive(Default)]
struct Stages(BTreeMap<&'static str, BTreeMap<String, f64>>);

const STAGES: [&str; 5] = ["ungated", "sidecar running", "app running", "registered", "ready"];

impl Stages {
    fn observe(&mut self, pods: &[Pod], t: f64) {
        for p in pods {
            let st = p.status.clone().unwrap_or_default();
            let running = |v: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
                v.iter()
                    .flatten()
                    .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            };
            let annotated = p.annotations().contains_key("tailnode.dev/tailnet-ips");
            let at = [
                !tailnode::inject::is_gated(p.spec.as_ref()),
                running(&st.init_container_statuses),
                running(&st.container_statuses),
                annotated,
                is_ready(p),
            ];
            for (stage, reached) in STAGES.iter().zip(at) {
                if reached {
                    self.0.entry(stage).or_default().entry(p.name_any()).or_insert(t);
                }
            }
        }
    }

    fn summary(&self) -> String {
        STAGES
            .iter()
            .map(|s| {
                let times = self
                    .0
                    .get(s)
                    .map(|m| m.values().copied().collect::<Vec<_>>())
                    .unwrap_or_default();
                let first = times.iter().copied().fold(f64::INFINITY, f64::min);
                let last = times.iter().copied().fold(0.0, f64::max);
                format!("{s} {first:.1}..{last:.1}s (n={})", times.len())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub async fn controller_outage(c: Cluster) {
    upgrade_operator(&c, &["extraArgs={--controller=false}"]).await;
    let ns = Ns::new(&c, "outage", json!({})).await;
    node(&ns, "web", json!({"tags": ["tag:k8s"]})).await;
    ns.create::<k8s_openapi::api::apps::v1::Deployment>(json!({"metadata": {"name": "web"}, "spec": {
        "replicas": PODS, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "web"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(&c, "web")]}}}}))
        .await;
    let api = ns.api::<Pod>();
    let lp = ListParams::default().labels("app=web");
    // Every pod is admitted (the webhook serves) and reported SchedulingGated by the scheduler.
    let all_gated = support::eventually(WAIT, || async {
        let pods = api.list(&lp).await.ok()?.items;
        (pods.len() == PODS as usize && pods.iter().all(gated)).then_some(pods)
    })
    .await;
    let pods = all_gated.expect("the labelled pods were not all admitted and gated");
    for p in &pods {
        let st = p.status.clone().unwrap_or_default();
        assert!(
            st.init_container_statuses.iter().flatten().all(|s| s
                .state
                .as_ref()
                .and_then(|x| x.running.as_ref())
                .is_none())
                && st.container_statuses.as_ref().is_none_or(|v| v.is_empty()),
            "a container of a gated pod started: {st:?}"
        );
    }
    // No Secret, no key: nothing was minted while the controller was away.
    let secrets = ns
        .api::<k8s_openapi::api::core::v1::Secret>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        secrets.items.iter().all(|s| data(s, "authkey").is_none()),
        "a key was minted with the controller stopped"
    );

    // The controller comes back (the chart as installed): every pod starts once and joins.
    let back = Instant::now();
    upgrade_operator(&c, &[]).await;
    // The rollout of the operator itself (helm --wait) is part of "coming back"; the time after
    // it is what the controller takes to open 20 gates and the node to start 20 pods.
    let rolled_out = Instant::now();
    let seen = std::sync::Mutex::new(Stages::default());
    let joined = support::eventually(Duration::from_secs(240), || async {
        let pods = api.list(&lp).await.ok()?.items;
        seen.lock().unwrap().observe(&pods, rolled_out.elapsed().as_secs_f64());
        let ready = pods.iter().filter(|p| is_ready(p)).count();
        (pods.len() == PODS as usize && ready == PODS as usize).then_some(pods)
    })
    .await;
    let pods = joined.expect("not every pod became Ready after the controller came back");
    let all_ready_at = k8s_openapi::jiff::Timestamp::now();
    let took = back.elapsed().as_secs_f64();
    let after = rolled_out.elapsed().as_secs_f64();
    let rollout = took - after;
    println!(
        "controller back -> {PODS} gated pods Ready (sidecars joined): {took:.1}s ({rollout:.1}s operator rollout, then {after:.1}s)"
    );
    // The controller is back when a controller-enabled replica holds the Lease (the new pods
    // start serving before helm's rollout ends, and the old leader hands the Lease over).
    let lease = Api::<Lease>::namespaced(c.client().await, OPERATOR_NS)
        .get("tailnode-controller")
        .await
        .expect("the controller's Lease");
    let acquired = lease
        .spec
        .and_then(|s| s.acquire_time)
        .expect("the Lease names its acquire time");
    let since_leader = all_ready_at.duration_since(acquired.0).as_secs_f64();
    println!("controller leader -> {PODS} gated pods Ready (sidecars joined): {since_leader:.1}s");
    println!(
        "after the rollout, when the last of {PODS} pods reached each stage: {}",
        seen.lock().unwrap().summary()
    );
    for p in &pods {
        assert_eq!(
            sidecar_restarts(p),
            0,
            "a sidecar restarted: it started without its credentials"
        );
    }
    ns.delete().await;
}
