//! The operator at scale, on the real harness: NODES TailscaleNodes in NODES/10 namespaces and PODS
//! labelled pods spread evenly over them. The pods are admitted by the operator's webhook and
//! keyed by its controller, but never run (a nodeSelector no node matches keeps them Pending).
//!
//! The operator runs as a process of its own (the `tailnode` binary, as a Deployment would run it)
//! with a ServiceAccount of its own, `tailnode-bench/operator`, whose every request the harness's
//! apiserver writes to its audit log (`e2e/local/up`'s audit policy). Reported:
//! - converged: from the last pod create to every replica's Secret holding a key (client clock at
//!   the watch event);
//! - the operator's RSS from /proc: peak (VmHWM) and steady (the mean over 5 s, 10 s after
//!   convergence);
//! - admission p99 as the apiserver's client saw it (the whole create call) and as the webhook
//!   measured it (its histogram);
//! - apiserver requests made by the operator per pod, counted by the apiserver (audit log), with
//!   the largest verb/resource groups;
//! - mints and OAuth tokens at the contract fake of the Tailscale API.
//!
//! Bounded: at most 5,000 pods and 500 nodes, 16 creates in flight, 5 minutes to converge.
//!
//! `cargo bench --features harness --bench scale -- --pods 5000 --nodes 500` (starts or reuses
//! the local harness; without flags 1,000 pods and 100 nodes, as `cargo test` runs it). Last line:
//! `scale pods=.. nodes=.. converged_s=.. rss_peak_mb=.. rss_steady_mb=.. requests_per_pod=..`
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::bench::{self, audited, identity, rss_mb};
use support::operator::{prepare, spawn_process, wait_ready};
use support::{eventually, harness, install_crd};
use tailnode::api::TailscaleNode;
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale};

const CONVERGE: Duration = Duration::from_secs(300);

fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The upper bound of the bucket holding quantile `q` of a Prometheus histogram in `text`.
fn histogram_quantile(text: &str, metric: &str, q: f64) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets.iter().find(|(_, c)| *c >= total * q).map(|(le, _)| *le)
}

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"tailnode.dev/node": node}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}],
                 "nodeSelector": {"tailnode.dev/bench": "unschedulable"}}}),
    )
    .unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pods = flag(&args, "--pods", 1000).clamp(10, 5000);
    let nodes = flag(&args, "--nodes", 100).clamp(1, 500).min(pods);
    let namespaces = nodes.div_ceil(10);
    let h = harness();
    let client = h.client().await;
    install_crd(&client).await;
    let fake = FakeTailscale::start(FakeConfig {
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        client_tags: vec!["tag:k8s".into()],
    })
    .await;

    // The operator, as a process with its own identity.
    let kubeconfig = identity(h, &client, "operator").await;
    let bench_user = bench::user("operator");
    let op = prepare(h).await;
    let since = chrono::Utc::now();
    // SCALE_OPERATOR_WRAPPER: a script that runs its arguments (a profiler, say) in place of the binary.
    let binary = std::env::var("SCALE_OPERATOR_WRAPPER").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tailnode").to_string());
    let mut child = spawn_process(h, &op, &binary, &kubeconfig, &[], "scale-operator");
    let pid = child.id();
    wait_ready(h, &op).await;
    let sampling = Arc::new(AtomicBool::new(true));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, f64)>::new()));
    let sampler = {
        let (sampling, samples) = (sampling.clone(), samples.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                samples.lock().unwrap().push((Instant::now(), rss_mb(pid).0));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let started_rss = rss_mb(pid).0;

    // NODES TailscaleNodes (10 per namespace), each with its OAuth client Secret's namespace.
    let prefix = support::unique("scale");
    let ns_names: Vec<String> = (0..namespaces).map(|i| format!("{prefix}-{i}")).collect();
    let node_names: Vec<(String, String)> = (0..nodes)
        .map(|j| (ns_names[j % namespaces].clone(), format!("n{j}")))
        .collect();
    futures::stream::iter(ns_names.clone())
        .for_each_concurrent(8, |name| {
            let client = client.clone();
            let label = op.selector.clone();
            async move {
                let ns: Namespace =
                    serde_json::from_value(json!({"metadata": {"name": name, "labels": {label.0: label.1}}})).unwrap();
                Api::<Namespace>::all(client.clone())
                    .create(&PostParams::default(), &ns)
                    .await
                    .unwrap();
                let s: Secret = serde_json::from_value(json!({"metadata": {"name": "oauth"},
                    "stringData": {"client_id": "cid", "client_secret": "csecret"}}))
                .unwrap();
                Api::<Secret>::namespaced(client, &name)
                    .create(&PostParams::default(), &s)
                    .await
                    .unwrap();
            }
        })
        .await;
    futures::stream::iter(node_names.clone())
        .for_each_concurrent(16, |(ns, name)| {
            let client = client.clone();
            let url = fake.url();
            async move {
                let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
                    "kind": "TailscaleNode", "metadata": {"name": name},
                    "spec": {"tags": ["tag:k8s"],
                             "credentials": {"oauth": {"secretName": "oauth", "apiURL": url}}}}))
                .unwrap();
                Api::<TailscaleNode>::namespaced(client, &ns)
                    .create(&PostParams::default(), &node)
                    .await
                    .unwrap();
            }
        })
        .await;
    let bench_ns: HashSet<String> = ns_names.iter().cloned().collect();

    // Keys, as the Secrets' watch events arrive.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    {
        let secrets: Api<Secret> = Api::all(client.clone());
        let bench_ns = bench_ns.clone();
        tokio::spawn(async move {
            let cfg = watcher::Config::default().labels("tailnode.dev/node");
            let mut stream = watcher(secrets, cfg).applied_objects().boxed();
            while let Some(Ok(s)) = stream.next().await {
                if s.namespace().is_some_and(|n| bench_ns.contains(&n))
                    && s.data.as_ref().is_some_and(|d| d.contains_key("authkey"))
                {
                    let _ = tx.send((
                        format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
                        Instant::now(),
                    ));
                }
            }
        });
    }

    // The webhook refuses pods of a node it does not know yet: wait until it knows the last one.
    let (last_ns, last_node) = node_names.last().cloned().unwrap();
    let warm = eventually(Duration::from_secs(60), || {
        let api: Api<Pod> = Api::namespaced(client.clone(), &last_ns);
        let p = pod("warmup", &last_node);
        async move { api.create(&PostParams::default(), &p).await.ok() }
    })
    .await;
    assert!(
        warm.is_some(),
        "the webhook never admitted a pod of the last TailscaleNode"
    );

    // PODS pods, 16 creates in flight (a few controllers' worth).
    let first_create = Instant::now();
    let plan: Vec<(String, String, String)> = (0..pods)
        .map(|i| {
            let (ns, node) = node_names[i % nodes].clone();
            (ns, node, format!("p{i}"))
        })
        .collect();
    let mut create_ms: Vec<Duration> = futures::stream::iter(plan)
        .map(|(ns, node, name)| {
            let client = client.clone();
            async move {
                let api: Api<Pod> = Api::namespaced(client, &ns);
                let t = Instant::now();
                api.create(&PostParams::default(), &pod(&name, &node)).await.unwrap();
                t.elapsed()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let last_create = Instant::now();
    create_ms.sort();
    let expected = pods + 1; // and the warm-up pod
    let mut keyed = HashSet::new();
    let deadline = last_create + CONVERGE;
    let mut converged = None;
    while keyed.len() < expected && Instant::now() < deadline {
        let Ok(Some((name, at))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await else {
            continue;
        };
        if keyed.insert(name) && keyed.len() == expected {
            converged = Some(at.saturating_duration_since(last_create));
        }
    }
    let converged = converged.unwrap_or_else(|| {
        panic!(
            "only {} of {expected} replicas keyed within {}s",
            keyed.len(),
            CONVERGE.as_secs()
        )
    });
    let metrics = support::operator::metrics(&op).await;

    // Steady: the mean over 5 s, after 10 s of quiet.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let steady_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let (_, peak) = rss_mb(pid);
    let steady: Vec<f64> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t >= steady_from)
        .map(|(_, r)| *r)
        .collect();
    let steady = steady.iter().sum::<f64>() / steady.len().max(1) as f64;
    let (requests, top) = audited(h, &bench_user, since, chrono::Utc::now());
    assert!(
        requests > 0,
        "the apiserver audited none of the operator's requests: a harness started before its audit \
         policy named {bench_user}? (e2e/local/down, then e2e/local/up)"
    );
    let ledger = fake.ledger();

    let webhook_p99 = histogram_quantile(&metrics, "tailnode_admission_duration_seconds", 0.99);
    println!(
        "scale: {pods} pods of {nodes} nodes in {namespaces} namespaces created in {:.1}s; create call p50 {:.1} ms, \
         p99 {:.1} ms; webhook p99 <= {} ms",
        last_create.duration_since(first_create).as_secs_f64(),
        pct(&create_ms, 0.5).as_secs_f64() * 1000.0,
        pct(&create_ms, 0.99).as_secs_f64() * 1000.0,
        webhook_p99.map_or("?".into(), |s| format!("{:.1}", s * 1000.0)),
    );
    println!(
        "scale: operator RSS at start {started_rss:.1} MB, peak {peak:.1} MB, steady {steady:.1} MB; \
         mints {} for {expected} replicas, OAuth tokens {}",
        ledger.mints.len(),
        ledger.tokens_issued
    );
    let groups: Vec<String> = top.iter().take(8).map(|(k, n)| format!("{k}={n}")).collect();
    println!(
        "scale: apiserver requests by the operator: {requests} ({})",
        groups.join(", ")
    );

    // Clean up while the operator still runs (its finalizers), then stop it.
    for ns in &ns_names {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::default())
            .await;
    }
    let gone = eventually(Duration::from_secs(180), || {
        let client = client.clone();
        let ns_names = ns_names.clone();
        async move {
            for ns in &ns_names {
                if Api::<Namespace>::all(client.clone()).get_opt(ns).await.ok()?.is_some() {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    if gone.is_none() {
        eprintln!("scale: the bench namespaces were still terminating after 180 s");
    }
    let _ = child.kill();
    let _ = child.wait();
    support::operator::remove(&client, &op).await;
    println!(
        "scale pods={pods} nodes={nodes} converged_s={:.1} rss_peak_mb={peak:.0} rss_steady_mb={steady:.0} requests_per_pod={:.1}",
        converged.as_secs_f64(),
        requests as f64 / expected as f64
    );
    std::process::exit(0);
}
