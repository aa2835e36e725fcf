//! tailnode and Tailscale's own operator (`tailscale.com/cmd/k8s-operator`, built from the module
//! by `e2e/local/tools official`) on the same work, on the same harness, one after the other,
//! both as processes with a ServiceAccount of their own that the apiserver audits:
//! - the official operator: an egress ProxyGroup of N replicas (it writes a state and a config
//!   Secret per replica and mints a key into each config; its pods are never run: a ProxyClass
//!   nodeSelector no node matches keeps them Pending);
//! - tailnode: a StatefulSet of N replicas (podManagementPolicy Parallel, the same nodeSelector)
//!   labelled for a TailscaleNode: a state Secret per replica with a minted key.
//!
//! Both mint through the same key API: `e2e/local/tsapi-shim.py`, which serves the Tailscale v2
//! API (OAuth token, auth keys, devices) over Headscale's v1 API, passes the control protocol
//! through to Headscale (the official operator joins the tailnet with tsnet before it
//! reconciles) and counts each OAuth client's tokens, mints and calls. Measured per N: from the
//! create call to every replica keyed (client clock at the watch event), each operator's peak RSS
//! (VmHWM from /proc), apiserver requests (the audit log, by ServiceAccount) and key-API calls.
//! Bounded: N ≤ 200, 5 minutes per run. Nothing touches a public address: the official operator
//! runs with `TS_NO_LOGS_NO_SUPPORT=true` against the harness's Headscale (local DERP map only).
//!
//! `bash e2e/local/bench-vs-official [N...]` (default 10 100) builds the official operator and
//! runs this. Last line, for the largest N:
//! `vs_official replicas=.. tailnode_s=.. official_s=.. speedup=.. tailnode_rss_mb=.. official_rss_mb=.. memory_ratio=..`
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::bench::{audited, identity, rss_mb, user};
use support::operator::{prepare, spawn_process, wait_ready};
use support::{Harness, eventually, free_port, harness, install_crd, unique};
use tailnode::api::TailscaleNode;

const RUN: Duration = Duration::from_secs(300);

/// One operator's result for one N.
struct Measured {
    replicas: usize,
    keyed_s: f64,
    requests: usize,
    top: Vec<(String, usize)>,
    key_calls: u64,
    mints: u64,
    tokens: u64,
}

/// The key-API shim, as a child process.
struct Shim {
    child: Child,
    url: String,
}

impl Shim {
    fn start(h: &Harness, mode: &str) -> Shim {
        let port = free_port();
        let backend = h.headscale_url.trim_start_matches("http://").to_string();
        let log = std::fs::File::create(h.dir.join(format!("logs/tsapi-shim-{mode}.log"))).unwrap();
        let child = Command::new("python3")
            .arg(support::repo_root().join("e2e/local/tsapi-shim.py"))
            .arg(format!("127.0.0.1:{port}"))
            .arg(backend)
            .arg(h.dir.join("headscale.apikey"))
            .arg(&h.headscale_user_id)
            .arg(mode)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("python3 e2e/local/tsapi-shim.py");
        Shim {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// (tokens, mints, calls) of OAuth client `client` so far.
    async fn stats(&self, client: &str) -> (u64, u64, u64) {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let v: Value = eventually(Duration::from_secs(10), || async {
            http.get(format!("{}/shim/stats", self.url))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()
        })
        .await
        .expect("the shim answers /shim/stats");
        let n = |f: &str| v[client][f].as_u64().unwrap_or(0);
        (n("tokens"), n("mints"), n("calls"))
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_path(name: &str) -> PathBuf {
    let v = std::env::var_os(name).unwrap_or_else(|| {
        panic!("{name} is not set: run `bash e2e/local/bench-vs-official`, which builds Tailscale's operator")
    });
    PathBuf::from(v)
}

async fn apply_crds(h: &Harness, dir: &Path) {
    let (ok, _, err) = h.run(
        "kubectl",
        &["apply", "--server-side", "-f", support::path_str(dir)],
        None,
    );
    assert!(ok, "applying Tailscale's CRDs from {}: {err}", dir.display());
}

fn dynamic(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "tailscale.com".into(),
        version: "v1alpha1".into(),
        api_version: "tailscale.com/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::all_with(client.clone(), &ar)
}

/// Waits until `count` Secrets in `ns` whose name `keyed` accepts hold a key; seconds from `t0`.
async fn keyed_within(
    client: &Client,
    ns: &str,
    t0: Instant,
    count: usize,
    keyed: impl Fn(&Secret) -> bool,
) -> Option<f64> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut stream = watcher(api, watcher::Config::default()).applied_objects().boxed();
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + RUN;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await.ok()??;
        let Ok(s) = next else { continue };
        if keyed(&s) && seen.insert(s.name_any()) && seen.len() == count {
            return Some(t0.elapsed().as_secs_f64());
        }
    }
}

/// True when a ProxyGroup config Secret's tailscaled config carries an auth key.
fn config_has_key(s: &Secret) -> bool {
    s.data.iter().flatten().any(|(k, v)| {
        k.starts_with("cap-")
            && serde_json::from_slice::<Value>(&v.0)
                .ok()
                .and_then(|c| c["AuthKey"].as_str().map(|k| !k.is_empty()))
                .unwrap_or(false)
    })
}

/// One operator's result for `n` replicas: `keyed` is seconds from 300 ms before the create call
/// (the watch's head start) to every replica keyed; requests since `since` (after a 2 s settle)
/// and the shim's counts for `client` beyond `before`.
#[allow(clippy::too_many_arguments)]
async fn measured(
    h: &Harness,
    shim: &Shim,
    who: &str,
    account: &str,
    client: &str,
    n: usize,
    keyed: Option<f64>,
    since: chrono::DateTime<chrono::Utc>,
    before: (u64, u64, u64),
) -> Measured {
    let keyed_s = keyed.unwrap_or_else(|| panic!("{who}: {n} replicas not keyed within {}s", RUN.as_secs())) - 0.3;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (requests, top) = audited(h, &user(account), since, chrono::Utc::now());
    let (tokens, mints, calls) = shim.stats(client).await;
    Measured {
        replicas: n,
        keyed_s,
        requests,
        top,
        key_calls: calls - before.2,
        mints: mints - before.1,
        tokens: tokens - before.0,
    }
}

async fn official(h: &Harness, client: &Client, shim: &Shim, counts: &[usize]) -> (Vec<Measured>, f64) {
    let binary = env_path("TAILNODE_OFFICIAL_OPERATOR");
    apply_crds(h, &env_path("TAILNODE_OFFICIAL_CRDS")).await;
    let kubeconfig = identity(h, client, "official").await;
    let id = unique("official");
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": id}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let home = h.dir.join(&id);
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("client_id"), "official").unwrap();
    std::fs::write(home.join("client_secret"), "official-secret").unwrap();
    let log_path = h.dir.join("logs/official-operator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(&binary)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("KUBECONFIG", &kubeconfig)
        .env("OPERATOR_NAMESPACE", &id)
        .env("OPERATOR_HOSTNAME", &id)
        .env("OPERATOR_LOGIN_SERVER", &shim.url)
        .env("CLIENT_ID_FILE", home.join("client_id"))
        .env("CLIENT_SECRET_FILE", home.join("client_secret"))
        .env("PROXY_TAGS", "tag:k8s")
        // The test sidecar image's offline settings (e2e/local/images): no log upload, no port
        // mapping probes towards the host's gateway, DERP over the harness's plain HTTP, and a
        // panic rather than a dial should anything still aim at Tailscale's control plane.
        .env("TS_NO_LOGS_NO_SUPPORT", "true")
        .env("TS_DISABLE_PORTMAPPER", "1")
        .env("TS_DEBUG_USE_DERP_HTTP", "1")
        .env("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start Tailscale's operator");
    let pid = child.id();
    // Started: joined the tailnet, reconcilers running, caches synced (a ProxyClass is Ready).
    let classes = dynamic(client, "ProxyClass", "proxyclasses");
    let class_name = format!("{id}-unschedulable");
    let class: DynamicObject = serde_json::from_value(json!({"apiVersion": "tailscale.com/v1alpha1",
        "kind": "ProxyClass", "metadata": {"name": class_name},
        "spec": {"statefulSet": {"pod": {"nodeSelector": {"tailnode.dev/bench": "unschedulable"}}}}}))
    .unwrap();
    classes.create(&PostParams::default(), &class).await.unwrap();
    let ready = eventually(Duration::from_secs(120), || async {
        let c = classes.get(&class_name).await.ok()?;
        let conds = c.data["status"]["conditions"].as_array()?.clone();
        conds
            .iter()
            .any(|c| c["type"] == "ProxyClassReady" && c["status"] == "True")
            .then_some(())
    })
    .await;
    if ready.is_none() {
        let _ = child.kill();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "Tailscale's operator never became ready; its log ends:\n{}",
            tail.join("\n")
        );
    }
    let groups = dynamic(client, "ProxyGroup", "proxygroups");
    let mut out = Vec::new();
    for &n in counts {
        let name = format!("{id}-pg{n}");
        let before = shim.stats("official").await;
        let since = chrono::Utc::now();
        let pg: DynamicObject = serde_json::from_value(json!({"apiVersion": "tailscale.com/v1alpha1",
            "kind": "ProxyGroup", "metadata": {"name": name},
            "spec": {"type": "egress", "replicas": n, "proxyClass": class_name}}))
        .unwrap();
        let t0 = Instant::now();
        let prefix = format!("{name}-");
        let waiting = keyed_within(client, &id, t0, n, move |s| {
            s.name_any().starts_with(&prefix) && s.name_any().ends_with("-config") && config_has_key(s)
        });
        let create = async {
            tokio::time::sleep(Duration::from_millis(300)).await; // the watch is listening
            groups.create(&PostParams::default(), &pg).await.unwrap();
        };
        let (keyed, ()) = tokio::join!(waiting, create);
        out.push(measured(h, shim, "official", "official", "official", n, keyed, since, before).await);
    }
    let (_, peak) = rss_mb(pid);
    // Clean up while it runs (its finalizers delete the devices), then stop it.
    for &n in counts {
        let _ = groups.delete(&format!("{id}-pg{n}"), &DeleteParams::default()).await;
    }
    let _ = eventually(Duration::from_secs(60), || async {
        groups
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    let _ = classes.delete(&class_name, &DeleteParams::default()).await;
    let _ = child.kill();
    let _ = child.wait();
    // Its own device (tsnet) leaves the tailnet with it.
    let hs = h.headscale();
    for node in hs.nodes().await {
        if node["name"].as_str() == Some(id.as_str()) {
            let path = format!("/api/v1/node/{}", node["id"].as_str().unwrap_or_default());
            let _ = hs.request(reqwest::Method::DELETE, &path).send().await;
        }
    }
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&id, &DeleteParams::default())
        .await;
    (out, peak)
}

async fn tailnode(h: &Harness, client: &Client, shim: &Shim, counts: &[usize]) -> (Vec<Measured>, f64) {
    install_crd(client).await;
    let kubeconfig = identity(h, client, "operator").await;
    let op = prepare(h).await;
    let mut child = spawn_process(
        h,
        &op,
        env!("CARGO_BIN_EXE_tailnode"),
        &kubeconfig,
        &[],
        "vs-official-tailnode",
    );
    let pid = child.id();
    wait_ready(h, &op).await;
    let ns = support::TestNamespace::new(client, "vs", json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    let oauth: Secret = serde_json::from_value(json!({"metadata": {"name": "oauth"},
        "stringData": {"client_id": "tailnode", "client_secret": "tailnode-secret"}}))
    .unwrap();
    ns.api::<Secret>().create(&PostParams::default(), &oauth).await.unwrap();
    let mut out = Vec::new();
    for &n in counts {
        let node_name = format!("sts{n}");
        let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
            "kind": "TailscaleNode", "metadata": {"name": node_name},
            "spec": {"tags": ["tag:k8s"], "credentials": {"oauth": {"secretName": "oauth", "apiURL": shim.url}}}}))
        .unwrap();
        ns.api::<TailscaleNode>()
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
        // The webhook knows the node once a dry run of one of its pods is admitted.
        let probe: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "probe", "labels": {"tailnode.dev/node": node_name}},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]}}))
        .unwrap();
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let pods = ns.api::<k8s_openapi::api::core::v1::Pod>();
        let known = eventually(Duration::from_secs(30), || async {
            pods.create(&dry, &probe).await.ok()
        })
        .await;
        assert!(known.is_some(), "the webhook never knew TailscaleNode {node_name}");
        let before = shim.stats("tailnode").await;
        let since = chrono::Utc::now();
        let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": node_name},
            "spec": {"replicas": n, "podManagementPolicy": "Parallel", "serviceName": node_name,
                     "selector": {"matchLabels": {"app": node_name}},
                     "template": {"metadata": {"labels": {"app": node_name, "tailnode.dev/node": node_name}},
                                  "spec": {"containers": [{"name": "app", "image": "nginx"}],
                                           "nodeSelector": {"tailnode.dev/bench": "unschedulable"}}}}});
        let prefix = format!("ts-{node_name}-");
        let t0 = Instant::now();
        let waiting = keyed_within(client, &ns.name, t0, n, move |s| {
            s.name_any().starts_with(&prefix) && s.data.as_ref().is_some_and(|d| d.contains_key("authkey"))
        });
        let create = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ns.create::<k8s_openapi::api::apps::v1::StatefulSet>(sts.clone()).await;
        };
        let (keyed, ()) = tokio::join!(waiting, create);
        out.push(measured(h, shim, "tailnode", "operator", "tailnode", n, keyed, since, before).await);
    }
    let (_, peak) = rss_mb(pid);
    // Clean up while it runs (its finalizers delete the devices), then stop it.
    let ns_name = ns.name.clone();
    ns.cleanup().await;
    let _ = eventually(Duration::from_secs(120), || async {
        let left = Api::<Namespace>::all(client.clone()).get_opt(&ns_name).await.ok()?;
        left.is_none().then_some(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    support::operator::remove(client, &op).await;
    (out, peak)
}

fn row(mode: &str, who: &str, m: &Measured, rss: f64) {
    let top: Vec<String> = m.top.iter().take(4).map(|(k, n)| format!("{k}={n}")).collect();
    println!(
        "{mode:<9} {who:<9} {:>8} {:>8.2} {:>11.0} {:>9} {:>7} {:>5} {:>6}   {}",
        m.replicas,
        m.keyed_s,
        rss,
        m.requests,
        m.key_calls,
        m.mints,
        m.tokens,
        top.join(", ")
    );
}

/// The summary line of one key mode, per N.
fn summary(label: &str, theirs: &[Measured], their_rss: f64, ours: &[Measured], our_rss: f64) -> Vec<String> {
    theirs
        .iter()
        .zip(ours)
        .map(|(t, o)| {
            format!(
                "{label} replicas={} tailnode_s={:.2} official_s={:.2} speedup={:.1} tailnode_rss_mb={:.0} official_rss_mb={:.0} memory_ratio={:.2}",
                o.replicas,
                o.keyed_s,
                t.keyed_s,
                t.keyed_s / o.keyed_s.max(0.001),
                our_rss,
                their_rss,
                our_rss / their_rss.max(0.001)
            )
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let mut counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .map(|n: usize| n.clamp(1, 200))
        .collect();
    if counts.is_empty() {
        counts = vec![10, 100];
    }
    let h = harness();
    let client = h.client().await;
    println!(
        "keys      operator  replicas  keyed_s peak_rss_mb apiserver key_api mints tokens   largest apiserver request groups"
    );
    let mut lines = Vec::new();
    // Instant keys first (what each operator costs), then Headscale's (what a user waits for).
    for (mode, label) in [("instant", "vs_official_instant_keys"), ("headscale", "vs_official")] {
        let shim = Shim::start(h, mode);
        let (theirs, their_rss) = official(h, &client, &shim, &counts).await;
        let (ours, our_rss) = tailnode(h, &client, &shim, &counts).await;
        for (t, o) in theirs.iter().zip(&ours) {
            row(mode, "official", t, their_rss);
            row(mode, "tailnode", o, our_rss);
        }
        lines.extend(summary(label, &theirs, their_rss, &ours, our_rss));
    }
    for line in lines {
        println!("{line}");
    }
    std::process::exit(0);
}
