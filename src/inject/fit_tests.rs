//! Sidecar fit and finish: liveness, default resources, bounded hostnames, IPv6 apiserver
//! address, and reinvocation.

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proptest::prelude::*;
use serde_json::json;

use super::tests::{env_of, env_value, facts, injected, node, pod, sidecar};
use super::*;

fn restricted(native: bool) -> ClusterFacts {
    facts(PodSecurityLevel::Restricted, native)
}

fn hostname(p: &Pod, n: &TailscaleNode) -> String {
    let (out, _) = injected(p, n, &restricted(true));
    env_value(sidecar(&out), "TS_HOSTNAME").unwrap()
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_HOSTNAME
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[test]
fn liveness_uses_healthz_with_generous_thresholds() {
    let (native, _) = injected(&pod(json!({})), &node(json!({})), &restricted(true));
    let c = sidecar(&native);
    let live = c.liveness_probe.as_ref().expect("a liveness probe");
    let get = live.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/healthz"));
    assert_eq!(get.port, IntOrString::Int(DEFAULT_HEALTH_PORT));
    assert!(live.exec.is_none() && live.tcp_socket.is_none() && live.grpc.is_none());
    assert_eq!((live.period_seconds, live.failure_threshold), (Some(10), Some(6)));
    // A native sidecar's startup probe covers start-up, so liveness does not wait on its own.
    assert!(c.startup_probe.is_some());
    assert_eq!(live.initial_delay_seconds, None);

    let (legacy, _) = injected(&pod(json!({})), &node(json!({})), &restricted(false));
    let c = sidecar(&legacy);
    assert!(c.startup_probe.is_none());
    assert_eq!(c.liveness_probe.as_ref().unwrap().initial_delay_seconds, Some(60));

    let custom = node(json!({"sidecar": {"healthPort": 9999}}));
    let (out, _) = injected(&pod(json!({})), &custom, &restricted(true));
    let port = &sidecar(&out)
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap()
        .port;
    assert_eq!(*port, IntOrString::Int(9999));
}

#[test]
fn default_resources_fit_limit_ranges_and_user_resources_win_exactly() {
    let (out, _) = injected(&pod(json!({})), &node(json!({})), &restricted(true));
    let r = sidecar(&out).resources.clone().expect("default resources");
    let requests = r.requests.unwrap();
    let limits = r.limits.unwrap();
    assert_eq!(requests["cpu"], Quantity("10m".into()));
    assert_eq!(requests["memory"], Quantity("32Mi".into()));
    assert_eq!(limits["memory"], Quantity("256Mi".into()));
    assert!(!limits.contains_key("cpu"), "no CPU limit on a data path");

    let own = json!({"requests": {"cpu": "50m"}});
    let n = node(json!({"sidecar": {"resources": own}}));
    let (out, _) = injected(&pod(json!({})), &n, &restricted(true));
    let got = serde_json::to_value(sidecar(&out).resources.as_ref().unwrap()).unwrap();
    assert_eq!(got, own, "the user's resources, nothing merged in");
}

#[test]
fn a_fixed_pod_name_gives_a_computed_bounded_hostname() {
    let named = |name: &str| pod(json!({"metadata": {"name": name, "generateName": null}}));
    assert_eq!(
        hostname(&named("api-0"), &node(json!({"hostname": "web"}))),
        "web-api-0"
    );
    assert_eq!(hostname(&named("api-0"), &node(json!({}))), "api-0");

    let long = "x".repeat(80);
    let got = hostname(&named(&long), &node(json!({"hostname": "web"})));
    assert_eq!(got.len(), 63);
    assert!(is_dns_label(&got), "{got}");
    let (head, hash) = got.rsplit_once('-').unwrap();
    assert_eq!(head, format!("web-{}", "x".repeat(52)));
    assert_eq!(hash.len(), 6);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    // Stable, and distinct for names that share the first 56 characters.
    assert_eq!(hostname(&named(&long), &node(json!({"hostname": "web"}))), got);
    let other = hostname(&named(&format!("{long}y")), &node(json!({"hostname": "web"})));
    assert_ne!(other, got);
    assert_eq!(other.len(), 63);
    // Dots of a pod name (a DNS subdomain) do not survive into a DNS label.
    assert_eq!(hostname(&named("a.b"), &node(json!({}))), "a-b");
}

#[test]
fn a_generate_name_bounds_the_prefix_for_the_kubelet_expansion() {
    let generated = |g: &str| pod(json!({"metadata": {"generateName": g}}));
    let prefix = "p".repeat(52);
    // web-7d9f8c- (11) + 5 random = 16; the prefix may use 63 - 1 - 16 = 46.
    let got = hostname(&generated("web-7d9f8c-"), &node(json!({"hostname": prefix})));
    let kept = got.strip_suffix("-$(POD_NAME)").unwrap();
    assert_eq!(kept.len(), 46);
    assert_eq!(kept.len() + 1 + 16, 63);
    assert_eq!(
        hostname(&generated("web-7d9f8c-"), &node(json!({"hostname": prefix}))),
        got
    );
    // A short prefix is untouched.
    assert_eq!(
        hostname(&generated("web-7d9f8c-"), &node(json!({"hostname": "web"}))),
        "web-$(POD_NAME)"
    );
    // The apiserver cuts a generateName base at 58 and adds 5: no room is left for a prefix.
    let full = "g".repeat(70);
    assert_eq!(
        hostname(&generated(&full), &node(json!({"hostname": "web"}))),
        "$(POD_NAME)"
    );
}

#[test]
fn statefulset_prefixes_leave_room_for_any_ordinal() {
    let owner = json!({"metadata": {"name": "db-2", "generateName": null,
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "u", "controller": true}]}});
    let mut n = node(json!({}));
    n.metadata.name = Some("n".repeat(100));
    let mut p = pod(owner);
    p.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(crate::api::NODE_LABEL.into(), "n".repeat(100));
    let got = hostname(&p, &n);
    let prefix = got.strip_suffix("-$(TS_POD_INDEX)").unwrap();
    assert_eq!(prefix.len(), 52);
    assert!(prefix.len() + 1 + i32::MAX.to_string().len() <= 63);
}

#[test]
fn the_hostname_annotation_is_sanitised_and_bounded() {
    let annotated = |h: &str| pod(json!({"metadata": {"annotations": {"tailnode.dev/hostname": h}}}));
    let n = node(json!({"hostname": "web"}));
    assert_eq!(hostname(&annotated("Front_Door."), &n), "front-door");
    let long = format!("Edge-{}", "Z".repeat(90));
    let got = hostname(&annotated(&long), &n);
    assert!(is_dns_label(&got) && got.len() == 63, "{got}");
    assert_eq!(hostname(&annotated(&long), &n), got, "stable");
    // An annotation with nothing usable falls back to the usual hostname.
    assert_eq!(hostname(&annotated("--"), &n), "web-$(POD_NAME)");
}

proptest! {
    #[test]
    fn bounded_labels_are_dns_labels(s in "[ -~]{0,120}", max in 1usize..=63) {
        let out = bound_label(&s, max);
        prop_assert!(out.len() <= max);
        prop_assert_eq!(&out, &bound_label(&s, max));
        if !out.is_empty() {
            prop_assert!(is_dns_label(&out), "{}", out);
        }
    }

    #[test]
    fn expanded_hostnames_fit_one_label(
        prefix in proptest::option::of("[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?"),
        name in proptest::option::of("[a-z0-9][-a-z0-9.]{0,252}"),
        generate in "[a-z0-9][-a-z0-9]{0,80}",
    ) {
        let mut spec = json!({});
        if let Some(p) = &prefix {
            spec = json!({"hostname": p});
        }
        let meta = match &name {
            Some(n) => json!({"metadata": {"name": n, "generateName": null}}),
            None => json!({"metadata": {"generateName": generate}}),
        };
        let got = hostname(&pod(meta), &node(spec));
        // The kubelet's worst case: a generated name is at most 58 + 5 characters.
        let generated = "a".repeat(generate.len().min(58) + 5);
        let expanded = got.replace("$(POD_NAME)", &generated);
        prop_assert!(is_dns_label(&expanded), "{} -> {}", got, expanded);
    }
}

#[test]
fn ipv6_apiserver_hosts_are_bracketed_for_containerboot() {
    let with_host = |h: Option<&str>| ClusterFacts {
        api_server_host: h.map(str::to_string),
        ..restricted(true)
    };
    // containerboot builds "https://%s:%s" from these two variables (cmd/containerboot/kube.go).
    let url = |c: &Container| {
        let host = env_value(c, "KUBERNETES_SERVICE_HOST").unwrap_or_else(|| "fd00:10:96::1".into());
        format!("https://{host}:443")
    };
    let (out, _) = injected(&pod(json!({})), &node(json!({})), &with_host(Some("fd00:10:96::1")));
    let c = sidecar(&out);
    assert_eq!(
        env_value(c, "KUBERNETES_SERVICE_HOST").as_deref(),
        Some("[fd00:10:96::1]")
    );
    assert_eq!(
        env_value(c, "TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV").as_deref(),
        Some("true")
    );
    let parsed = reqwest::Url::parse(&url(c)).unwrap();
    assert_eq!(parsed.host_str(), Some("[fd00:10:96::1]"));
    assert_eq!(parsed.port_or_known_default(), Some(443));
    // The kubelet's own value, unbracketed, is what breaks.
    assert!(reqwest::Url::parse("https://fd00:10:96::1:443").is_err());

    // Already bracketed stays bracketed once.
    let (out, _) = injected(&pod(json!({})), &node(json!({})), &with_host(Some("[fd00::1]")));
    assert_eq!(
        env_value(sidecar(&out), "KUBERNETES_SERVICE_HOST").as_deref(),
        Some("[fd00::1]")
    );
    // IPv4, a name, or unknown: the kubelet's variable is left alone.
    for host in [Some("10.96.0.1"), Some("kubernetes.default.svc"), None] {
        let (out, _) = injected(&pod(json!({})), &node(json!({})), &with_host(host));
        let c = sidecar(&out);
        assert!(env_of(c, "KUBERNETES_SERVICE_HOST").is_none(), "{host:?}");
        assert_eq!(
            env_value(c, "TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV").as_deref(),
            Some("true")
        );
    }
    let v4 = format!("https://{}:443", "10.96.0.1");
    assert!(reqwest::Url::parse(&v4).is_ok());
}

fn exporting() -> TailscaleNode {
    node(json!({"outbound": {"socks5Port": 1055, "exportEnv": true}}))
}

/// One admission (with reinvocations): the object after it, or the input when skipped.
fn admit(p: &Pod, n: &TailscaleNode, f: &ClusterFacts) -> Pod {
    match inject_pod(p, n, f).unwrap() {
        Outcome::Injected { object, .. } | Outcome::Refreshed { object } => object,
        Outcome::Skipped(_) => p.clone(),
    }
}

fn late(name: &str) -> Container {
    Container {
        name: name.into(),
        image: Some("late".into()),
        ..Default::default()
    }
}

#[test]
fn reinvocation_gives_later_containers_the_proxy_env_and_nothing_else() {
    for native in [true, false] {
        let f = restricted(native);
        let once = admit(&pod(json!({})), &exporting(), &f);
        // Injecting N times equals injecting once.
        let mut again = once.clone();
        for _ in 0..3 {
            again = admit(&again, &exporting(), &f);
        }
        assert_eq!(again, once);
        assert_eq!(
            inject_pod(&once, &exporting(), &f).unwrap(),
            Outcome::Skipped(Skip::AlreadyInjected)
        );

        // A later webhook adds a container (and, with a native sidecar, an init container).
        let mut added = once.clone();
        let spec = added.spec.as_mut().unwrap();
        spec.containers.push(late("late"));
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .push(late("late-init"));
        let Outcome::Refreshed { object } = inject_pod(&added, &exporting(), &f).unwrap() else {
            panic!("expected a refresh")
        };
        let spec = object.spec.as_ref().unwrap();
        let c = spec.containers.iter().find(|c| c.name == "late").unwrap();
        assert_eq!(env_value(c, "ALL_PROXY").as_deref(), Some("socks5h://127.0.0.1:1055"));
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == "late-init")
            .unwrap();
        assert_eq!(env_of(init, "ALL_PROXY").is_some(), native);
        // Everything else is as it was: strip the new env and compare.
        let mut stripped = object.clone();
        for c in stripped.spec.as_mut().unwrap().containers.iter_mut() {
            if c.name == "late" {
                c.env = None;
            }
        }
        for c in stripped.spec.as_mut().unwrap().init_containers.iter_mut().flatten() {
            if c.name == "late-init" {
                c.env = None;
            }
        }
        assert_eq!(stripped, added);
        // And the next reinvocation has nothing to do.
        assert_eq!(admit(&object, &exporting(), &f), object);
    }
}

#[test]
fn reinvocation_without_export_env_or_sidecar_changes_nothing() {
    let f = restricted(true);
    let quiet = node(json!({"outbound": {"socks5Port": 1055}}));
    let mut once = admit(&pod(json!({})), &quiet, &f);
    once.spec.as_mut().unwrap().containers.push(late("late"));
    assert_eq!(
        inject_pod(&once, &quiet, &f).unwrap(),
        Outcome::Skipped(Skip::AlreadyInjected)
    );
    // The mark without the sidecar (a copied annotation): no proxy env pointing at nothing.
    let marked = pod(json!({"metadata": {"annotations": {"tailnode.dev/injected": "x"}}}));
    assert_eq!(
        inject_pod(&marked, &exporting(), &f).unwrap(),
        Outcome::Skipped(Skip::AlreadyInjected)
    );
}
