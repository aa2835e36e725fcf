use k8s_openapi::ByteString;
use serde_json::json;

use super::*;

fn node(spec: serde_json::Value) -> TailscaleNode {
    serde_json::from_value(json!({
        "apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps", "uid": "node-uid"}, "spec": spec,
    }))
    .unwrap()
}

fn pod(name: &str, sts: Option<&str>, injected: bool) -> Pod {
    let mut annotations = json!({});
    if injected {
        annotations = json!({"tailnode.dev/injected": "abc"});
    }
    let owners = match sts {
        Some(s) => json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": s, "uid": "u", "controller": true}]),
        None => json!([]),
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-{name}"),
                     "labels": {"tailnode.dev/node": "web"}, "annotations": annotations, "ownerReferences": owners},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "app"}]}
    }))
    .unwrap()
}

fn secret(name: &str, data: &[(&str, &str)], annotations: serde_json::Value) -> Secret {
    let mut s: Secret =
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}})).unwrap();
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect(),
    );
    s
}

fn ttl() -> chrono::Duration {
    chrono::Duration::minutes(10)
}

#[test]
fn replicas_are_injected_labelled_pods_with_ordinals() {
    let n = node(json!({}));
    let pods = vec![
        pod("web-1", Some("web"), true),
        pod("api-x", None, true),
        pod("raw", None, false),
    ];
    let r = replicas(&n, &pods);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].pod, "api-x");
    assert_eq!(r[0].secret, "ts-api-x");
    assert_eq!(r[0].statefulset, None);
    assert_eq!(r[0].service_account, "app");
    assert_eq!(r[1].statefulset, Some(("web".to_string(), 1)));
}

#[test]
fn state_secrets_are_owned_by_pod_or_node() {
    let n = node(json!({}));
    let r = replicas(&n, &[pod("web-0", Some("web"), true), pod("api-x", None, true)]);
    let api = state_secret(&n, &r[0]);
    assert_eq!(api.metadata.owner_references.as_ref().unwrap()[0].kind, "Pod");
    assert_eq!(api.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-api-x");
    assert_eq!(api.metadata.finalizers, Some(vec![DEVICE_FINALIZER.to_string()]));
    assert!(api.data.is_none(), "pre-created empty");
    let sts = state_secret(&n, &r[1]);
    assert_eq!(sts.metadata.owner_references.as_ref().unwrap()[0].kind, "TailscaleNode");
    assert_eq!(sts.metadata.annotations.as_ref().unwrap()[ORDINAL_ANNOTATION], "0");
}

#[test]
fn plan_creates_mints_strips_and_retires() {
    let n = node(json!({}));
    let now = Utc::now();
    let r = replicas(
        &n,
        &[
            pod("a", None, true),
            pod("b", None, true),
            pod("c", None, true),
            pod("d", None, true),
        ],
    );
    let secrets = vec![
        secret("ts-b", &[], json!({})),
        secret("ts-c", &[("device_id", "n1"), ("authkey", "k")], json!({})),
        secret("ts-d", &[("authkey", "k")], json!({})),
        secret("ts-gone", &[("device_id", "n9")], json!({POD_ANNOTATION: "gone"})),
    ];
    let (create, actions) = plan(&r, &secrets, &BTreeMap::new(), &BTreeSet::new(), ttl(), now, false);
    assert_eq!(create.iter().map(|r| r.secret.as_str()).collect::<Vec<_>>(), ["ts-a"]);
    assert_eq!(
        actions,
        vec![
            SecretAction::Mint {
                secret: "ts-a".into(),
                pod: "a".into()
            },
            SecretAction::Mint {
                secret: "ts-b".into(),
                pod: String::new()
            },
            SecretAction::StripKey { secret: "ts-c".into() },
            SecretAction::Retire {
                secret: "ts-gone".into(),
                device_id: Some("n9".into())
            },
        ]
    );
}

#[test]
fn a_recent_mint_is_not_repeated_but_an_expired_one_is() {
    let n = node(json!({}));
    let now = Utc::now();
    let r = replicas(&n, &[pod("a", None, true)]);
    let recent = secret(
        "ts-a",
        &[],
        json!({MINTED_AT_ANNOTATION: (now - chrono::Duration::minutes(1)).to_rfc3339()}),
    );
    assert!(
        plan(&r, &[recent], &BTreeMap::new(), &BTreeSet::new(), ttl(), now, false)
            .1
            .is_empty()
    );
    let old = secret(
        "ts-a",
        &[],
        json!({MINTED_AT_ANNOTATION: (now - chrono::Duration::minutes(11)).to_rfc3339()}),
    );
    let (_, actions) = plan(&r, &[old], &BTreeMap::new(), &BTreeSet::new(), ttl(), now, false);
    assert!(matches!(actions[0], SecretAction::Mint { .. }));
}

#[test]
fn an_unused_key_is_replaced_once_expired_and_its_id_kept_for_revocation() {
    let n = node(json!({}));
    let now = Utc::now();
    let r = replicas(&n, &[pod("a", None, true)]);
    let keyed = |minutes: i64| {
        secret(
            "ts-a",
            &[("authkey", "k")],
            json!({MINTED_AT_ANNOTATION: (now - chrono::Duration::minutes(minutes)).to_rfc3339(),
                   KEY_ID_ANNOTATION: "7", POD_ANNOTATION: "a"}),
        )
    };
    assert!(
        plan(&r, &[keyed(9)], &BTreeMap::new(), &BTreeSet::new(), ttl(), now, false)
            .1
            .is_empty()
    );
    let (_, actions) = plan(&r, &[keyed(10)], &BTreeMap::new(), &BTreeSet::new(), ttl(), now, false);
    assert_eq!(
        actions,
        vec![SecretAction::Replace {
            secret: "ts-a".into(),
            pod: "a".into(),
            old_key_id: Some("7".into())
        }]
    );
    // Registered: the key is stripped, never replaced; a gone replica is retired, not replaced.
    let mut registered = keyed(60);
    registered
        .data
        .as_mut()
        .unwrap()
        .insert("device_id".into(), ByteString(b"n1".to_vec()));
    let (_, actions) = plan(
        &r,
        &[registered.clone()],
        &BTreeMap::new(),
        &BTreeSet::new(),
        ttl(),
        now,
        false,
    );
    assert_eq!(actions, vec![SecretAction::StripKey { secret: "ts-a".into() }]);
    assert_eq!(unused_key_id(&registered), None);
    assert_eq!(unused_key_id(&keyed(1)).as_deref(), Some("7"));
    let (_, actions) = plan(&[], &[keyed(60)], &BTreeMap::new(), &BTreeSet::new(), ttl(), now, false);
    assert!(matches!(actions[..], [SecretAction::Retire { .. }]));
}

#[test]
fn the_controller_looks_again_when_the_first_unused_key_expires() {
    let now = Utc::now();
    let at = |m: i64| (now - chrono::Duration::minutes(m)).to_rfc3339();
    let secrets = vec![
        secret("ts-a", &[("authkey", "k")], json!({MINTED_AT_ANNOTATION: at(2)})),
        secret("ts-b", &[("authkey", "k")], json!({MINTED_AT_ANNOTATION: at(5)})),
        // Registered, or without a key: no expiry to wait for.
        secret(
            "ts-c",
            &[("authkey", "k"), ("device_id", "n")],
            json!({MINTED_AT_ANNOTATION: at(9)}),
        ),
        secret("ts-d", &[], json!({MINTED_AT_ANNOTATION: at(9)})),
    ];
    let next = next_key_expiry(&secrets, ttl()).unwrap();
    assert_eq!(next, DateTime::parse_from_rfc3339(&at(5)).unwrap().to_utc() + ttl());
    assert_eq!(next_key_expiry(&secrets[2..], ttl()), None);
}

#[test]
fn statefulset_secrets_survive_their_pod_until_scaled_down() {
    let n = node(json!({}));
    let now = Utc::now();
    let s = secret(
        "ts-db-1",
        &[("device_id", "n1")],
        json!({STATEFULSET_ANNOTATION: "db", ORDINAL_ANNOTATION: "1", POD_ANNOTATION: "db-1"}),
    );
    // Pod deleted (restart/reschedule), StatefulSet still has 2 replicas: keep.
    let (_, actions) = plan(
        &[],
        std::slice::from_ref(&s),
        &BTreeMap::from([("db".into(), 2)]),
        &BTreeSet::new(),
        ttl(),
        now,
        false,
    );
    assert!(actions.is_empty());
    // Scaled down to 1: ordinal 1 is gone for good.
    let (_, actions) = plan(
        &[],
        std::slice::from_ref(&s),
        &BTreeMap::from([("db".into(), 1)]),
        &BTreeSet::new(),
        ttl(),
        now,
        false,
    );
    assert_eq!(
        actions,
        vec![SecretAction::Retire {
            secret: "ts-db-1".into(),
            device_id: Some("n1".into())
        }]
    );
    // StatefulSet deleted: gone.
    let (_, actions) = plan(
        &[],
        std::slice::from_ref(&s),
        &BTreeMap::new(),
        &BTreeSet::new(),
        ttl(),
        now,
        false,
    );
    assert_eq!(actions.len(), 1);
    // Node deleted: everything retires, nothing is created.
    let r = replicas(&n, &[pod("db-1", Some("db"), true), pod("x", None, true)]);
    let (create, actions) = plan(
        &r,
        &[s],
        &BTreeMap::from([("db".into(), 2)]),
        &BTreeSet::new(),
        ttl(),
        now,
        true,
    );
    assert!(create.is_empty());
    assert!(matches!(actions[0], SecretAction::Retire { .. }));
}

#[test]
fn role_names_exactly_the_secrets_and_never_all() {
    let n = node(json!({}));
    let names = BTreeSet::from(["ts-a".to_string(), "ts-b".to_string()]);
    let role = role(&n, &names);
    let rules = role.rules.unwrap();
    assert_eq!(
        rules[0].resource_names,
        Some(vec!["ts-a".to_string(), "ts-b".to_string()])
    );
    assert_eq!(rules[0].verbs, ["get", "update", "patch"]);
    assert!(
        !rules
            .iter()
            .any(|r| r.verbs.contains(&"create".to_string()) && r.resources == Some(vec!["secrets".into()]))
    );
    let empty = super::role(&n, &BTreeSet::new()).rules.unwrap();
    assert!(
        empty.iter().all(|r| r.resources != Some(vec!["secrets".into()])),
        "no secrets rule without names"
    );
    let rb = role_binding(&n, &BTreeSet::from(["app".to_string()]));
    assert_eq!(rb.subjects.unwrap()[0].name, "app");
    assert_eq!(rb.role_ref.name, "tsn-web");
}

#[test]
fn serve_config_map_only_when_serving() {
    assert!(serve_config_map(&node(json!({}))).is_none());
    let cm = serve_config_map(&node(
        json!({"serve": [{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080"}]}),
    ))
    .unwrap();
    assert_eq!(cm.metadata.name.as_deref(), Some("tsn-web-serve"));
    assert!(cm.data.unwrap()["serve.json"].contains("${TS_CERT_DOMAIN}:443"));
}

#[test]
fn replica_status_reads_device_keys() {
    let n = node(json!({}));
    let r = replicas(&n, &[pod("a", None, true), pod("b", None, true), pod("c", None, true)]);
    let secrets = vec![
        secret(
            "ts-a",
            &[
                ("device_id", "n1"),
                ("device_fqdn", "web-a.tailnet.test."),
                ("device_ips", r#"["100.64.0.1","fd7a::1"]"#),
            ],
            json!({}),
        ),
        secret("ts-b", &[("authkey", "k")], json!({})),
    ];
    let st = replica_statuses(&r, &secrets, &BTreeSet::from(["ts-c".to_string()]));
    assert_eq!(st[0].state, ReplicaState::Registered);
    assert_eq!(st[0].hostname.as_deref(), Some("web-a"));
    assert_eq!(st[0].fqdn.as_deref(), Some("web-a.tailnet.test"));
    assert_eq!(st[0].ips, ["100.64.0.1", "fd7a::1"]);
    assert_eq!(st[1].state, ReplicaState::KeyIssued);
    assert_eq!(st[2].state, ReplicaState::Failed);
}

#[test]
fn finished_pods_are_no_replicas_unless_a_statefulset_restarts_them() {
    let n = node(json!({}));
    let phase = |mut p: Pod, phase: &str| {
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        p
    };
    let pods = vec![
        phase(pod("job-a", None, true), "Succeeded"),
        phase(pod("evicted", None, true), "Failed"),
        phase(pod("web-0", Some("web"), true), "Failed"),
        phase(pod("running", None, true), "Running"),
    ];
    let names: Vec<String> = replicas(&n, &pods).into_iter().map(|r| r.pod).collect();
    assert_eq!(names, vec!["running".to_string(), "web-0".to_string()]);
    // The finished pods' Secrets are retired (device first), the others kept.
    let secrets = vec![
        secret("ts-job-a", &[("device_id", "d1")], json!({"tailnode.dev/pod": "job-a"})),
        secret(
            "ts-running",
            &[("device_id", "d2")],
            json!({"tailnode.dev/pod": "running"}),
        ),
    ];
    let (_, actions) = plan(
        &replicas(&n, &pods),
        &secrets,
        &BTreeMap::new(),
        &BTreeSet::new(),
        ttl(),
        Utc::now(),
        false,
    );
    // web-0 (a StatefulSet will restart it) has no Secret yet: it is created and keyed.
    assert_eq!(
        actions,
        vec![
            SecretAction::Mint {
                secret: "ts-web-0".into(),
                pod: "web-0".into()
            },
            SecretAction::Retire {
                secret: "ts-job-a".into(),
                device_id: Some("d1".into())
            }
        ]
    );
}

#[test]
fn only_labelled_secrets_annotated_for_the_pod_are_owned() {
    let n = node(json!({}));
    let mut ours = secret("ts-a", &[], json!({"tailnode.dev/pod": "a"}));
    ours.metadata.labels = Some([("tailnode.dev/node".to_string(), "web".to_string())].into());
    assert!(owned_by(&ours, &n, "a"));
    assert!(!owned_by(&ours, &n, "b"), "annotated for another pod");
    let mut other_node = ours.clone();
    other_node.metadata.labels = Some([("tailnode.dev/node".to_string(), "api".to_string())].into());
    assert!(!owned_by(&other_node, &n, "a"));
    let foreign = secret("ts-a", &[("password", "x")], json!({}));
    assert!(!owned_by(&foreign, &n, "a"));
}

#[test]
fn registered_pods_get_their_tailnet_name_and_ips_once() {
    let n = node(json!({}));
    let mut pods = vec![pod("a", None, true), pod("b", None, true)];
    let secrets = vec![
        secret(
            "ts-a",
            &[
                ("device_id", "n1"),
                ("device_fqdn", "web-a.tail.ts.net."),
                ("device_ips", r#"["100.64.0.1","fd7a::1"]"#),
            ],
            json!({}),
        ),
        secret("ts-b", &[("authkey", "k")], json!({})),
    ];
    let r = replicas(&n, &pods);
    let statuses = replica_statuses(&r, &secrets, &BTreeSet::new());
    let want = tailnet_annotations(&r, &statuses);
    assert_eq!(want.len(), 1, "only the registered pod: {want:?}");
    assert_eq!(want[0].0, "a");
    assert_eq!(want[0].1[TAILNET_NAME_ANNOTATION], "web-a.tail.ts.net");
    assert_eq!(want[0].1[TAILNET_IPS_ANNOTATION], "100.64.0.1,fd7a::1");
    // Once the pod carries them, nothing more to write.
    pods[0].metadata.annotations.as_mut().unwrap().extend(want[0].1.clone());
    let r = replicas(&n, &pods);
    assert!(tailnet_annotations(&r, &statuses).is_empty());
}
