use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::api::TailscaleNode;

pub(super) fn node(spec: serde_json::Value) -> TailscaleNode {
    serde_json::from_value(json!({
        "apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps"}, "spec": spec,
    }))
    .unwrap()
}

pub(super) fn pod(extra: serde_json::Value) -> Pod {
    let mut base = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-7d9f8c-", "namespace": "apps",
                     "labels": {"app": "web", "tailnode.dev/node": "web"}},
        "spec": {"containers": [
            {"name": "app", "image": "nginx", "env": [{"name": "HTTP_PROXY", "value": "http://corp:3128"}]},
            {"name": "metrics", "image": "exporter"}
        ]}
    });
    json_patch::merge(&mut base, &extra);
    serde_json::from_value(base).unwrap()
}

pub(super) fn facts(level: PodSecurityLevel, native: bool) -> ClusterFacts {
    ClusterFacts {
        native_sidecars: native,
        pod_security: level,
        ..ClusterFacts::default()
    }
}

pub(super) fn injected(p: &Pod, n: &TailscaleNode, f: &ClusterFacts) -> (Pod, EffectiveMode) {
    match inject_pod(p, n, f).unwrap() {
        Outcome::Injected { object, mode } => (object, mode),
        Outcome::Skipped(s) => panic!("skipped: {s:?}"),
        Outcome::Refreshed { .. } => panic!("refreshed"),
    }
}

pub(super) fn sidecar(p: &Pod) -> &Container {
    let spec = p.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == "tailscale")
        .unwrap()
}

pub(super) fn env_of<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.iter().flatten().find(|e| e.name == name)
}

pub(super) fn env_value(c: &Container, name: &str) -> Option<String> {
    env_of(c, name).and_then(|e| e.value.clone())
}

/// Compares with a committed snapshot; `UPDATE_SNAPSHOTS=1 cargo test` rewrites it.
fn snapshot(name: &str, p: &Pod) {
    let path = format!("{}/src/inject/snapshots/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
    let got = serde_yaml::to_string(p).unwrap();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == got,
        "snapshot {name} differs; run UPDATE_SNAPSHOTS=1 cargo test and review:\n{got}"
    );
}

#[test]
fn userspace_native_sidecar_passes_restricted() {
    let n = node(json!({"hostname": "web", "tags": ["tag:k8s"],
        "credentials": {"headscale": {"url": "http://127.0.0.1:8080", "apiKeySecretName": "hs", "user": "1"}},
        "serve": [{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080"}],
        "outbound": {"socks5Port": 1055, "httpProxyPort": 1056, "exportEnv": true}}));
    let (p, mode) = injected(&pod(json!({})), &n, &facts(PodSecurityLevel::Restricted, true));
    assert_eq!(mode, EffectiveMode::Userspace);
    let spec = p.spec.as_ref().unwrap();
    let c = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(c.name, "tailscale");
    assert_eq!(c.restart_policy.as_deref(), Some("Always"));
    assert!(c.startup_probe.is_some() && c.readiness_probe.is_some());
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_string()]));
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    assert_eq!(env_value(c, "TS_USERSPACE").as_deref(), Some("true"));
    assert_eq!(env_value(c, "TS_KUBE_SECRET").as_deref(), Some("ts-$(POD_NAME)"));
    assert_eq!(
        env_value(c, "TS_AUTH_ONCE").as_deref(),
        Some("false"),
        "up on every start"
    );
    assert_eq!(env_value(c, "TS_HOSTNAME").as_deref(), Some("web-$(POD_NAME)"));
    assert_eq!(
        env_value(c, "TS_EXTRA_ARGS").as_deref(),
        Some("--reset --login-server=http://127.0.0.1:8080")
    );
    assert_eq!(
        env_value(c, "TS_SERVE_CONFIG").as_deref(),
        Some("/etc/tailnode/serve/serve.json")
    );
    assert_eq!(env_value(c, "TS_SOCKS5_SERVER").as_deref(), Some("localhost:1055"));
    assert_eq!(
        env_value(c, "TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV").as_deref(),
        Some("true")
    );
    assert_eq!(
        env_value(c, "TS_TAILSCALED_EXTRA_ARGS").as_deref(),
        Some("--no-logs-no-support")
    );
    // $(POD_NAME) must be defined before the variables that reference it.
    let names: Vec<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(pos("POD_NAME") < pos("TS_KUBE_SECRET") && pos("POD_NAME") < pos("TS_HOSTNAME"));
    assert_eq!(
        env_of(c, "POD_UID")
            .unwrap()
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.uid"
    );
    // The serve directory is a ConfigMap volume without subPath.
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "tailnode-serve")
        .unwrap();
    assert!(m.sub_path.is_none());
    let vols: Vec<_> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(vols, ["tailnode-tmp", "tailnode-serve"]);
    assert_eq!(
        spec.volumes.as_ref().unwrap()[1].config_map.as_ref().unwrap().name,
        "tsn-web-serve"
    );
    // No hostPath, no added capabilities anywhere in restricted mode.
    assert!(spec.volumes.iter().flatten().all(|v| v.host_path.is_none()));
    assert_eq!(
        p.metadata.annotations.as_ref().unwrap()["tailnode.dev/mode"],
        "userspace"
    );
    snapshot("userspace", &p);
}

#[test]
fn tun_mode_adds_net_admin_and_dev_net_tun_without_privileged() {
    let n = node(json!({"mode": "tun", "controlURL": "https://hs.example.com"}));
    let (p, mode) = injected(&pod(json!({})), &n, &facts(PodSecurityLevel::Privileged, true));
    assert_eq!(mode, EffectiveMode::Tun);
    let c = sidecar(&p);
    assert_eq!(env_value(c, "TS_USERSPACE").as_deref(), Some("false"));
    assert_eq!(env_value(c, "TS_ACCEPT_DNS").as_deref(), Some("false"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        sc.capabilities.as_ref().unwrap().add,
        Some(vec!["NET_ADMIN".into(), "NET_RAW".into()])
    );
    assert_eq!(sc.privileged, None);
    let tun = p
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tailnode-tun")
        .unwrap();
    let hp = tun.host_path.as_ref().unwrap();
    assert_eq!(
        (hp.path.as_str(), hp.type_.as_deref()),
        ("/dev/net/tun", Some("CharDevice"))
    );
    assert!(c.volume_mounts.iter().flatten().any(|m| m.mount_path == "/dev/net/tun"));
    snapshot("tun", &p);

    let privileged = node(json!({"mode": "tun", "sidecar": {"privileged": true}}));
    let (p, _) = injected(&pod(json!({})), &privileged, &facts(PodSecurityLevel::Privileged, true));
    assert_eq!(sidecar(&p).security_context.as_ref().unwrap().privileged, Some(true));
}

#[test]
fn tun_is_refused_where_pod_security_forbids_it() {
    let n = node(json!({"mode": "tun"}));
    for level in [PodSecurityLevel::Baseline, PodSecurityLevel::Restricted] {
        let err = inject_pod(&pod(json!({})), &n, &facts(level, true)).unwrap_err();
        assert!(matches!(err, InjectError::TunForbidden { .. }));
        assert!(err.to_string().contains(level.as_str()), "{err}");
    }
}

#[test]
fn auto_follows_each_pod_security_level() {
    let n = node(json!({"mode": "auto"}));
    let cases = [
        (PodSecurityLevel::Privileged, EffectiveMode::Tun),
        (PodSecurityLevel::Baseline, EffectiveMode::Userspace),
        (PodSecurityLevel::Restricted, EffectiveMode::Userspace),
    ];
    for (level, want) in cases {
        let (p, mode) = injected(&pod(json!({})), &n, &facts(level, true));
        assert_eq!(mode, want, "{level:?}");
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()["tailnode.dev/mode"],
            want.as_str()
        );
    }
    assert_eq!(PodSecurityLevel::from_label(None), PodSecurityLevel::Privileged);
    assert_eq!(
        PodSecurityLevel::from_label(Some("baseline")),
        PodSecurityLevel::Baseline
    );
    assert_eq!(
        PodSecurityLevel::from_label(Some("bogus")),
        PodSecurityLevel::Restricted
    );
}

#[test]
fn legacy_sidecar_is_appended_and_never_native() {
    let n = node(json!({}));
    let (p, _) = injected(&pod(json!({})), &n, &facts(PodSecurityLevel::Restricted, false));
    let spec = p.spec.as_ref().unwrap();
    assert!(spec.init_containers.is_none());
    let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "metrics", "tailscale"]);
    assert!(spec.containers[2].restart_policy.is_none() && spec.containers[2].startup_probe.is_none());

    let never = node(json!({"sidecar": {"nativeSidecar": "never"}}));
    let (p, _) = injected(&pod(json!({})), &never, &facts(PodSecurityLevel::Restricted, true));
    assert!(p.spec.as_ref().unwrap().init_containers.is_none());

    let always = node(json!({"sidecar": {"nativeSidecar": "always"}}));
    let err = inject_pod(&pod(json!({})), &always, &facts(PodSecurityLevel::Restricted, false)).unwrap_err();
    assert!(matches!(err, InjectError::NativeUnsupported { .. }));
}

#[test]
fn native_sidecar_goes_first_among_existing_init_containers() {
    let p = pod(json!({"spec": {"initContainers": [{"name": "migrate", "image": "m"}]}}));
    let (out, _) = injected(&p, &node(json!({})), &facts(PodSecurityLevel::Restricted, true));
    let names: Vec<_> = out
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["tailscale", "migrate"]);
}

#[test]
fn statefulset_pods_get_ordinal_hostnames() {
    let owner = json!({"metadata": {"name": "db-2", "generateName": null,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "u", "controller": true}]}});
    let (p, _) = injected(
        &pod(owner.clone()),
        &node(json!({"hostname": "db"})),
        &facts(PodSecurityLevel::Restricted, true),
    );
    let c = sidecar(&p);
    assert_eq!(env_value(c, "TS_HOSTNAME").as_deref(), Some("db-$(TS_POD_INDEX)"));
    let idx = env_of(c, "TS_POD_INDEX").unwrap().value_from.as_ref().unwrap();
    assert_eq!(
        idx.field_ref.as_ref().unwrap().field_path,
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    // Without a prefix the TailscaleNode's name is used.
    let (p, _) = injected(
        &pod(owner),
        &node(json!({})),
        &facts(PodSecurityLevel::Restricted, true),
    );
    assert_eq!(
        env_value(sidecar(&p), "TS_HOSTNAME").as_deref(),
        Some("web-$(TS_POD_INDEX)")
    );
}

#[test]
fn deployment_pods_get_pod_name_hostnames_and_annotation_overrides() {
    let (p, _) = injected(
        &pod(json!({})),
        &node(json!({})),
        &facts(PodSecurityLevel::Restricted, true),
    );
    assert_eq!(env_value(sidecar(&p), "TS_HOSTNAME").as_deref(), Some("$(POD_NAME)"));
    assert!(env_of(sidecar(&p), "TS_POD_INDEX").is_none());
    let annotated = pod(json!({"metadata": {"annotations": {"tailnode.dev/hostname": "frontdoor"}}}));
    let (p, _) = injected(
        &annotated,
        &node(json!({"hostname": "web"})),
        &facts(PodSecurityLevel::Restricted, true),
    );
    assert_eq!(env_value(sidecar(&p), "TS_HOSTNAME").as_deref(), Some("frontdoor"));
}

#[test]
fn outbound_env_merge_keeps_what_the_app_set() {
    let n = node(json!({"outbound": {"socks5Port": 1055, "exportEnv": true, "noProxy": ["db.internal"]}}));
    let p = pod(json!({"spec": {"initContainers": [{"name": "init", "image": "i"}]}}));
    let (out, _) = injected(&p, &n, &facts(PodSecurityLevel::Restricted, true));
    let spec = out.spec.as_ref().unwrap();
    let app = &spec.containers[0];
    // The app's own HTTP_PROXY stays, and no lower-case twin is added next to it.
    assert_eq!(env_value(app, "HTTP_PROXY").as_deref(), Some("http://corp:3128"));
    assert!(env_of(app, "http_proxy").is_none());
    assert_eq!(env_value(app, "ALL_PROXY").as_deref(), Some("socks5h://127.0.0.1:1055"));
    assert_eq!(env_value(app, "all_proxy").as_deref(), Some("socks5h://127.0.0.1:1055"));
    assert_eq!(
        env_value(app, "HTTPS_PROXY").as_deref(),
        Some("socks5h://127.0.0.1:1055")
    );
    assert_eq!(
        env_value(app, "NO_PROXY").as_deref(),
        Some("localhost,127.0.0.1,::1,.svc,.cluster.local,db.internal")
    );
    assert_eq!(
        app.env.as_ref().unwrap()[0].name,
        "HTTP_PROXY",
        "existing env keeps its place"
    );
    assert_eq!(
        env_value(&spec.containers[1], "ALL_PROXY").as_deref(),
        Some("socks5h://127.0.0.1:1055")
    );
    // Native sidecar runs before later init containers, so they get the proxy too.
    let init = spec
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "init")
        .unwrap();
    assert!(env_of(init, "ALL_PROXY").is_some());
    assert!(env_of(sidecar(&out), "ALL_PROXY").is_none());

    let http = node(json!({"outbound": {"httpProxyPort": 1056, "exportEnv": true}}));
    let (out, _) = injected(&pod(json!({})), &http, &facts(PodSecurityLevel::Restricted, false));
    let metrics = &out.spec.as_ref().unwrap().containers[1];
    assert_eq!(
        env_value(metrics, "HTTPS_PROXY").as_deref(),
        Some("http://127.0.0.1:1056")
    );
    assert!(env_of(metrics, "ALL_PROXY").is_none());

    let quiet = node(json!({"outbound": {"socks5Port": 1055}}));
    let (out, _) = injected(&pod(json!({})), &quiet, &facts(PodSecurityLevel::Restricted, true));
    assert!(env_of(&out.spec.as_ref().unwrap().containers[1], "ALL_PROXY").is_none());
}

#[test]
fn routes_exit_node_and_login_server_become_up_args() {
    let n = node(json!({"routes": {"advertise": ["10.0.0.0/24"], "accept": true},
        "exitNode": {"advertise": true}}));
    let f = ClusterFacts {
        defaults: OperatorDefaults {
            control_url: Some("https://default.example".into()),
            ..Default::default()
        },
        ..facts(PodSecurityLevel::Privileged, true)
    };
    let (p, _) = injected(&pod(json!({})), &n, &f);
    let c = sidecar(&p);
    assert_eq!(
        env_value(c, "TS_EXTRA_ARGS").as_deref(),
        Some("--reset --login-server=https://default.example --accept-routes --advertise-exit-node")
    );
    assert_eq!(env_value(c, "TS_ROUTES").as_deref(), Some("10.0.0.0/24"));
    let user = node(json!({"exitNode": {"use": "100.64.0.9"}, "controlURL": "https://mine.example"}));
    let (p, _) = injected(&pod(json!({})), &user, &f);
    assert_eq!(
        env_value(sidecar(&p), "TS_EXTRA_ARGS").as_deref(),
        Some("--reset --login-server=https://mine.example --exit-node=100.64.0.9")
    );
}

#[test]
fn stateful_filtering_is_never_turned_on() {
    // Off by default since tailscale 1.66.4; a router or exit node needs it off.
    let n = node(json!({"routes": {"advertise": ["10.0.0.0/24"], "accept": true},
        "exitNode": {"advertise": true}, "mode": "tun"}));
    for level in [PodSecurityLevel::Privileged, PodSecurityLevel::Restricted] {
        let (p, _) = injected(&pod(json!({})), &node(json!({})), &facts(level, true));
        let (t, _) = injected(&pod(json!({})), &n, &facts(PodSecurityLevel::Privileged, true));
        for c in [sidecar(&p), sidecar(&t)] {
            for e in c.env.iter().flatten() {
                let v = e.value.as_deref().unwrap_or_default();
                assert!(!v.contains("stateful-filtering"), "{}={v}", e.name);
            }
        }
    }
}

#[test]
fn sidecar_overrides_image_resources_and_env() {
    let n = node(
        json!({"sidecar": {"image": "registry.local/ts:1", "imagePullPolicy": "Always",
        "resources": {"requests": {"cpu": "10m"}}, "env": [{"name": "TS_DEBUG_X", "value": "1"}], "healthPort": 9999}}),
    );
    let (p, _) = injected(&pod(json!({})), &n, &facts(PodSecurityLevel::Restricted, true));
    let c = sidecar(&p);
    assert_eq!(c.image.as_deref(), Some("registry.local/ts:1"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()
            .contains_key("cpu")
    );
    assert_eq!(c.env.as_ref().unwrap().last().unwrap().name, "TS_DEBUG_X");
    assert_eq!(env_value(c, "TS_LOCAL_ADDR_PORT").as_deref(), Some("[::]:9999"));
}

#[test]
fn pods_without_automounted_token_get_one_for_the_sidecar_only() {
    let p = pod(json!({"spec": {"automountServiceAccountToken": false}}));
    let (out, _) = injected(&p, &node(json!({})), &facts(PodSecurityLevel::Restricted, true));
    let c = sidecar(&out);
    assert!(
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount")
    );
    assert!(out.spec.as_ref().unwrap().containers[0].volume_mounts.is_none());
}

#[test]
fn isolated_credentials_give_the_token_to_the_sidecar_alone() {
    let n = node(json!({"sidecar": {"isolateCredentials": true}}));
    let (out, _) = injected(&pod(json!({})), &n, &facts(PodSecurityLevel::Restricted, true));
    let spec = out.spec.as_ref().unwrap();
    assert_eq!(
        spec.automount_service_account_token,
        Some(false),
        "the app gets no token"
    );
    let c = sidecar(&out);
    assert!(
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount")
    );
    assert!(spec.containers[0].volume_mounts.is_none());
    // Without the option, an app keeps the pod's token.
    let (plain, _) = injected(
        &pod(json!({})),
        &node(json!({})),
        &facts(PodSecurityLevel::Restricted, true),
    );
    assert_eq!(plain.spec.as_ref().unwrap().automount_service_account_token, None);
    // The token the apiserver's ServiceAccount admission already mounted is taken out again.
    let mounted = pod(json!({"spec": {
        "containers": [{"name": "app", "image": "nginx",
            "volumeMounts": [{"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true},
                             {"name": "data", "mountPath": "/data"}]}],
        "volumes": [{"name": "kube-api-access-x1", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
                    {"name": "data", "emptyDir": {}}]}}));
    let (out, _) = injected(&mounted, &n, &facts(PodSecurityLevel::Restricted, true));
    let spec = out.spec.as_ref().unwrap();
    let app_mounts: Vec<&str> = spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(app_mounts, ["data"]);
    assert!(spec.volumes.iter().flatten().all(|v| v.name != "kube-api-access-x1"));
    // A shared process namespace would expose the sidecar's files to the app: refused.
    let shared = pod(json!({"spec": {"shareProcessNamespace": true}}));
    let err = inject_pod(&shared, &n, &facts(PodSecurityLevel::Restricted, true)).unwrap_err();
    assert!(matches!(err, InjectError::SharedProcessNamespace { .. }), "{err}");
    assert!(err.to_string().contains("shareProcessNamespace"));
}

#[test]
fn skips_and_refusals() {
    let f = facts(PodSecurityLevel::Restricted, true);
    let unlabelled = pod(json!({"metadata": {"labels": {"tailnode.dev/node": null}}}));
    assert_eq!(
        inject_pod(&unlabelled, &node(json!({})), &f).unwrap(),
        Outcome::Skipped(Skip::NotOptedIn)
    );
    let other = pod(json!({"metadata": {"labels": {"tailnode.dev/node": "db"}}}));
    assert_eq!(
        inject_pod(&other, &node(json!({})), &f).unwrap(),
        Outcome::Skipped(Skip::OtherNode("db".into()))
    );
    let host = pod(json!({"spec": {"hostNetwork": true}}));
    assert_eq!(
        inject_pod(&host, &node(json!({})), &f).unwrap_err(),
        InjectError::HostNetwork
    );
    let taken = pod(json!({"spec": {"volumes": [{"name": "tailnode-tmp", "emptyDir": {}}]}}));
    assert!(matches!(
        inject_pod(&taken, &node(json!({})), &f).unwrap_err(),
        InjectError::NameTaken { .. }
    ));
    let has_sidecar = pod(json!({"spec": {"containers": [{"name": "tailscale", "image": "x"}]}}));
    assert_eq!(
        inject_pod(&has_sidecar, &node(json!({})), &f).unwrap(),
        Outcome::Skipped(Skip::AlreadyInjected)
    );
}

#[test]
fn everything_else_in_the_pod_is_unchanged() {
    let p = pod(json!({"spec": {"nodeSelector": {"disk": "ssd"}, "volumes": [{"name": "data", "emptyDir": {}}]}}));
    let (out, _) = injected(&p, &node(json!({})), &facts(PodSecurityLevel::Restricted, true));
    let (a, b) = (p.spec.as_ref().unwrap(), out.spec.as_ref().unwrap());
    assert_eq!(a.containers, b.containers);
    assert_eq!(a.node_selector, b.node_selector);
    assert_eq!(b.volumes.as_ref().unwrap()[0], a.volumes.as_ref().unwrap()[0]);
    assert_eq!(p.metadata.labels, out.metadata.labels);
    assert_eq!(p.metadata.generate_name, out.metadata.generate_name);
}

#[test]
fn hash_changes_with_the_spec_only() {
    let f = facts(PodSecurityLevel::Restricted, true);
    let a = spec_hash(&node(json!({})).spec, &f, EffectiveMode::Userspace, true);
    assert_eq!(a, spec_hash(&node(json!({})).spec, &f, EffectiveMode::Userspace, true));
    assert_ne!(
        a,
        spec_hash(
            &node(json!({"tags": ["tag:x"]})).spec,
            &f,
            EffectiveMode::Userspace,
            true
        )
    );
    assert_eq!(a.len(), 16);
}

fn arb_spec() -> impl Strategy<Value = serde_json::Value> {
    (
        prop::sample::select(vec!["userspace", "tun", "auto"]),
        prop::option::of("[a-z]{1,8}"),
        prop::collection::vec("[a-z]{1,6}", 0..3),
        any::<bool>(),
        prop::sample::select(vec!["auto", "always", "never"]),
        prop::option::of((1024u16..2000, any::<bool>())),
    )
        .prop_map(|(mode, hostname, tags, serve, native, outbound)| {
            let mut spec = json!({"mode": mode, "tags": tags.iter().map(|t| format!("tag:{t}")).collect::<Vec<_>>(),
                "sidecar": {"nativeSidecar": native}});
            if let Some(h) = hostname {
                spec["hostname"] = json!(h);
            }
            if serve {
                spec["serve"] = json!([{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080"}]);
            }
            if let Some((port, export)) = outbound {
                spec["outbound"] = json!({"socks5Port": port, "exportEnv": export});
            }
            spec
        })
}

fn arb_facts() -> impl Strategy<Value = ClusterFacts> {
    (
        any::<bool>(),
        prop::sample::select(vec![
            PodSecurityLevel::Privileged,
            PodSecurityLevel::Baseline,
            PodSecurityLevel::Restricted,
        ]),
    )
        .prop_map(|(native, level)| facts(level, native))
}

proptest! {
    #[test]
    fn injecting_twice_equals_injecting_once(spec in arb_spec(), f in arb_facts(), sts in any::<bool>()) {
        let n = node(spec);
        let p = if sts {
            pod(json!({"metadata": {"name": "web-0", "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u", "controller": true}]}}))
        } else {
            pod(json!({}))
        };
        if let Ok(Outcome::Injected { object: once, .. }) = inject_pod(&p, &n, &f) {
            prop_assert_eq!(inject_pod(&once, &n, &f), Ok(Outcome::Skipped(Skip::AlreadyInjected)));
            prop_assert!(is_injected(&once.metadata, once.spec.as_ref().unwrap()));
        }
    }

    #[test]
    fn a_pod_without_the_label_is_untouched(spec in arb_spec(), f in arb_facts()) {
        let p = pod(json!({"metadata": {"labels": {"tailnode.dev/node": null}}}));
        prop_assert_eq!(inject_pod(&p, &node(spec), &f), Ok(Outcome::Skipped(Skip::NotOptedIn)));
    }
}
