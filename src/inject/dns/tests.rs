use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::super::tests::{facts, injected, node, pod, sidecar};
use super::super::{InjectError, PodSecurityLevel, inject_pod, spec_hash};
use super::*;
use crate::inject::DnsDefaults;

fn dns_facts(level: PodSecurityLevel, native: bool) -> ClusterFacts {
    let mut f = facts(level, native);
    f.namespace = Some("apps".into());
    f.defaults.dns = DnsDefaults {
        cluster_dns: vec!["10.96.0.10:53".into()],
        cluster_domain: "cluster.local".into(),
        proxy_image: Some("tailnode/tailnode:dev".into()),
    };
    f
}

fn magic() -> crate::api::TailscaleNode {
    node(json!({"dns": {"magicDNS": true}}))
}

fn resolver(p: &Pod) -> &Container {
    let spec = p.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == DNS_NAME)
        .expect("the resolver container")
}

#[test]
fn off_by_default_leaves_dns_alone() {
    let (p, _) = injected(
        &pod(json!({})),
        &node(json!({})),
        &dns_facts(PodSecurityLevel::Restricted, true),
    );
    let spec = p.spec.unwrap();
    assert_eq!((spec.dns_policy, spec.dns_config), (None, None));
    assert!(spec.security_context.is_none());
    assert!(spec.init_containers.iter().flatten().all(|c| c.name != DNS_NAME));
}

#[test]
fn a_userspace_pod_gets_the_resolver_first_and_the_cluster_search_list() {
    let (p, mode) = injected(
        &pod(json!({})),
        &magic(),
        &dns_facts(PodSecurityLevel::Restricted, true),
    );
    assert_eq!(mode, EffectiveMode::Userspace);
    let spec = p.spec.as_ref().unwrap();
    let inits: Vec<_> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(inits, [DNS_NAME, "tailscale"], "the resolver starts before tailscaled");
    assert_eq!(spec.dns_policy.as_deref(), Some("None"));
    let cfg = spec.dns_config.as_ref().unwrap();
    assert_eq!(cfg.nameservers.as_deref(), Some(&["127.0.0.1".to_string()][..]));
    assert_eq!(
        cfg.searches.as_deref().unwrap(),
        ["apps.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    );
    let opts = cfg.options.as_ref().unwrap();
    assert_eq!(
        (opts[0].name.as_deref(), opts[0].value.as_deref()),
        (Some("ndots"), Some("5"))
    );
    let sysctls = spec.security_context.as_ref().unwrap().sysctls.as_ref().unwrap();
    assert_eq!(
        (sysctls[0].name.as_str(), sysctls[0].value.as_str()),
        (PORT_SYSCTL, "53")
    );

    let r = resolver(&p);
    assert_eq!(r.image.as_deref(), Some("tailnode/tailnode:dev"));
    assert_eq!(r.restart_policy.as_deref(), Some("Always"));
    let cmd = r.command.as_ref().unwrap();
    assert_eq!(cmd[..2], ["/tailnode".to_string(), "dns-proxy".to_string()]);
    assert!(cmd.contains(&"--upstream=10.96.0.10:53".to_string()), "{cmd:?}");
    assert!(cmd.contains(&"--socket=/var/run/tailscale/tailscaled.sock".to_string()));
    // PodSecurity restricted: non-root (tailscaled's uid, for LocalAPI write access), no
    // escalation, all capabilities dropped, RuntimeDefault seccomp.
    let sc = r.security_context.as_ref().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_non_root), (Some(1000), Some(true)));
    assert_eq!(
        sidecar(&p).security_context.as_ref().unwrap().run_as_user,
        sc.run_as_user,
        "the same uid as tailscaled"
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let mount = &r.volume_mounts.as_ref().unwrap()[0];
    let sidecar_tmp = sidecar(&p)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/tmp")
        .unwrap();
    assert_eq!(
        (mount.name.as_str(), mount.read_only),
        (sidecar_tmp.name.as_str(), Some(true))
    );
}

#[test]
fn a_tun_resolver_runs_as_root_like_tailscaled_and_a_legacy_pod_gets_a_regular_container() {
    let n = node(json!({"mode": "tun", "dns": {"magicDNS": true}}));
    let (p, _) = injected(&pod(json!({})), &n, &dns_facts(PodSecurityLevel::Privileged, true));
    let sc = resolver(&p).security_context.clone().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_non_root), (Some(0), Some(false)));
    assert_eq!(sc.capabilities.unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));

    let (p, _) = injected(
        &pod(json!({})),
        &magic(),
        &dns_facts(PodSecurityLevel::Restricted, false),
    );
    let names: Vec<_> = p
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["app", "metrics", "tailscale", DNS_NAME]);
    assert_eq!(resolver(&p).restart_policy, None);
}

#[test]
fn the_pods_own_dns_config_is_merged_in() {
    let own = pod(json!({"spec": {"dnsPolicy": "ClusterFirst", "dnsConfig": {
        "nameservers": ["10.0.0.53"], "searches": ["corp.example", "svc.cluster.local"],
        "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]},
        "securityContext": {"runAsNonRoot": true, "sysctls": [{"name": PORT_SYSCTL, "value": "0"}]}}}));
    let (p, _) = injected(&own, &magic(), &dns_facts(PodSecurityLevel::Restricted, true));
    let spec = p.spec.unwrap();
    let cfg = spec.dns_config.unwrap();
    assert_eq!(cfg.nameservers.unwrap(), ["127.0.0.1", "10.0.0.53"]);
    assert_eq!(
        cfg.searches.unwrap(),
        [
            "apps.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
            "corp.example"
        ]
    );
    let opts: Vec<_> = cfg.options.unwrap().into_iter().map(|o| (o.name, o.value)).collect();
    assert_eq!(
        opts,
        [(Some("ndots".into()), Some("2".into())), (Some("edns0".into()), None)]
    );
    let sc = spec.security_context.unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.sysctls.unwrap().len(), 1, "the pod's own 0 already allows port 53");
}

#[test]
fn refuses_pods_that_chose_their_dns_and_an_operator_without_the_cluster_dns() {
    let f = dns_facts(PodSecurityLevel::Restricted, true);
    for policy in ["None", "Default"] {
        let p = pod(json!({"spec": {"dnsPolicy": policy, "dnsConfig": {"nameservers": ["1.1.1.1"]}}}));
        let err = inject_pod(&p, &magic(), &f).unwrap_err();
        assert!(matches!(err, InjectError::DnsPolicy { .. }), "{policy}");
        assert!(err.to_string().contains(&format!("dnsPolicy: {policy}")), "{err}");
    }
    let high = pod(json!({"spec": {"securityContext": {"sysctls": [{"name": PORT_SYSCTL, "value": "1024"}]}}}));
    assert!(matches!(
        inject_pod(&high, &magic(), &f).unwrap_err(),
        InjectError::DnsPortSysctl { .. }
    ));
    let mut no_dns = f.clone();
    no_dns.defaults.dns.cluster_dns.clear();
    let err = inject_pod(&pod(json!({})), &magic(), &no_dns).unwrap_err();
    assert!(err.to_string().contains("--cluster-dns"), "{err}");
    let mut no_image = f.clone();
    no_image.defaults.dns.proxy_image = None;
    let err = inject_pod(&pod(json!({})), &magic(), &no_image).unwrap_err();
    assert!(err.to_string().contains("--dns-proxy-image"), "{err}");
    // Without MagicDNS none of it matters.
    assert!(inject_pod(&pod(json!({"spec": {"dnsPolicy": "None"}})), &node(json!({})), &no_dns).is_ok());
    let taken = pod(json!({"spec": {"containers": [{"name": DNS_NAME, "image": "x"}]}}));
    assert!(matches!(
        inject_pod(&taken, &magic(), &f).unwrap_err(),
        InjectError::NameTaken { .. }
    ));
}

#[test]
fn only_magicdns_pods_hash_the_dns_settings() {
    let f = dns_facts(PodSecurityLevel::Restricted, true);
    let mut other = f.clone();
    other.defaults.dns.cluster_dns = vec!["10.96.0.11:53".into()];
    let plain = node(json!({})).spec;
    assert_eq!(
        spec_hash(&plain, &f, EffectiveMode::Userspace, true),
        spec_hash(&plain, &other, EffectiveMode::Userspace, true)
    );
    let m = magic().spec;
    assert_ne!(
        spec_hash(&m, &f, EffectiveMode::Userspace, true),
        spec_hash(&m, &other, EffectiveMode::Userspace, true)
    );
}

#[test]
fn search_list_without_a_namespace() {
    assert_eq!(searches(None, "corp.local", &[]), ["svc.corp.local", "corp.local"]);
}

#[test]
fn a_reinvocation_leaves_the_resolver_without_proxy_env() {
    // Found by the inject_pod fuzz target: a reinvocation gave the proxy env to the resolver, an
    // init container that the first injection had added after exporting the env.
    let n = node(json!({"dns": {"magicDNS": true}, "outbound": {"httpProxyPort": 1056, "exportEnv": true}}));
    let f = dns_facts(PodSecurityLevel::Restricted, true);
    let (once, _) = injected(&pod(json!({})), &n, &f);
    assert!(resolver(&once).env.is_none(), "the resolver takes no proxy env");
    let again = inject_pod(&once, &n, &f).unwrap();
    assert!(
        matches!(
            again,
            super::super::Outcome::Skipped(super::super::Skip::AlreadyInjected)
        ),
        "{again:?}"
    );
}
