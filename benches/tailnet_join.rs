//! Pod CREATE -> node online in Headscale, and sidecar restart -> back online, with the operator
//! on the harness, real containerboot run by the pod runner, and Headscale as control. Bounded:
//! N pods one after another (default 10, at most 20). Prints medians and maxima.
//!
//! `cargo bench --bench tailnet_join -- [PODS]` (starts or reuses the local harness; needs root).
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use serde_json::json;
use support::operator::operator;
use support::podrunner::{self, PodOptions};
use support::{Harness, TestNamespace, harness, install_crd};
use tailnode::api::TailscaleNode;

async fn online(h: &Harness, hostname_prefix: &str) -> bool {
    h.headscale_nodes()
        .await
        .iter()
        .any(|n| n["online"] == json!(true) && n["givenName"].as_str().is_some_and(|g| g.starts_with(hostname_prefix)))
}

async fn wait_online(h: &Harness, prefix: &str, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if online(h, prefix).await {
            return since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{prefix} never came online");
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "{name}: n={} median {:.1} s, min {:.1} s, max {:.1} s",
        v.len(),
        s(v[v.len() / 2]),
        s(v[0]),
        s(v[v.len() - 1])
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pods: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10)
        .min(20);
    let h = harness();
    let op = operator();
    let client = h.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, "join", json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "headscale"},
        "stringData": {"api-key": h.headscale_api_key}}))
    .unwrap();
    ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
    let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": "bench"}, "spec": {"tags": ["tag:k8s"], "hostname": "bench",
        "credentials": {"headscale": {"url": h.headscale_url, "apiKeySecretName": "headscale", "user": h.headscale_user_id}}}}))
    .unwrap();
    ns.api::<TailscaleNode>()
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (mut joins, mut restarts) = (Vec::new(), Vec::new());
    for i in 0..pods {
        let name = format!("j{i}-{}", std::process::id());
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"tailnode.dev/node": "bench"}},
            "spec": {"containers": [{"name": "app", "image": "demo"}]}}),
        )
        .unwrap();
        let t = Instant::now();
        ns.api::<Pod>().create(&PostParams::default(), &pod).await.unwrap();
        // A kubelet starts the containers right away; containerboot retries until its Secret,
        // Role and key are there.
        let (hh, nsn, pn) = (h.clone(), ns.name.clone(), name.clone());
        let opts = PodOptions {
            wait: None,
            ..Default::default()
        };
        let running = tokio::task::spawn_blocking(move || podrunner::start_pod_with(&hh, &nsn, &pn, &opts))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        joins.push(wait_online(h, &format!("bench-{name}"), t).await);
        let t = Instant::now();
        let r = running.clone();
        let running = tokio::task::spawn_blocking(move || r.restart()).await.unwrap();
        restarts.push(t.elapsed());
        tokio::task::spawn_blocking(move || running.stop()).await.unwrap();
    }
    summary("pod CREATE -> node online in Headscale", joins);
    summary("sidecar restart -> Startup complete again (same node)", restarts);
    ns.cleanup().await;
    std::process::exit(0);
}
