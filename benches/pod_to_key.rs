//! Time from Pod CREATE to its state Secret holding a minted key, on the real harness with the
//! operator running and the contract fake of the Tailscale API. The pods are never run (a
//! nodeSelector no node matches keeps them Pending). Bounded: N pods (default 100,
//! at most 300), 5 minutes. Prints median and p99.
//!
//! `cargo bench --features harness --bench pod_to_key -- [PODS]` (starts or reuses the local harness).
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::operator::operator;
use support::{TestNamespace, harness, install_crd};
use tailnode::api::TailscaleNode;
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale};

#[tokio::main]
async fn main() {
    let pods: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100)
        .min(300);
    let h = harness();
    let op = operator();
    let client = h.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, "bench", json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    let fake = FakeTailscale::start(FakeConfig {
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        client_tags: vec!["tag:k8s".into()],
    })
    .await;
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "oauth"},
        "stringData": {"client_id": "cid", "client_secret": "csecret"}}))
    .unwrap();
    ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
    let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": "web"},
        "spec": {"tags": ["tag:k8s"], "credentials": {"oauth": {"secretName": "oauth", "apiURL": fake.url()}}}}))
    .unwrap();
    ns.api::<TailscaleNode>()
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Watch Secrets; record when each first holds a key.
    let secrets: Api<Secret> = ns.api();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    tokio::spawn(async move {
        let mut stream = watcher(secrets, watcher::Config::default().labels("tailnode.dev/node=web"))
            .applied_objects()
            .boxed();
        while let Some(Ok(s)) = stream.next().await {
            if s.data.as_ref().is_some_and(|d| d.contains_key("authkey")) {
                let _ = tx.send((s.name_any(), Instant::now()));
            }
        }
    });

    let api: Api<Pod> = ns.api();
    let mut created = HashMap::new();
    let started = Instant::now();
    for i in 0..pods {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p{i}"),
            "labels": {"tailnode.dev/node": "web"}}, "spec": {"containers": [{"name": "app", "image": "nginx"}],
            // Measured, not run: no node matches, so the pods stay Pending (the local node's kubelet
            // would otherwise try to start them).
            "nodeSelector": {"tailnode.dev/bench": "unschedulable"}}}))
        .unwrap();
        let t = Instant::now();
        api.create(&PostParams::default(), &pod).await.unwrap();
        created.insert(format!("ts-p{i}"), t);
    }
    let create_secs = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while latencies.len() < pods && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some((name, at))) => {
                if let Some(t) = created.remove(&name) {
                    latencies.push(at.duration_since(t));
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "pod CREATE -> Secret holds key: {} of {pods} pods (created in {create_secs:.1} s): median {:.0} ms, p99 {:.0} ms, max {:.0} ms; mints {}, OAuth tokens {}",
        latencies.len(),
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(*latencies.last().unwrap()),
        fake.ledger().mints.len(),
        fake.ledger().tokens_issued,
    );
    ns.cleanup().await;
    std::process::exit(0);
}
