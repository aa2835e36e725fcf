use std::collections::BTreeMap;

use k8s_openapi::ByteString;

use super::*;

fn replica(pod: &str, uid: &str) -> Replica {
    Replica::new(pod, uid, format!("ts-{pod}"))
}

fn sts(pod: &str, uid: &str) -> Replica {
    Replica {
        statefulset: Some(("db".into(), 0)),
        ..replica(pod, uid)
    }
}

fn secret(pod: &str, annotations: &[(&str, &str)], device: Option<&str>) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(format!("ts-{pod}"));
    s.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    if let Some(d) = device {
        s.data = Some(BTreeMap::from([(
            "device_id".to_string(),
            ByteString(d.as_bytes().to_vec()),
        )]));
    }
    s
}

fn asking(mut r: Replica, value: &str) -> Replica {
    r.reset = Some(value.into());
    r
}

#[test]
fn a_new_pod_value_evicts_once() {
    let r = asking(replica("web-1", "u1"), "1");
    let steps = plan(None, std::slice::from_ref(&r), &[secret("web-1", &[], Some("d1"))]);
    assert_eq!(
        steps,
        vec![Reset::Evict {
            pod: "web-1".into(),
            secret: "ts-web-1".into(),
            marks: Marks {
                pod: Some("1".into()),
                node: None
            },
            pending_uid: None,
        }]
    );
    // Handled: the same value does nothing; a new one resets again.
    let done = secret("web-1", &[(RESET_DONE_ANNOTATION, "1")], Some("d1"));
    assert!(plan(None, std::slice::from_ref(&r), std::slice::from_ref(&done)).is_empty());
    assert_eq!(plan(None, &[asking(replica("web-1", "u1"), "2")], &[done]).len(), 1);
}

#[test]
fn a_bare_pod_is_refused_and_a_terminating_one_waits() {
    let mut bare = asking(replica("p", "u"), "1");
    bare.owned = false;
    let steps = plan(None, &[bare], &[secret("p", &[], Some("d"))]);
    assert!(matches!(&steps[..], [Reset::Refuse { pod, .. }] if pod == "p"));
    let mut leaving = asking(replica("p", "u"), "1");
    leaving.terminating = true;
    assert!(plan(None, &[leaving], &[secret("p", &[], Some("d"))]).is_empty());
}

/// A StatefulSet replica: pending first; nothing while the old pod lingers (terminating); a wipe
/// with the old device once a new pod (or none) holds the name; an eviction again while the old
/// pod is still there and not leaving (a PodDisruptionBudget refused it).
#[test]
fn a_statefulset_replica_is_wiped_only_after_its_old_pod_is_gone() {
    let r = asking(sts("db-0", "old"), "1");
    let steps = plan(None, std::slice::from_ref(&r), &[secret("db-0", &[], Some("d1"))]);
    assert!(matches!(&steps[..], [Reset::Evict { pending_uid: Some(u), .. }] if u == "old"));
    let pending = secret(
        "db-0",
        &[
            (RESET_PENDING_ANNOTATION, "old"),
            (RESET_DONE_ANNOTATION, "1"),
            (crate::controller::desired::POD_ANNOTATION, "db-0"),
        ],
        Some("d1"),
    );
    let mut leaving = r.clone();
    leaving.terminating = true;
    assert!(plan(None, &[leaving], std::slice::from_ref(&pending)).is_empty());
    let again = plan(None, std::slice::from_ref(&r), std::slice::from_ref(&pending));
    assert!(matches!(&again[..], [Reset::Evict { marks, pending_uid: Some(_), .. }] if *marks == Marks::default()));
    let wipe = Reset::Wipe {
        pod: "db-0".into(),
        secret: "ts-db-0".into(),
        device_id: Some("d1".into()),
    };
    assert_eq!(
        plan(None, &[sts("db-0", "new")], std::slice::from_ref(&pending)),
        vec![wipe.clone()]
    );
    assert_eq!(plan(None, &[], std::slice::from_ref(&pending)), vec![wipe]);
}

/// A slot (`replicaIdentity: slots`) keeps its Secret across pods like a StatefulSet ordinal: the
/// reset is pending until the old pod is gone, then the slot's new holder gets a wiped state.
#[test]
fn a_slot_is_wiped_once_a_new_pod_holds_it() {
    let slot = |pod: &str, uid: &str| Replica {
        slot: Some(0),
        secret: "ts-web-slot-0".into(),
        ..replica(pod, uid)
    };
    let mut s = secret("web-slot-0", &[], Some("d1"));
    let steps = plan(None, &[asking(slot("web-a", "ua"), "1")], std::slice::from_ref(&s));
    assert!(matches!(&steps[..], [Reset::Evict { pending_uid: Some(u), .. }] if u == "ua"));
    s.metadata.annotations = Some(BTreeMap::from([(
        RESET_PENDING_ANNOTATION.to_string(),
        "ua".to_string(),
    )]));
    assert_eq!(
        plan(None, &[slot("web-b", "ub")], std::slice::from_ref(&s)),
        vec![Reset::Wipe {
            pod: "web-b".into(),
            secret: "ts-web-slot-0".into(),
            device_id: Some("d1".into()),
        }]
    );
}

/// A node-level reset takes one replica at a time, and only while all are registered.
#[test]
fn a_node_reset_goes_one_replica_at_a_time() {
    let replicas = [replica("a", "ua"), replica("b", "ub")];
    let secrets = [secret("a", &[], Some("da")), secret("b", &[], Some("db"))];
    let steps = plan(Some("n1"), &replicas, &secrets);
    assert!(
        matches!(&steps[..], [Reset::Evict { pod, marks, .. }] if pod == "a" && marks.node.as_deref() == Some("n1"))
    );
    // a is done; b is next, but not while a's replacement has not registered.
    let a_done = secret("a", &[(NODE_RESET_DONE_ANNOTATION, "n1")], None);
    assert!(plan(Some("n1"), &replicas, &[a_done, secrets[1].clone()]).is_empty());
    let a_done = secret("a", &[(NODE_RESET_DONE_ANNOTATION, "n1")], Some("da2"));
    let steps = plan(Some("n1"), &replicas, &[a_done, secrets[1].clone()]);
    assert!(matches!(&steps[..], [Reset::Evict { pod, .. }] if pod == "b"));
}

#[test]
fn marks_become_annotations() {
    let marks = Marks {
        pod: Some("p".into()),
        node: Some("n".into()),
    };
    let a = mark_annotations(&marks, Some("uid"));
    assert_eq!(a[RESET_DONE_ANNOTATION], "p");
    assert_eq!(a[NODE_RESET_DONE_ANNOTATION], "n");
    assert_eq!(a[RESET_PENDING_ANNOTATION], "uid");
    assert_eq!(a[LAST_RESET_ANNOTATION], "p", "the pod's own request names the reset");
    let node_only = Marks {
        pod: None,
        node: Some("n".into()),
    };
    assert_eq!(mark_annotations(&node_only, None)[LAST_RESET_ANNOTATION], "node/n");
    let mut s = secret("x", &[], None);
    assert_eq!(last_reset(&s), None);
    s.metadata.annotations = Some(
        mark_annotations(&node_only, None)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    );
    assert_eq!(last_reset(&s).as_deref(), Some("node/n"));
}
