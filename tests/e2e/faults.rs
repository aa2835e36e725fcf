//! Faults on the real node, local harness only (it restarts the harness's own processes with
//! `e2e/local/restart`), against the operator installed by the chart:
//! 1. the Tailscale API (the contract fake, on the node's bridge address so that the operator's
//!    pod reaches it) answers 429 with `Retry-After`, then 500, then stalls past the client's
//!    timeout, for `TAILNODE_E2E_API_FAULT_S` seconds (default 30; `e2e/local/chaos` runs 60),
//!    while pods of a node that uses it wait behind their gates;
//! 2. the apiserver is down for 20 s (longer than the lease's renew deadline);
//! 3. Headscale is down for 10 s.
//!
//! The operator's pods are never restarted (a replica that loses the lease stands for election
//! again in-process). Prints one line:
//! `faults api_recovered_s=.. apiserver_recovered_s=.. headscale_recovered_s=.. operator_restarts=0`:
//! from the API outage's end to every waiting pod keyed and its gate open; from a new pod's
//! creation after the apiserver is back (kube-controller-manager's own recovery comes before
//! that, and is printed apart) to it registered and Ready; from Headscale's restart to a new
//! replica registered and Ready.

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
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale, Scripted};

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
/// their Secret) and Ready; returns how long that took, in all and since the newest pod was
/// created (what the cluster's own controllers took before is not tailnode's).
async fn scale_and_join(ns: &Ns, n: usize) -> (Duration, Duration) {
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
        for p in &live {
            let s = secrets
                .get_opt(&format!("ts-{}", p.metadata.name.as_deref()?))
                .await
                .ok()??;
            data(&s, "device_id")?;
        }
        live.iter().filter_map(|p| p.metadata.creation_timestamp.clone()).max()
    })
    .await;
    let newest = joined.unwrap_or_else(|| panic!("{n} replicas did not all join after the fault"));
    let since_created = k8s_openapi::jiff::Timestamp::now().duration_since(newest.0);
    (t.elapsed(), Duration::try_from(since_created).unwrap_or_default())
}

/// The Tailscale API fails for `TAILNODE_E2E_API_FAULT_S` seconds (thirds: 429 with
/// `Retry-After: 5`, 500, stalls longer than the client's 10 s timeout) while two pods of a node
/// that uses it wait behind their gates (they are never scheduled: a node selector nothing
/// matches, since their keys are the fake's). Returns the time from the outage's end to both
/// keyed with their gates open, and the keys minted beyond the two (a stalled request that the
/// fake still serves after the client gave up mints a key nobody sees).
async fn api_outage(c: &Cluster, ns: &Ns) -> (Duration, usize) {
    let fault_s: u64 = std::env::var("TAILNODE_E2E_API_FAULT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let host = c
        .headscale_in_cluster
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let ip: std::net::IpAddr = host.parse().expect("the harness's node address");
    let fake = FakeTailscale::try_start_on(
        FakeConfig {
            client_id: "cid".into(),
            client_secret: "csecret".into(),
            client_tags: vec!["tag:k8s".into()],
        },
        (ip, 0).into(),
    )
    .await
    .expect("bind the fake API on the node address");
    ns.create::<k8s_openapi::api::core::v1::Secret>(json!({"metadata": {"name": "oauth"},
        "stringData": {"client_id": "cid", "client_secret": "csecret"}}))
        .await;
    node(
        ns,
        "api",
        json!({"tags": ["tag:k8s"],
        "credentials": {"oauth": {"secretName": "oauth", "apiURL": fake.url()}}}),
    )
    .await;
    let third = Duration::from_secs(fault_s) / 3;
    let ends = fake.outage(vec![
        (third, Scripted::Status(429, Some(5))),
        (third, Scripted::Status(500, None)),
        (third, Scripted::Stall(Duration::from_secs(15))),
    ]);
    ns.create::<Deployment>(json!({"metadata": {"name": "api"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": {"app": "api"}},
        "template": {"metadata": {"labels": {"app": "api", "tailnode.dev/node": "api"}},
            "spec": {"nodeSelector": {"tailnode-e2e/never": "true"}, "containers": [app_container(c, "api")]}}}}))
        .await;
    // The failures show where the user looks while they last.
    let seen = support::eventually(Duration::from_secs(fault_s), || async {
        let c = ns.node_condition("api", "Degraded").await?;
        let reason = c["reason"].as_str()?.to_string();
        (c["status"] == "True" && reason.starts_with("Api")).then_some(reason)
    })
    .await;
    assert!(seen.is_some(), "the API outage never showed in the Degraded condition");
    let during = fake.ledger();
    assert!(
        during.mints.is_empty(),
        "a key got through during the outage: {during:?}"
    );
    tokio::time::sleep(ends.saturating_duration_since(std::time::Instant::now())).await;
    let rate_limited = fake.ledger().requests.iter().filter(|r| r.status == 429).count();
    let t = Instant::now();
    let (pods, secrets) = (ns.api::<Pod>(), ns.api::<k8s_openapi::api::core::v1::Secret>());
    let lp = ListParams::default().labels("app=api");
    let keyed = support::eventually(Duration::from_secs(120), || async {
        let ps = pods.list(&lp).await.ok()?.items;
        if ps.len() != 2 || ps.iter().any(|p| tailnode::inject::is_gated(p.spec.as_ref())) {
            return None;
        }
        for p in &ps {
            let s = secrets
                .get_opt(&format!("ts-{}", p.metadata.name.as_deref()?))
                .await
                .ok()??;
            data(&s, "authkey")?;
        }
        Some(())
    })
    .await;
    assert!(keyed.is_some(), "the waiting pods were not keyed after the API outage");
    let recovered = t.elapsed();
    // 429s are answered only during the first third; two pods that each wait the 5 s asked for
    // between attempts make at most two requests per 5 s (plus the first ones).
    let allowed = 2 * (third.as_secs() as usize / 5 + 2);
    assert!(
        rate_limited <= allowed,
        "{rate_limited} requests during {third:?} of 429s with Retry-After: 5 (allowed {allowed})"
    );
    let extra = fake.ledger().mints.len().saturating_sub(2);
    println!("requests answered 429 during {third:?} of Retry-After: 5: {rate_limited} (at most {allowed})");
    // Take the node away while its API still answers (its keys are revoked there).
    ns.api::<Deployment>().delete("api", &Default::default()).await.unwrap();
    ns.api::<tailnode::api::TailscaleNode>()
        .delete("api", &Default::default())
        .await
        .unwrap();
    let gone = support::eventually(WAIT, || async {
        let n = ns.api::<tailnode::api::TailscaleNode>().get_opt("api").await.ok()?;
        n.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "the API-backed TailscaleNode was not cleaned up");
    (recovered, extra)
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

    let (api_recovered, extra_mints) = api_outage(&c, &ns).await;
    println!(
        "API outage over -> waiting pods keyed: {:.1}s; keys minted by stalled requests the client gave up on: {extra_mints}",
        api_recovered.as_secs_f64()
    );

    // The apiserver goes away for longer than the renew deadline (7 s): the leader steps down.
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
    let (total, apiserver_recovered) = scale_and_join(&ns, 2).await;
    println!(
        "apiserver back -> new replica joined: {:.1}s ({:.1}s of it before the ReplicaSet created the pod)",
        total.as_secs_f64(),
        (total.saturating_sub(apiserver_recovered)).as_secs_f64()
    );

    // Headscale goes away: running sidecars reconnect, a new replica is keyed and joins.
    restart("headscale", 10);
    let (headscale_recovered, _) = scale_and_join(&ns, 3).await;

    let restarts = operator_restarts(&c).await - restarts_before;
    println!(
        "faults api_recovered_s={:.1} apiserver_recovered_s={:.1} headscale_recovered_s={:.1} operator_restarts={restarts}",
        api_recovered.as_secs_f64(),
        apiserver_recovered.as_secs_f64(),
        headscale_recovered.as_secs_f64()
    );
    assert_eq!(restarts, 0, "the operator's containers restarted during the faults");
    ns.delete().await;
}
