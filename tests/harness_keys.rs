//! Keys that are never used do not outlive their lifetime under a pod that cannot start. The
//! operator runs in-process with a 15 s key lifetime against the contract fake of the Tailscale
//! API; the pod is admitted and its gate opened but it is never scheduled (a nodeSelector no
//! node matches), as a pod waiting for an autoscaler, a slow image pull or a PVC would be.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::operator::operator_with;
use support::*;
use tailnode::api::TailscaleNode;
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale};

const KEY_TTL_S: u64 = 15;
const WAIT: Duration = Duration::from_secs(60);
const KEY_ID: &str = "tailnode.dev/key-id";

fn key_id(s: &Secret) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(KEY_ID).cloned()
}

fn authkey(s: &Secret) -> Option<String> {
    let v = s.data.as_ref()?.get("authkey")?;
    Some(String::from_utf8_lossy(&v.0).into_owned())
}

/// A key that expires unused is replaced (a new key in the Secret, an Event), the old one is
/// revoked at the API, and no more than one key is minted per lifetime. When the pod goes, its
/// unused key is revoked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_unused_key_is_replaced_and_the_old_one_revoked() {
    let h = harness();
    let op = operator_with(&[&format!("--key-ttl-seconds={KEY_TTL_S}")]);
    let client = h.client().await;
    install_crd(&client).await;
    let ns = TestNamespace::new(&client, "keyttl", json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    let fake = FakeTailscale::start(FakeConfig {
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        client_tags: vec!["tag:k8s".into()],
    })
    .await;
    let oauth: Secret = serde_json::from_value(json!({"metadata": {"name": "oauth"},
        "stringData": {"client_id": "cid", "client_secret": "csecret"}}))
    .unwrap();
    ns.api::<Secret>().create(&PostParams::default(), &oauth).await.unwrap();
    let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": "web"},
        "spec": {"tags": ["tag:k8s"], "credentials": {"oauth": {"secretName": "oauth", "apiURL": fake.url()}}}}))
    .unwrap();
    ns.api::<TailscaleNode>()
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "pending", "labels": {"tailnode.dev/node": "web"}},
        "spec": {"nodeSelector": {"tailnode.dev/test": "never-scheduled"},
                 "containers": [{"name": "app", "image": "nginx"}]}}),
    )
    .unwrap();
    let pods = ns.api::<Pod>();
    let admitted = eventually(WAIT, || async { pods.create(&PostParams::default(), &pod).await.ok() }).await;
    assert!(admitted.is_some(), "the pod was never admitted");

    let secrets = ns.api::<Secret>();
    let first = eventually(WAIT, || async {
        let s = secrets.get_opt("ts-pending").await.ok()??;
        Some((key_id(&s)?, authkey(&s)?))
    })
    .await
    .expect("no key was minted");
    assert_eq!(fake.ledger().mints.len(), 1);
    assert_eq!(fake.ledger().mints[0].expiry_seconds, Some(KEY_TTL_S));

    // Replaced within a few seconds of its expiry, not before.
    let minted_at = std::time::Instant::now();
    let second = eventually(Duration::from_secs(KEY_TTL_S + 30), || async {
        let s = secrets.get_opt("ts-pending").await.ok()??;
        let id = key_id(&s)?;
        (id != first.0).then(|| (id, authkey(&s)))
    })
    .await
    .expect("the expired key was never replaced");
    let waited = minted_at.elapsed();
    assert!(
        waited.as_secs() + 3 >= KEY_TTL_S,
        "replaced after {waited:?}, before the key expired"
    );
    assert_ne!(
        second.1.as_deref(),
        Some(first.1.as_str()),
        "the same key was written again"
    );
    // The old key is revoked right after the new one is written.
    let revoked = eventually(WAIT, || async {
        let ledger = fake.ledger();
        (ledger.revocations == vec![first.0.clone()]).then_some(ledger)
    })
    .await;
    let ledger = revoked.unwrap_or_else(|| panic!("the old key was not revoked: {:?}", fake.ledger().revocations));
    assert_eq!(ledger.mints.len(), 2, "one mint per key lifetime");
    let events = ns.api::<CoreEvent>().list(&ListParams::default()).await.unwrap().items;
    assert!(
        events.iter().any(|e| e.reason.as_deref() == Some("KeyReplaced")),
        "no KeyReplaced Event"
    );
    for e in &events {
        let m = e.message.as_deref().unwrap_or_default();
        assert!(!m.contains(&first.1), "a key appeared in an Event");
    }

    // The pod goes before it ever joins: its unused key is revoked with its Secret.
    pods.delete("pending", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let gone = eventually(WAIT, || async {
        secrets.get_opt("ts-pending").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "the state Secret was never released");
    let revoked = fake.ledger().revocations;
    assert_eq!(
        revoked,
        vec![first.0, second.0],
        "the unused key of a gone pod was not revoked"
    );
    ns.cleanup().await;
}
