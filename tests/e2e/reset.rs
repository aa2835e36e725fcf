//! Reset on demand, on the real node: `tailnode.dev/reset=<new value>` on a pod gives its replica
//! a new device. A StatefulSet pod is evicted, comes back under the same name and Secret, and
//! joins as a new device (new id in Headscale, the old one deleted), its state cleared only after
//! the old pod was gone. A Deployment's pod is evicted and replaced by a pod that joins as a new
//! device, the old device deleted. A bare pod is refused with an Event and keeps running.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

use crate::cluster::{Cluster, Ns, WAIT, data, is_ready};
use crate::support;
use crate::workloads::{app_container, db_statefulset};
use tailnode::api::TailscaleNode;

async fn ask_reset(ns: &Ns, pod: &str, value: &str) {
    let patch = json!({"metadata": {"annotations": {"tailnode.dev/reset": value}}});
    ns.api::<Pod>()
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The Events of the namespace with this reason, as their notes.
async fn events(ns: &Ns, reason: &str) -> Vec<String> {
    let list = ns
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&ListParams::default())
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

pub async fn reset_gives_a_new_device(c: Cluster) {
    let ns = Ns::new(&c, "reset", json!({})).await;
    db_statefulset(&c, &ns).await;
    ns.create::<Deployment>(json!({"metadata": {"name": "web"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "db"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(&c, "web")]}}}}))
        .await;
    let db0 = ns.pod_where("db-0", "Ready", is_ready).await;
    let old = data(
        &ns.secret_where("ts-db-0", |s| data(s, "device_id").is_some()).await,
        "device_id",
    )
    .unwrap();
    let web = ns.ready_pod("web").await.name_any();
    let web_secret = format!("ts-{web}");
    let old_web = data(
        &ns.secret_where(&web_secret, |s| data(s, "device_id").is_some()).await,
        "device_id",
    )
    .unwrap();

    // The StatefulSet's pod: evicted, back under its name as a new device.
    ask_reset(&ns, "db-0", "1").await;
    let old_uid = db0.metadata.uid.clone();
    ns.pod_where("db-0", "recreated and Ready", |p| {
        p.metadata.uid != old_uid && is_ready(p)
    })
    .await;
    let s = ns
        .secret_where("ts-db-0", |s| data(s, "device_id").is_some_and(|d| d != old))
        .await;
    let new = data(&s, "device_id").unwrap();
    assert!(c.headscale_node(&new).await.is_some(), "Headscale lists the new device");
    let gone = support::eventually(WAIT, || async { c.headscale_node(&old).await.is_none().then_some(()) }).await;
    assert!(gone.is_some(), "the old device {old} is still in Headscale");
    let shown = support::eventually(WAIT, || async {
        let n = ns.api::<TailscaleNode>().get("db").await.ok()?;
        let st = n.status?;
        st.replicas
            .iter()
            .any(|r| r.pod == "db-0" && r.last_reset.as_deref() == Some("1"))
            .then_some(())
    })
    .await;
    assert!(shown.is_some(), "the status does not show db-0's reset");

    // The Deployment's pod: evicted, replaced by a new pod that joins as a new device.
    ask_reset(&ns, &web, "1").await;
    let replaced = support::eventually(WAIT, || async {
        let pods = ns
            .api::<Pod>()
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        pods.items
            .into_iter()
            .find(|p| p.name_any() != web && p.metadata.deletion_timestamp.is_none() && is_ready(p))
    })
    .await
    .expect("the Deployment's pod was not replaced after its reset");
    let s = ns
        .secret_where(&format!("ts-{}", replaced.name_any()), |s| {
            data(s, "device_id").is_some()
        })
        .await;
    assert_ne!(data(&s, "device_id").unwrap(), old_web);
    let gone = support::eventually(WAIT, || async {
        c.headscale_node(&old_web).await.is_none().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the evicted pod's device {old_web} is still in Headscale"
    );

    // A bare pod: nothing would recreate it, so it is refused, and keeps running.
    let bare = ns
        .create::<Pod>(
            json!({"metadata": {"name": "bare", "labels": {"tailnode.dev/node": "db"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(&c, "bare")]}}),
        )
        .await;
    ns.secret_where("ts-bare", |s| {
        data(s, "authkey").is_some() || data(s, "device_id").is_some()
    })
    .await;
    ask_reset(&ns, "bare", "1").await;
    let refused = support::eventually(WAIT, || async {
        Some(events(&ns, "ResetRefused").await).filter(|e| e.iter().any(|n| n.contains("pod bare")))
    })
    .await;
    assert!(refused.is_some(), "no ResetRefused Event for the bare pod");
    let still = ns.api::<Pod>().get("bare").await.unwrap();
    assert_eq!(still.metadata.uid, bare.metadata.uid, "the bare pod was replaced");
    assert!(
        still.metadata.deletion_timestamp.is_none(),
        "the bare pod is being deleted"
    );
    let notes = events(&ns, "Reset").await;
    assert!(
        notes.iter().any(|n| n.contains("pod db-0")),
        "no Reset Event for db-0: {notes:?}"
    );
    ns.delete().await;
}
