//! A TailscaleNode change reaches a replica that keeps its state. containerboot passes
//! `TS_EXTRA_ARGS` to `tailscale up` only at first login when `TS_AUTH_ONCE=true`, so a
//! StatefulSet pod (same Secret, same node key after a restart) would never see a changed
//! spec: tailnode has the sidecar apply its preferences on every start instead. The pod from the
//! old spec is named by `RestartNeeded`; once recreated it runs the new preferences as the same
//! device, with no new key.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::cluster::{Cluster, Ns, WAIT, data, is_ready};
use crate::support;
use crate::workloads::db_statefulset;
use tailnode::api::TailscaleNode;

/// tailscaled's current preferences in pod `pod`, as JSON.
fn prefs(c: &Cluster, ns: &Ns, pod: &str) -> Value {
    let (ok, out, err) = c.exec(
        &ns.name,
        pod,
        "tailscale",
        &["tailscale", "--socket=/tmp/tailscaled.sock", "debug", "prefs"],
    );
    assert!(ok, "tailscale debug prefs: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("prefs are not JSON ({e}): {out}"))
}

pub async fn spec_change_reaches_a_stateful_replica(c: Cluster) {
    let ns = Ns::new(&c, "prefs", json!({})).await;
    db_statefulset(&c, &ns).await;
    let db0 = ns.pod_where("db-0", "Ready", is_ready).await;
    let s = ns.secret_where("ts-db-0", |s| data(s, "device_id").is_some()).await;
    let device = data(&s, "device_id").unwrap();
    let minted_at = s.metadata.annotations.clone().unwrap_or_default()["tailnode.dev/minted-at"].clone();
    assert_eq!(
        prefs(&c, &ns, "db-0")["RouteAll"],
        json!(false),
        "accept-routes is off at first"
    );

    // The spec changes: the running pod is named, and keeps running as it is.
    let change = json!({"spec": {"routes": {"accept": true}}});
    ns.api::<TailscaleNode>()
        .patch("db", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    let named = support::eventually(WAIT, || async {
        let c = ns.node_condition("db", "RestartNeeded").await?;
        (c["status"] == "True").then_some(c)
    })
    .await
    .expect("RestartNeeded never named the pod");
    assert!(named["message"].as_str().unwrap().ends_with(": db-0"), "{named}");

    // A new pod with the same state: the new preference is applied, as the same device.
    ns.api::<Pod>().delete("db-0", &DeleteParams::default()).await.unwrap();
    let old_uid = db0.metadata.uid.clone();
    ns.pod_where("db-0", "recreated and Ready", |p| {
        p.metadata.uid != old_uid && is_ready(p)
    })
    .await;
    let applied = support::eventually(WAIT, || async {
        (prefs(&c, &ns, "db-0")["RouteAll"] == json!(true)).then_some(())
    })
    .await;
    assert!(applied.is_some(), "the restarted replica did not apply accept-routes");
    let s = ns.secret_where("ts-db-0", |s| data(s, "device_id").is_some()).await;
    assert_eq!(
        data(&s, "device_id"),
        Some(device.clone()),
        "same device after the restart"
    );
    let again = s.metadata.annotations.clone().unwrap_or_default()["tailnode.dev/minted-at"].clone();
    assert_eq!(again, minted_at, "a key was minted for the restart");
    assert!(c.headscale_node(&device).await.is_some(), "Headscale still lists db-0");
    let cleared = support::eventually(WAIT, || async {
        let c = ns.node_condition("db", "RestartNeeded").await?;
        (c["status"] == "False").then_some(())
    })
    .await;
    assert!(cleared.is_some(), "RestartNeeded stayed after the pod was recreated");
    ns.delete().await;
}
