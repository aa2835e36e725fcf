//! Crash chaos (issue 12, item 1). While labelled pods of StatefulSets and Deployments are
//! created and deleted, the operator is killed with SIGKILL at random moments and restarted at
//! once. It runs here as a process of its own (the `tailnode` binary, as in its pod) so that a
//! kill is a real crash and the restart has no kubelet back-off in front of it. Half of the pods
//! register a device: Headscale's node-creation API (`/api/v1/debug/node` + `/api/v1/auth/register`)
//! plays containerboot's login, and the test writes the device into the pod's state Secret as
//! containerboot does. The pods never run (a node selector nothing matches): what is under test
//! is the operator's bookkeeping, not the node.
//!
//! After the churn the operator settles, and the test checks what the apiserver and Headscale
//! hold (not what the operator says): every live pod has its state Secret with a key or a device;
//! every device of a pod that is gone is deleted and none of a live pod is; no state Secret
//! outlives its pod; the keys Headscale issued beyond one per keyed pod are at most the crashes.
//! Last line: `chaos crashes=.. pods=.. unkeyed=0 leaked_devices=0 orphan_secrets=0 extra_mints=..`.
//!
//! Size: `TAILNODE_CHAOS_PODS` (default 40) and `TAILNODE_CHAOS_CRASHES` (default 6), seed
//! `TAILNODE_CHAOS_SEED`; `e2e/local/chaos` runs 200 pods and 20 crashes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use support::operator::{Operator, prepare, spawn_process, wait_ready};
use support::*;
use tailnode::api::TailscaleNode;

/// Pods per workload.
const REPLICAS: usize = 5;
/// The tag of this test's keys: Headscale's list of pre-auth keys is searched for it.
const TAG: &str = "tag:chaos";

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: reproducible random moments from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, bound)`.
    fn below(&mut self, bound: Duration) -> Duration {
        let ms = bound.as_millis().max(1) as u64;
        Duration::from_millis(self.next() % ms)
    }
}

/// Starts the operator binary against the harness.
fn spawn(h: &Harness, op: &Operator) -> Child {
    let flags = ["--identity=chaos-operator".to_string()];
    spawn_process(
        h,
        op,
        env!("CARGO_BIN_EXE_tailnode"),
        &h.kubeconfig,
        &flags,
        "chaos-operator",
    )
}

/// A workload of `REPLICAS` pods that never run; StatefulSets start them all at once.
fn workload(i: usize) -> (bool, String, Value) {
    let sts = i.is_multiple_of(2);
    let name = format!("w{i}");
    let template = json!({"metadata": {"labels": {"app": name, "tailnode.dev/node": "web"}},
        "spec": {"nodeSelector": {"tailnode-e2e/never": "true"}, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": "localhost/busybox:e2e"}]}});
    let mut spec = json!({"replicas": REPLICAS, "selector": {"matchLabels": {"app": name}}, "template": template});
    if sts {
        spec["serviceName"] = json!(name);
        spec["podManagementPolicy"] = json!("Parallel");
    }
    (sts, name.clone(), json!({"metadata": {"name": name}, "spec": spec}))
}

async fn create_workload(ns: &TestNamespace, i: usize) {
    let (sts, _, obj) = workload(i);
    if sts {
        ns.create::<StatefulSet>(obj).await;
    } else {
        ns.create::<Deployment>(obj).await;
    }
}

async fn delete_workload(ns: &TestNamespace, i: usize) {
    let (sts, name, _) = workload(i);
    let dp = DeleteParams::foreground();
    if sts {
        let _ = ns.api::<StatefulSet>().delete(&name, &dp).await;
    } else {
        let _ = ns.api::<Deployment>().delete(&name, &dp).await;
    }
}

async fn scale_workload(ns: &TestNamespace, i: usize, replicas: usize) {
    let (sts, name, _) = workload(i);
    let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
    if sts {
        let _ = ns
            .api::<StatefulSet>()
            .patch(&name, &PatchParams::default(), &patch)
            .await;
    } else {
        let _ = ns
            .api::<Deployment>()
            .patch(&name, &PatchParams::default(), &patch)
            .await;
    }
}

/// Half of the pods register: chosen by name, so a pod's fate does not depend on timing.
fn registers(pod: &str) -> bool {
    pod.bytes().map(u32::from).sum::<u32>() % 2 == 0
}

/// Plays containerboot's login for one pod whose Secret holds a key: a node in Headscale, its id
/// and addresses in the Secret, the key taken out. Returns the device id, or None when the pod or
/// its Secret went away first (then the node it made is deleted again, as nobody knows of it).
async fn register(h: &Harness, ns: &TestNamespace, pod: &str) -> Option<String> {
    let hs = h.headscale();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = Rng(unique(pod)
        .bytes()
        .fold(0x9E37_79B9_7F4A_7C15, |a, b| a.rotate_left(5) ^ u64::from(b)));
    let id: String = (0..24).map(|_| alphabet[(rng.next() % 62) as usize] as char).collect();
    let auth_id = format!("hskey-authreq-{id}");
    let user = h
        .vars
        .get("TAILNODE_HEADSCALE_USER")
        .cloned()
        .unwrap_or_else(|| "tailnode".into());
    let body = json!({"user": user, "key": auth_id, "name": pod});
    hs.request(reqwest::Method::POST, "/api/v1/debug/node")
        .json(&body)
        .send()
        .await
        .ok()?;
    let body = json!({"user": user, "authId": auth_id});
    let resp = hs
        .request(reqwest::Method::POST, "/api/v1/auth/register")
        .json(&body)
        .send()
        .await
        .ok()?;
    let node: Value = resp.json().await.ok()?;
    let device = node["node"]["id"].as_str()?.to_string();
    let ips = node["node"]["ipAddresses"].to_string();
    let patch = json!({"data": {"authkey": null}, "stringData": {"device_id": device,
        "device_fqdn": format!("{pod}.chaos.test."), "device_ips": ips}});
    let written = ns
        .api::<Secret>()
        .patch(&format!("ts-{pod}"), &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    if written.is_err() {
        let _ = hs
            .request(reqwest::Method::DELETE, &format!("/api/v1/node/{device}"))
            .send()
            .await;
        return None;
    }
    Some(device)
}

/// Devices registered by the test: pod -> Headscale node id.
type Registered = Arc<Mutex<BTreeMap<String, String>>>;

/// Registers the pods whose turn it is, every half second, until `stop`.
async fn registrar(
    h: Harness,
    ns_name: String,
    client: kube::Client,
    registered: Registered,
    stop: Arc<tokio::sync::Notify>,
) {
    let ns = TestNamespace::existing(&client, &ns_name);
    let secrets = ns.api::<Secret>();
    let pods = ns.api::<Pod>();
    let lp = ListParams::default().labels("tailnode.dev/node=web");
    loop {
        if let Ok(list) = secrets.list(&lp).await {
            for s in list.items {
                let Some(pod) = s.name_any().strip_prefix("ts-").map(str::to_string) else {
                    continue;
                };
                let done = registered.lock().unwrap().contains_key(&pod);
                if done || !registers(&pod) || data(&s, "authkey").is_none() || data(&s, "device_id").is_some() {
                    continue;
                }
                // Only a pod that exists (and is not being deleted) logs in.
                let live = pods.get_opt(&pod).await.ok().flatten();
                if live.is_none_or(|p| p.metadata.deletion_timestamp.is_some()) {
                    continue;
                }
                if let Some(device) = register(&h, &ns, &pod).await {
                    registered.lock().unwrap().insert(pod, device);
                }
            }
        }
        tokio::select! {
            _ = stop.notified() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// What the apiserver and Headscale hold once the operator settled.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    unkeyed: Vec<String>,
    leaked_devices: Vec<String>,
    lost_devices: Vec<String>,
    orphan_secrets: Vec<String>,
}

async fn outcome(h: &Harness, ns: &TestNamespace, registered: &Registered) -> Option<Outcome> {
    let live: BTreeSet<String> = ns
        .api::<Pod>()
        .list(&ListParams::default().labels("tailnode.dev/node=web"))
        .await
        .ok()?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    let secrets: BTreeMap<String, Secret> = ns
        .api::<Secret>()
        .list(&ListParams::default().labels("tailnode.dev/node=web"))
        .await
        .ok()?
        .items
        .into_iter()
        .filter_map(|s| Some((s.name_any().strip_prefix("ts-")?.to_string(), s)))
        .collect();
    let devices: BTreeSet<String> = h
        .headscale()
        .nodes()
        .await
        .iter()
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect();
    let keyed = |s: &Secret| data(s, "authkey").is_some() || data(s, "device_id").is_some();
    let registered = registered.lock().unwrap().clone();
    Some(Outcome {
        unkeyed: live
            .iter()
            .filter(|p| !secrets.get(*p).is_some_and(keyed))
            .cloned()
            .collect(),
        leaked_devices: registered
            .iter()
            .filter(|(pod, id)| !live.contains(*pod) && devices.contains(*id))
            .map(|(pod, _)| pod.clone())
            .collect(),
        lost_devices: registered
            .iter()
            .filter(|(pod, id)| live.contains(*pod) && !devices.contains(*id))
            .map(|(pod, _)| pod.clone())
            .collect(),
        orphan_secrets: secrets.keys().filter(|p| !live.contains(*p)).cloned().collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_crashes_under_pod_churn_lose_nothing() {
    let pods = setting("TAILNODE_CHAOS_PODS", 40) as usize;
    let crashes = setting("TAILNODE_CHAOS_CRASHES", 6) as usize;
    let seed = setting("TAILNODE_CHAOS_SEED", u64::from(std::process::id()) | 1);
    let workloads = pods.div_ceil(REPLICAS);
    // Half a second per pod, at least 30 s: long enough for every crash to land amid the churn.
    let churn = Duration::from_millis(500 * pods as u64).max(Duration::from_secs(30));
    println!("chaos seed={seed} pods={pods} crashes={crashes} churn={churn:?}");
    let mut rng = Rng(seed);

    let h = harness();
    let client = h.client().await;
    install_crd(&client).await;
    let op = prepare(h).await;
    let ns = TestNamespace::new(&client, "chaos", json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    ns.create::<Secret>(json!({"metadata": {"name": "headscale"}, "stringData": {"api-key": h.headscale_api_key}}))
        .await;
    ns.create::<TailscaleNode>(json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web"}, "spec": {"tags": [TAG], "credentials": {"headscale": {
            "url": h.headscale_url, "apiKeySecretName": "headscale", "user": h.headscale_user_id}}}}))
        .await;
    let started = chrono::Utc::now();
    let mut child = spawn(h, &op);
    wait_ready(h, &op).await;

    // Every pod whose Secret ever held a key, from a watch (a pod keyed and gone between two
    // polls still counts).
    let keyed_pods: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let seen = keyed_pods.clone();
    let watch = tokio::spawn(
        watcher(
            ns.api::<Secret>(),
            watcher::Config::default().labels("tailnode.dev/node=web"),
        )
        .applied_objects()
        .for_each(move |s| {
            if let Ok(s) = s
                && (data(&s, "authkey").is_some() || data(&s, "device_id").is_some())
                && let Some(pod) = s.name_any().strip_prefix("ts-")
            {
                seen.lock().unwrap().insert(pod.to_string());
            }
            std::future::ready(())
        }),
    );
    let registered: Registered = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let registrar = tokio::spawn(registrar(
        h.clone(),
        ns.name.clone(),
        client.clone(),
        registered.clone(),
        stop.clone(),
    ));

    // The script: workloads created over the first 60% of the churn; half of them deleted and a
    // quarter scaled down to 2 later on; the crashes anywhere in it.
    #[derive(Debug)]
    enum Step {
        Create(usize),
        Delete(usize),
        ScaleDown(usize),
        Crash,
    }
    let mut steps: Vec<(Duration, Step)> = Vec::new();
    for i in 0..workloads {
        let at = churn.mul_f64(0.6 * i as f64 / workloads as f64);
        steps.push((at, Step::Create(i)));
        let later = at + Duration::from_secs(3) + rng.below(churn.saturating_sub(at));
        match i % 4 {
            0 | 1 => steps.push((later, Step::Delete(i))),
            2 => steps.push((later, Step::ScaleDown(i))),
            _ => {}
        }
    }
    for _ in 0..crashes {
        steps.push((rng.below(churn), Step::Crash));
    }
    steps.sort_by_key(|(at, _)| *at);
    let t0 = Instant::now();
    let mut crashed = 0;
    for (at, step) in steps {
        tokio::time::sleep_until((t0 + at).into()).await;
        match step {
            Step::Create(i) => create_workload(&ns, i).await,
            Step::Delete(i) => delete_workload(&ns, i).await,
            Step::ScaleDown(i) => scale_workload(&ns, i, 2).await,
            Step::Crash => {
                child.kill().expect("SIGKILL the operator");
                child.wait().unwrap();
                child = spawn(h, &op);
                crashed += 1;
            }
        }
    }
    println!("churn done in {:.1}s ({crashed} crashes)", t0.elapsed().as_secs_f64());

    // Settle: the workloads' controllers finish, the operator converges.
    let settled = eventually(Duration::from_secs(240), || async {
        let o = outcome(h, &ns, &registered).await?;
        let quiet = o == Outcome::default();
        quiet.then_some(o)
    })
    .await;
    stop.notify_one();
    let _ = registrar.await;
    watch.abort();
    let last = match settled {
        Some(o) => o,
        None => outcome(h, &ns, &registered).await.unwrap_or_default(),
    };
    let keys = h
        .headscale()
        .preauth_keys()
        .await
        .into_iter()
        .filter(|k| k["aclTags"].as_array().is_some_and(|t| t.iter().any(|t| t == TAG)))
        .filter(|k| {
            k["createdAt"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= started)
        })
        .count();
    let keyed = keyed_pods.lock().unwrap().len();
    let devices = registered.lock().unwrap().len();
    let extra = keys.saturating_sub(keyed);
    println!("pods keyed={keyed} keys issued={keys} devices registered={devices}");
    println!(
        "chaos crashes={crashed} pods={} unkeyed={} leaked_devices={} orphan_secrets={} extra_mints={extra}",
        workloads * REPLICAS,
        last.unkeyed.len(),
        last.leaked_devices.len(),
        last.orphan_secrets.len()
    );
    assert_eq!(last, Outcome::default(), "not converged after the churn");
    assert!(
        extra <= crashed,
        "{extra} keys beyond one per pod, with {crashed} crashes"
    );
    assert!(
        devices > 0,
        "no pod registered a device: the test proved nothing about devices"
    );

    // Leave nothing behind: the operator takes the node's devices and keys away, then stops.
    let gone = ns.delete_node("web").await;
    child.kill().ok();
    child.wait().ok();
    assert!(gone, "the TailscaleNode was not cleaned up");
    ns.cleanup().await;
}
