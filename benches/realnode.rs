//! The real node, measured: Node Ready time (from `e2e/local/up`), and for N injected pods
//! created at once on the chart-installed operator: CREATE -> gate opened (scheduled), -> Running,
//! -> Ready (the sidecar's probes passed), -> joined (device in its Secret); then the memory the
//! harness uses (RSS from /proc: control plane, node, pods). Bounded: N pods (default 10, at
//! most 40), 5 minutes. Client clock throughout (creationTimestamp has 1 s resolution).
//!
//! `cargo bench --features harness --bench realnode -- [PODS]` (starts or reuses the local harness; needs root).
//! Last line: `realnode node_ready_s=.. pods=.. scheduled_p50_s=.. running_p50_s=.. ready_p50_s=..
//! ready_max_s=.. joined_p50_s=.. harness_rss_mb=.. pods_rss_mb=..`
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

// The scenarios' cluster helpers (tests/e2e); the benchmark uses a part of them.
#[path = "../tests/e2e/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/e2e/workloads.rs"]
#[allow(dead_code)]
mod workloads;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

#[derive(Default, Debug)]
struct Times {
    scheduled: Option<Duration>,
    running: Option<Duration>,
    ready: Option<Duration>,
    joined: Option<Duration>,
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// RSS in MiB of a pid (0 if it is gone).
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Pids of every process in a cgroup-v1 subtree (the node's pods live under one).
fn cgroup_pids(dir: &std::path::Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.parse::<u32>().ok()));
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            cgroup_pids(&entry.path(), out);
        }
    }
}

/// (harness processes by name, pods) RSS in MiB.
fn memory(dir: &std::path::Path) -> (BTreeMap<String, f64>, f64) {
    let mut by_name = BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("pids")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().trim_end_matches(".pid").to_string();
        let pid: u32 = std::fs::read_to_string(entry.path())
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        by_name.insert(name, rss_mb(pid));
    }
    let sock = dir.join("node/run/containerd.sock");
    let shims: f64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("containerd-shim") && cmd.contains(&*sock.to_string_lossy())
        })
        .map(rss_mb)
        .sum();
    by_name.insert("containerd-shims".into(), shims);
    let mut pids = Vec::new();
    cgroup_pids(std::path::Path::new("/sys/fs/cgroup/memory/tailnode-e2e"), &mut pids);
    let pods = pids.into_iter().map(rss_mb).sum();
    (by_name, pods)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10)
        .clamp(1, 40);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n));
}

async fn run(n: usize) {
    tailnode::install_crypto_provider();
    let h = support::harness();
    let c = cluster::Cluster::from_env();
    let timings = std::fs::read_to_string(h.dir.join("timings")).unwrap_or_default();
    let node_ready: f64 = timings
        .lines()
        .find_map(|l| l.strip_prefix("node_ready_s="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    workloads::install_operator(&c).await;
    let ns = cluster::Ns::new(&c, "bench", json!({})).await;
    workloads::node(&ns, "bench", json!({"tags": ["tag:k8s"]})).await;
    let pods: Api<Pod> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let mut pod_events = watcher(pods.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let mut secret_events = watcher(secrets, watcher::Config::default()).applied_objects().boxed();
    let t0 = Instant::now();
    ns.create::<k8s_openapi::api::apps::v1::Deployment>(json!({"metadata": {"name": "bench"}, "spec": {
        "replicas": n, "selector": {"matchLabels": {"app": "bench"}},
        "template": {"metadata": {"labels": {"app": "bench", "tailnode.dev/node": "bench"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [workloads::app_container(&c, "bench")]}}}}))
        .await;
    let mut times: BTreeMap<String, Times> = BTreeMap::new();
    let deadline = t0 + Duration::from_secs(300);
    let done = |times: &BTreeMap<String, Times>| {
        times.len() == n && times.values().all(|t| t.ready.is_some() && t.joined.is_some())
    };
    while !done(&times) && Instant::now() < deadline {
        tokio::select! {
            Some(Ok(p)) = pod_events.next() => {
                let t = times.entry(p.name_any()).or_default();
                let now = t0.elapsed();
                let st = p.status.as_ref();
                if t.scheduled.is_none() && p.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
                    t.scheduled = Some(now);
                }
                if t.running.is_none() && st.and_then(|s| s.phase.as_deref()) == Some("Running") {
                    t.running = Some(now);
                }
                if t.ready.is_none() && cluster::is_ready(&p) {
                    t.ready = Some(now);
                }
            }
            Some(Ok(s)) = secret_events.next() => {
                let pod = s.name_any().trim_start_matches("ts-").to_string();
                if cluster::data(&s, "device_id").is_some() {
                    let t = times.entry(pod).or_default();
                    t.joined.get_or_insert(t0.elapsed());
                }
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    assert!(
        done(&times),
        "not every pod became Ready and joined within 5 minutes: {times:?}"
    );
    let col = |f: fn(&Times) -> Option<Duration>| -> Vec<f64> {
        times.values().filter_map(f).map(|d| d.as_secs_f64()).collect()
    };
    let (sched, running, ready, joined) = (
        col(|t| t.scheduled),
        col(|t| t.running),
        col(|t| t.ready),
        col(|t| t.joined),
    );
    println!("{n} injected pods created at once (one Deployment), client clock from the create call:");
    for (name, v) in [
        ("gate opened (scheduled)", &sched),
        ("Running", &running),
        ("Ready", &ready),
        ("joined", &joined),
    ] {
        println!(
            "  {name:<24} p50 {:.2} s  p90 {:.2} s  max {:.2} s",
            pct(v.clone(), 0.5),
            pct(v.clone(), 0.9),
            pct(v.clone(), 1.0)
        );
    }
    let (procs, pods_mb) = memory(&h.dir);
    let harness_mb: f64 = procs.values().sum();
    println!("memory (RSS) with {n} injected pods running:");
    for (name, mb) in &procs {
        println!("  {name:<24} {mb:>7.1} MiB");
    }
    println!(
        "  {:<24} {pods_mb:>7.1} MiB  ({:.1} MiB per pod)",
        "pods",
        pods_mb / n as f64
    );
    ns.delete().await;
    workloads::uninstall_operator(&c).await;
    println!(
        "realnode node_ready_s={node_ready:.2} pods={n} scheduled_p50_s={:.2} running_p50_s={:.2} ready_p50_s={:.2} ready_max_s={:.2} joined_p50_s={:.2} harness_rss_mb={harness_mb:.0} pods_rss_mb={pods_mb:.0}",
        pct(sched, 0.5),
        pct(running, 0.5),
        pct(ready.clone(), 0.5),
        pct(ready, 1.0),
        pct(joined, 0.5),
    );
}
