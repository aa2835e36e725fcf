use std::collections::BTreeMap;

use chrono::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

use super::*;
use crate::api::CREDENTIALS_GATE;
use crate::controller::desired::replicas;

fn node() -> TailscaleNode {
    let mut n = TailscaleNode::new("web", Default::default());
    n.metadata.namespace = Some("apps".into());
    n.metadata.uid = Some("node-uid".into());
    n
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap()
}

/// A slot pod created `age` seconds before `now`, gated or not, with its slot annotation.
fn pod(name: &str, age: i64, slot: Option<u32>, gated: bool) -> Pod {
    let mut annotations = json!({"tailnode.dev/injected": "h", "tailnode.dev/identity": "slots"});
    if let Some(n) = slot {
        annotations["tailnode.dev/slot"] = json!(n.to_string());
    }
    let gates = if gated {
        json!([{"name": CREDENTIALS_GATE}])
    } else {
        json!([])
    };
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-{name}"),
                     "labels": {"tailnode.dev/node": "web"}, "annotations": annotations,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                                          "uid": "rs", "controller": true}]},
        "spec": {"containers": [], "schedulingGates": gates},
        "status": {"phase": "Pending"}
    }))
    .unwrap();
    p.metadata.creation_timestamp = Some(time(now() - chrono::Duration::seconds(age)));
    p
}

fn leaving(mut p: Pod) -> Pod {
    p.metadata.deletion_timestamp = Some(time(now()));
    p
}

fn done(mut p: Pod) -> Pod {
    p.status.get_or_insert_with(Default::default).phase = Some("Succeeded".into());
    p
}

/// Slot `n`'s Secret, last held by `pod`, released `released` seconds ago when given.
fn secret(n: u32, pod: &str, released: Option<i64>) -> Secret {
    let mut a = BTreeMap::from([
        (SLOT_ANNOTATION.to_string(), n.to_string()),
        (POD_ANNOTATION.to_string(), pod.to_string()),
        (POD_UID_ANNOTATION.to_string(), format!("uid-{pod}")),
    ]);
    if let Some(ago) = released {
        a.insert(
            RELEASED_AT_ANNOTATION.into(),
            (now() - chrono::Duration::seconds(ago)).to_rfc3339(),
        );
    }
    let mut s = Secret::default();
    s.metadata.name = Some(format!("ts-web-slot-{n}"));
    s.metadata.annotations = Some(a);
    s.metadata.resource_version = Some(format!("rv{n}"));
    s
}

fn time(t: DateTime<Utc>) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap())
}

fn grace() -> chrono::Duration {
    chrono::Duration::seconds(60)
}

fn claim(pod: &str, slot: u32, rv: Option<&str>) -> SlotAction {
    SlotAction::Claim {
        pod: pod.into(),
        uid: format!("uid-{pod}"),
        slot,
        resource_version: rv.map(str::to_string),
    }
}

#[test]
fn new_pods_take_new_slots_from_zero_oldest_first() {
    let pods = [pod("web-b", 5, None, true), pod("web-a", 10, None, true)];
    let p = plan(&node(), &pods, &[], grace(), now());
    assert_eq!(p.actions, vec![claim("web-a", 0, None), claim("web-b", 1, None)]);
    assert_eq!(p.waiting, 0);
}

#[test]
fn a_replacement_waits_for_the_pod_on_its_way_out_then_takes_its_slot() {
    let old = leaving(pod("web-old", 100, Some(0), false));
    let other = pod("web-other", 100, Some(1), false);
    let new = pod("web-new", 1, None, true);
    let secrets = [secret(0, "web-old", None), secret(1, "web-other", None)];
    let p = plan(&node(), [&old, &other, &new], &secrets, grace(), now());
    assert_eq!(p.actions, vec![]);
    assert_eq!(p.waiting, 1);
    // The old pod holds its slot while it terminates: it stays kept, not released.
    assert!(p.kept.contains("ts-web-slot-0"));

    // Gone: the replacement takes slot 0 at the Secret's version (a stale view loses).
    let p = plan(&node(), [&other, &new], &secrets, grace(), now());
    assert_eq!(p.actions, vec![claim("web-new", 0, Some("rv0"))]);
    assert!(p.kept.contains("ts-web-slot-0"));
}

#[test]
fn a_rolling_update_with_surge_takes_one_extra_slot_and_the_pool_shrinks_back() {
    let a = pod("web-a", 100, Some(0), false);
    let b = pod("web-b", 100, Some(1), false);
    let c = pod("web-c", 2, None, true);
    let mut secrets = vec![secret(0, "web-a", None), secret(1, "web-b", None)];
    // Surge: nobody is leaving, no slot is free: a new one.
    let p = plan(&node(), [&a, &b, &c], &secrets, grace(), now());
    assert_eq!(p.actions, vec![claim("web-c", 2, None)]);
    secrets.push(secret(2, "web-c", None));
    let c = pod("web-c", 2, Some(2), false);
    // a goes; d replaces it and waits for slot 0.
    let a = leaving(a);
    let d = pod("web-d", 1, None, true);
    let p = plan(&node(), [&a, &b, &c, &d], &secrets, grace(), now());
    assert_eq!((p.actions.clone(), p.waiting), (vec![], 1));
    let p = plan(&node(), [&b, &c, &d], &secrets, grace(), now());
    assert_eq!(p.actions, vec![claim("web-d", 0, Some("rv0"))]);
    // b goes with no replacement: its slot is released, kept through the grace period, then retired.
    let d = pod("web-d", 1, Some(0), false);
    let p = plan(&node(), [&c, &d], &secrets, grace(), now());
    assert_eq!(
        p.actions,
        vec![SlotAction::Release {
            secret: "ts-web-slot-1".into()
        }]
    );
    assert!(p.kept.contains("ts-web-slot-1"));
    assert_eq!(p.next_expiry, Some(now() + grace()));
    secrets[1] = secret(1, "web-b", Some(30));
    let p = plan(&node(), [&c, &d], &secrets, grace(), now());
    assert!(p.actions.is_empty() && p.kept.contains("ts-web-slot-1"));
    assert_eq!(p.next_expiry, Some(now() + chrono::Duration::seconds(30)));
    secrets[1] = secret(1, "web-b", Some(61));
    let p = plan(&node(), [&c, &d], &secrets, grace(), now());
    assert!(!p.kept.contains("ts-web-slot-1"));
    assert_eq!(p.kept.len(), 2);
}

#[test]
fn a_free_slot_goes_to_the_next_pod_lowest_first() {
    let secrets = [secret(3, "gone1", Some(5)), secret(1, "gone2", Some(5))];
    let p = plan(&node(), [&pod("web-x", 1, None, true)], &secrets, grace(), now());
    assert_eq!(p.actions, vec![claim("web-x", 1, Some("rv1"))]);
    assert!(p.kept.contains("ts-web-slot-1") && p.kept.contains("ts-web-slot-3"));
}

#[test]
fn a_finished_pod_frees_its_slot_and_its_device_stays_for_the_grace_period() {
    let job = done(pod("web-job", 100, Some(0), false));
    let secrets = [secret(0, "web-job", None)];
    let p = plan(&node(), [&job], &secrets, grace(), now());
    assert_eq!(
        p.actions,
        vec![SlotAction::Release {
            secret: "ts-web-slot-0".into()
        }]
    );
    assert!(p.kept.contains("ts-web-slot-0"));
    let next = pod("web-next", 1, None, true);
    let p = plan(&node(), [&job, &next], &secrets, grace(), now());
    assert_eq!(p.actions, vec![claim("web-next", 0, Some("rv0"))]);
}

#[test]
fn a_claim_whose_annotation_did_not_land_is_finished_from_the_secret() {
    let x = pod("web-x", 1, None, true);
    let secrets = [secret(0, "web-x", None)];
    let p = plan(&node(), [&x], &secrets, grace(), now());
    assert_eq!(
        p.actions,
        vec![SlotAction::Annotate {
            pod: "web-x".into(),
            slot: 0
        }]
    );
    // Another pod of that name (a new uid) does not inherit the claim.
    let mut other = pod("web-x", 1, None, true);
    other.metadata.uid = Some("uid-new".into());
    let p = plan(&node(), [&other], &secrets, grace(), now());
    assert_eq!(
        p.actions,
        vec![SlotAction::Claim {
            pod: "web-x".into(),
            uid: "uid-new".into(),
            slot: 0,
            resource_version: Some("rv0".into())
        }]
    );
}

#[test]
fn a_held_slot_that_was_released_is_held_again() {
    let a = pod("web-a", 10, Some(0), false);
    let p = plan(&node(), [&a], &[secret(0, "web-a", Some(5))], grace(), now());
    assert_eq!(
        p.actions,
        vec![SlotAction::Hold {
            secret: "ts-web-slot-0".into()
        }]
    );
}

#[test]
fn ungated_terminating_and_per_pod_pods_take_no_slot() {
    let ungated = pod("web-u", 1, None, false);
    let gone = leaving(pod("web-t", 1, None, true));
    let mut plain = pod("web-p", 1, None, true);
    plain.metadata.annotations.as_mut().unwrap().remove(IDENTITY_ANNOTATION);
    let p = plan(&node(), [&ungated, &gone, &plain], &[], grace(), now());
    assert_eq!(p, SlotPlan::default());
}

#[test]
fn the_secret_of_a_slot_being_deleted_is_not_handed_out() {
    let mut s = secret(0, "gone", Some(100));
    s.metadata.deletion_timestamp = Some(time(now()));
    let p = plan(&node(), [&pod("web-x", 1, None, true)], &[s], grace(), now());
    assert_eq!(p.actions, vec![claim("web-x", 1, None)]);
}

#[test]
fn replicas_of_slot_pods_use_the_slot_secret_and_waiting_pods_are_none() {
    let node = node();
    let held = pod("web-a", 10, Some(4), false);
    let waiting = pod("web-b", 1, None, true);
    let r = replicas(&node, [&held, &waiting]);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].secret.as_str(), r[0].slot), ("ts-web-slot-4", Some(4)));
    let s = crate::controller::desired::state_secret(&node, &r[0]);
    let a = s.metadata.annotations.unwrap();
    assert_eq!(a.get(SLOT_ANNOTATION).map(String::as_str), Some("4"));
    assert_eq!(a.get(POD_UID_ANNOTATION).map(String::as_str), Some("uid-web-a"));
    // The node owns a slot's Secret: it outlives the pod.
    assert_eq!(s.metadata.owner_references.unwrap()[0].kind, "TailscaleNode");
}
