//! Slot identity for a Deployment (`replicaIdentity: slots`), on the real node with Headscale.
//!
//! A Deployment of 2 replicas (rolling updates with maxSurge 1, maxUnavailable 0) takes slots 0
//! and 1: devices `<host>-0` and `<host>-1`. Deleting the pod of slot 0 brings a replacement that
//! waits for the old pod to go, takes slot 0 and rejoins as the same device: same Headscale node
//! id, name and tailnet IPs, and no new key (the Secret's `minted-at` is unchanged). A rollout
//! then replaces both pods: Headscale never lists more than 3 of the node's devices (replicas +
//! surge), and once the slot left without a pod has outlived the grace period (the e2e install
//! sets `slotGracePeriod=20s`) the pool is back at 2 devices and 2 slot Secrets. A slot annotation
//! in the pod template is dropped at admission, and a later change to the slot or to the identity
//! mark is refused by the pod-identity admission policy.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::cluster::{Cluster, Ns, WAIT, data, is_ready};
use crate::support;
use crate::workloads::{app_container, node};

/// The node's devices in Headscale: name, id and IPs, by name.
async fn devices(c: &Cluster, host: &str) -> Vec<(String, String, Vec<String>)> {
    let prefix = format!("{host}-");
    let mut out: Vec<_> = c
        .headscale_nodes()
        .await
        .into_iter()
        .filter_map(|n: Value| {
            let name = n["givenName"].as_str().or(n["name"].as_str())?.to_string();
            let ips = n["ipAddresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            name.starts_with(&prefix)
                .then(|| (name, n["id"].as_str().unwrap_or_default().to_string(), ips))
        })
        .collect();
    out.sort();
    out
}

fn slot(p: &Pod) -> Option<String> {
    p.annotations().get("tailnode.dev/slot").cloned()
}

/// The Deployment's pods that are not being deleted.
async fn live_pods(ns: &Ns) -> Vec<Pod> {
    let lp = ListParams::default().labels("app=web");
    let pods = ns.api::<Pod>().list(&lp).await.map(|l| l.items).unwrap_or_default();
    pods.into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn minted_at(s: &Secret) -> Option<String> {
    s.annotations().get("tailnode.dev/minted-at").cloned()
}

pub async fn slots_keep_a_deployment_s_devices(c: Cluster) {
    let ns = Ns::new(&c, "slots", json!({})).await;
    let host = support::unique("slot");
    node(&ns, "web", json!({"replicaIdentity": "slots", "hostname": host})).await;
    ns.create::<Deployment>(json!({"metadata": {"name": "web"}, "spec": {
        "replicas": 2, "selector": {"matchLabels": {"app": "web"}},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        // A slot the pods bring themselves is dropped at admission.
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "web"},
                                  "annotations": {"tailnode.dev/slot": "7"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(&c, "slots")]}}}}))
        .await;

    // Two replicas in slots 0 and 1, both registered as `<host>-0` and `<host>-1`.
    let s0 = ns
        .secret_where("ts-web-slot-0", |s| data(s, "device_id").is_some())
        .await;
    ns.secret_where("ts-web-slot-1", |s| data(s, "device_id").is_some())
        .await;
    let both = support::eventually(WAIT, || async {
        let d = devices(&c, &host).await;
        (d.len() == 2).then_some(d)
    })
    .await
    .expect("the two slots' devices in Headscale");
    let names: Vec<&str> = both.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, [format!("{host}-0"), format!("{host}-1")]);
    let id0 = data(&s0, "device_id").unwrap();
    let dev0 = both
        .iter()
        .find(|(_, id, _)| *id == id0)
        .cloned()
        .expect("slot 0's device");

    // Delete the pod of slot 0: its replacement takes slot 0 and rejoins as the same device.
    let old = support::eventually(WAIT, || async {
        live_pods(&ns)
            .await
            .into_iter()
            .find(|p| slot(p).as_deref() == Some("0") && is_ready(p))
    })
    .await
    .expect("a Ready pod in slot 0");
    ns.api::<Pod>()
        .delete(&old.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    // While the old pod still runs (terminating, its containers not yet stopped: the kubelet
    // gives a deleted pod a terminal phase once they have), no other pod holds slot 0 or has its
    // gate open without a slot: the replacement waits behind its gate.
    let overlap = std::sync::Mutex::new(Vec::new());
    let replacement = support::eventually(WAIT, || async {
        let all = ns
            .api::<Pod>()
            .list(&ListParams::default().labels("app=web"))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let old_runs = all
            .iter()
            .any(|p| p.metadata.uid == old.metadata.uid && !tailnode::controller::desired::finished(p));
        if old_runs {
            let early = all.iter().filter(|p| {
                p.metadata.uid != old.metadata.uid
                    && (slot(p).as_deref() == Some("0")
                        || (slot(p).is_none() && !tailnode::inject::is_gated(p.spec.as_ref())))
            });
            overlap.lock().unwrap().extend(early.map(|p| p.name_any()));
        }
        all.into_iter().find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata.uid != old.metadata.uid
                && slot(p).as_deref() == Some("0")
                && is_ready(p)
        })
    })
    .await
    .expect("a replacement pod Ready in slot 0");
    let overlap = overlap.into_inner().unwrap();
    assert!(
        overlap.is_empty(),
        "pods took slot 0 or started while its old pod was still there: {overlap:?}"
    );
    let s0_after = ns.api::<Secret>().get("ts-web-slot-0").await.unwrap();
    assert_eq!(
        data(&s0_after, "device_id"),
        Some(id0.clone()),
        "slot 0 has a new device"
    );
    assert_eq!(
        minted_at(&s0_after),
        minted_at(&s0),
        "a key was minted for the replacement"
    );
    let after = devices(&c, &host).await;
    assert_eq!(after.len(), 2, "devices after the replacement: {after:?}");
    assert!(
        after.contains(&dev0),
        "slot 0's device changed name or IPs: {dev0:?} -> {after:?}"
    );
    println!(
        "slots: pod {} replaced by {} as the same device {} {:?}",
        old.name_any(),
        replacement.name_any(),
        dev0.0,
        dev0.2
    );

    // The slot is set once: nobody changes it, nor the identity mark.
    for (key, value) in [
        ("tailnode.dev/slot", json!("1")),
        ("tailnode.dev/identity", Value::Null),
    ] {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        let refused = ns
            .api::<Pod>()
            .patch(&replacement.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        match refused {
            Err(kube::Error::Api(e)) => assert!(e.message.contains("never changes"), "{key}: {}", e.message),
            other => panic!("changing {key} was not refused: {other:?}"),
        }
    }

    // A rollout: never more than replicas + surge devices, and back to 2 afterwards.
    let deployments = ns.api::<Deployment>();
    let restart = json!({"spec": {"template": {"metadata": {"annotations": {"example.com/restart": "1"}}}}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Merge(&restart))
        .await
        .unwrap();
    let started = Instant::now();
    let mut most = 0;
    let rolled = loop {
        most = most.max(devices(&c, &host).await.len());
        let d = deployments.get("web").await.unwrap();
        let st = d.status.clone().unwrap_or_default();
        let pods = live_pods(&ns).await;
        let done = d.metadata.generation == st.observed_generation
            && st.updated_replicas == Some(2)
            && st.ready_replicas == Some(2)
            && st.replicas == Some(2)
            && pods.len() == 2
            && pods.iter().all(|p| p.metadata.uid != replacement.metadata.uid);
        if done {
            break Some(pods);
        }
        if started.elapsed() > Duration::from_secs(240) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let pods = rolled.expect("the rollout did not finish in 240s");
    assert!(most <= 3, "{most} devices during the rollout (replicas 2 + surge 1)");
    let slots: BTreeSet<String> = pods.iter().filter_map(slot).collect();
    assert_eq!(slots.len(), 2, "the new pods' slots: {slots:?}");
    let settled = support::eventually(WAIT, || async {
        let d = devices(&c, &host).await;
        (d.len() == 2).then_some(d)
    })
    .await;
    assert!(
        settled.is_some(),
        "the pool did not shrink back to 2 devices: {:?}",
        devices(&c, &host).await
    );
    // The device goes first, then its Secret.
    let lp = ListParams::default().labels("tailnode.dev/node=web");
    let names = || async {
        let secrets = ns.api::<Secret>().list(&lp).await.map(|l| l.items).unwrap_or_default();
        secrets.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    };
    let two = support::eventually(WAIT, || async { Some(names().await).filter(|n| n.len() == 2) }).await;
    assert!(two.is_some(), "slot Secrets after the rollout: {:?}", names().await);
    println!(
        "slots: rollout took {:.1}s, at most {most} devices, then slots {slots:?}",
        started.elapsed().as_secs_f64()
    );
    ns.delete().await;
}
