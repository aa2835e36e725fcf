//! Time from Pod CREATE to its state Secret holding a minted key, and to its credentials gate
//! opening, on the real harness with the operator running: against the contract fake of the
//! Tailscale API and against the harness's Headscale. Pods are created one at a time (each
//! waits for its key: the latency a single rollout step sees) and then all at once (a burst).
//! They are never run (a nodeSelector no node matches keeps them Pending). Times are client
//! clocks: at the create call, and at the watch event (`creationTimestamp` has 1 s resolution).
//! Bounded: at most 100 sequential and 500 burst pods per API, 5 minutes per phase.
//!
//! `POD_TO_KEY_TRACE=1` prints each create and key with wall-clock times, to line up with the
//! operator's logs.
//!
//! `cargo bench --features harness --bench pod_to_key -- [PODS] [BURST]` (defaults 50 and 200;
//! starts or reuses the local harness). Last line:
//! `pod_to_key pods=.. median_ms=.. p99_ms=.. burst_pods=.. burst_all_keyed_s=..` (the contract
//! fake; the Headscale numbers are on the line before).
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
use serde_json::{Value, json};
use support::operator::operator;
use support::{TestNamespace, harness, install_crd};
use tailnode::api::TailscaleNode;
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale};
use tokio::sync::mpsc::UnboundedReceiver;

const PHASE: Duration = Duration::from_secs(300);

/// What happened to a pod, when.
enum Seen {
    Keyed(String, Instant),
    Ungated(String, Instant),
}

struct Run {
    keyed: Vec<Duration>,
    ungated: Vec<Duration>,
    all_keyed: Duration,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"tailnode.dev/node": "web"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}],
                 "nodeSelector": {"tailnode.dev/bench": "unschedulable"}}}),
    )
    .unwrap()
}

/// Watches the node's Secrets (a key appears) and pods (the gate goes).
fn watch(ns: &TestNamespace) -> UnboundedReceiver<Seen> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let secrets: Api<Secret> = ns.api();
    let keyed = tx.clone();
    tokio::spawn(async move {
        let cfg = watcher::Config::default().labels("tailnode.dev/node=web");
        let mut stream = watcher(secrets, cfg).applied_objects().boxed();
        while let Some(Ok(s)) = stream.next().await {
            if s.data.as_ref().is_some_and(|d| d.contains_key("authkey")) {
                let pod = s.name_any().trim_start_matches("ts-").to_string();
                let _ = keyed.send(Seen::Keyed(pod, Instant::now()));
            }
        }
    });
    let pods: Api<Pod> = ns.api();
    tokio::spawn(async move {
        let cfg = watcher::Config::default().labels("tailnode.dev/node=web");
        let mut stream = watcher(pods, cfg).applied_objects().boxed();
        while let Some(Ok(p)) = stream.next().await {
            if !tailnode::inject::is_gated(p.spec.as_ref()) {
                let _ = tx.send(Seen::Ungated(p.name_any(), Instant::now()));
            }
        }
    });
    rx
}

/// Waits until every pod in `created` is keyed and ungated (or the phase ends).
async fn collect(rx: &mut UnboundedReceiver<Seen>, created: &HashMap<String, Instant>, run: &mut Run, start: Instant) {
    let mut keyed: HashMap<String, ()> = HashMap::new();
    let mut ungated: HashMap<String, ()> = HashMap::new();
    let deadline = Instant::now() + PHASE;
    while (keyed.len() < created.len() || ungated.len() < created.len()) && Instant::now() < deadline {
        let Ok(Some(seen)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await else {
            continue;
        };
        match seen {
            Seen::Keyed(p, at) => {
                if std::env::var_os("POD_TO_KEY_TRACE").is_some() {
                    eprintln!("{} keyed {p}", chrono::Utc::now().format("%H:%M:%S%.6f"));
                }
                if let Some(t) = created.get(&p)
                    && keyed.insert(p, ()).is_none()
                {
                    run.keyed.push(at.duration_since(*t));
                    run.all_keyed = run.all_keyed.max(at.duration_since(start));
                }
            }
            Seen::Ungated(p, at) => {
                if let Some(t) = created.get(&p)
                    && ungated.insert(p, ()).is_none()
                {
                    run.ungated.push(at.duration_since(*t));
                }
            }
        }
    }
}

async fn measure(
    label: &str,
    credentials: Value,
    setup: impl AsyncFnOnce(&TestNamespace),
    pods: usize,
    burst: usize,
) -> (Run, Run) {
    let h = harness();
    let op = operator();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "bench", json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    setup(&ns).await;
    let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": "web"},
        "spec": {"tags": ["tag:k8s"], "credentials": credentials}}))
    .unwrap();
    ns.api::<TailscaleNode>()
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let api: Api<Pod> = ns.api();
    // The webhook's cache learns of the node within moments: warm up with one pod.
    let mut rx = watch(&ns);
    let warm = support::eventually(Duration::from_secs(60), || async {
        api.create(&PostParams::default(), &pod("warmup")).await.ok()
    })
    .await;
    assert!(warm.is_some(), "{label}: the warm-up pod was never admitted");
    let mut created = HashMap::from([("warmup".to_string(), Instant::now())]);
    let mut ignore = Run {
        keyed: vec![],
        ungated: vec![],
        all_keyed: Duration::ZERO,
    };
    collect(&mut rx, &created, &mut ignore, Instant::now()).await;

    // One by one: each pod waits for its key and its gate before the next is created.
    let mut seq = Run {
        keyed: vec![],
        ungated: vec![],
        all_keyed: Duration::ZERO,
    };
    for i in 0..pods {
        let name = format!("s{i}");
        let t = Instant::now();
        if std::env::var_os("POD_TO_KEY_TRACE").is_some() {
            eprintln!("{} create {name}", chrono::Utc::now().format("%H:%M:%S%.6f"));
        }
        api.create(&PostParams::default(), &pod(&name)).await.unwrap();
        created = HashMap::from([(name, t)]);
        collect(&mut rx, &created, &mut seq, t).await;
    }
    // A burst: all at once (16 creates in flight, as a ReplicaSet controller would).
    let start = Instant::now();
    let names: Vec<String> = (0..burst).map(|i| format!("b{i}")).collect();
    let stamps: Vec<(String, Instant)> = futures::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            async move {
                let t = Instant::now();
                api.create(&PostParams::default(), &pod(&name)).await.unwrap();
                (name, t)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let created: HashMap<String, Instant> = stamps.into_iter().collect();
    let mut bur = Run {
        keyed: vec![],
        ungated: vec![],
        all_keyed: Duration::ZERO,
    };
    collect(&mut rx, &created, &mut bur, start).await;
    for r in [&mut seq, &mut bur] {
        r.keyed.sort();
        r.ungated.sort();
    }
    println!(
        "{label}: one by one, {} of {pods} keyed: median {:.0} ms, p99 {:.0} ms; gate open median {:.0} ms, p99 {:.0} ms",
        seq.keyed.len(),
        ms(pct(&seq.keyed, 0.5)),
        ms(pct(&seq.keyed, 0.99)),
        ms(pct(&seq.ungated, 0.5)),
        ms(pct(&seq.ungated, 0.99)),
    );
    println!(
        "{label}: burst, {} of {burst} keyed, all within {:.1} s: median {:.0} ms, p99 {:.0} ms; {} gates open, median {:.0} ms",
        bur.keyed.len(),
        bur.all_keyed.as_secs_f64(),
        ms(pct(&bur.keyed, 0.5)),
        ms(pct(&bur.keyed, 0.99)),
        bur.ungated.len(),
        ms(pct(&bur.ungated, 0.5)),
    );
    assert_eq!(seq.keyed.len(), pods, "{label}: not every sequential pod was keyed");
    assert_eq!(bur.keyed.len(), burst, "{label}: not every burst pod was keyed");
    ns.cleanup().await;
    (seq, bur)
}

#[tokio::main]
async fn main() {
    let nums: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let pods = nums.first().copied().unwrap_or(50).clamp(1, 100);
    let burst = nums.get(1).copied().unwrap_or(200).clamp(1, 500);
    let h = harness();
    install_crd(&h.client().await).await;

    let fake = FakeTailscale::start(FakeConfig {
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        client_tags: vec!["tag:k8s".into()],
    })
    .await;
    let oauth = json!({"oauth": {"secretName": "oauth", "apiURL": fake.url()}});
    let (seq, bur) = measure(
        "contract fake",
        oauth,
        async |ns: &TestNamespace| {
            let s: Secret = serde_json::from_value(json!({"metadata": {"name": "oauth"},
                "stringData": {"client_id": "cid", "client_secret": "csecret"}}))
            .unwrap();
            ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
        },
        pods,
        burst,
    )
    .await;
    let ledger = fake.ledger();
    println!(
        "contract fake: mints {} for {} pods (+1 warm-up), OAuth tokens {}",
        ledger.mints.len(),
        pods + burst,
        ledger.tokens_issued
    );

    let hs =
        json!({"headscale": {"url": h.headscale_url, "apiKeySecretName": "headscale", "user": h.headscale_user_id}});
    let key = h.headscale_api_key.clone();
    let (hseq, hbur) = measure(
        "headscale",
        hs,
        async move |ns: &TestNamespace| {
            let s: Secret =
                serde_json::from_value(json!({"metadata": {"name": "headscale"}, "stringData": {"api-key": key}}))
                    .unwrap();
            ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
        },
        pods,
        burst,
    )
    .await;
    println!(
        "pod_to_key_headscale pods={pods} median_ms={:.0} p99_ms={:.0} burst_pods={burst} burst_all_keyed_s={:.1}",
        ms(pct(&hseq.keyed, 0.5)),
        ms(pct(&hseq.keyed, 0.99)),
        hbur.all_keyed.as_secs_f64()
    );
    println!(
        "pod_to_key pods={pods} median_ms={:.0} p99_ms={:.0} burst_pods={burst} burst_all_keyed_s={:.1}",
        ms(pct(&seq.keyed, 0.5)),
        ms(pct(&seq.keyed, 0.99)),
        bur.all_keyed.as_secs_f64()
    );
    std::process::exit(0);
}
