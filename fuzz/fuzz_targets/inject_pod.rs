//! The engine, `inject_pod`, with a fuzzed TailscaleNode spec, Pod and cluster facts: realistic
//! JSON bases edited by the fuzzer's bytes, then typed through serde like the apiserver's objects.
//! Never a panic; an injected pod has exactly one sidecar, serialises, and is not injected twice.
#![no_main]

use arbitrary::Unstructured;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::sync::OnceLock;
use tailnode::api::{SIDECAR_NAME, TailscaleNode};
use tailnode::inject::{
    ClusterFacts, DnsDefaults, OperatorDefaults, Outcome, PodSecurityLevel, Skip, WorkloadKind, inject_pod,
};
use tailnode_fuzz::{node, node_specs, pick, pods, word};

static BASES: OnceLock<(Vec<Value>, Vec<Value>)> = OnceLock::new();

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let (specs, pods) = BASES.get_or_init(|| (node_specs(), pods()));
    let (_, spec) = pick(u, specs, true)?;
    let (_, pod) = pick(u, pods, true)?;
    let name = *u.choose(&["web", "web", "web", "other", ""])?;
    let (Ok(node), Ok(pod)) = (
        serde_json::from_value::<TailscaleNode>(node(name, spec)),
        serde_json::from_value::<Pod>(pod),
    ) else {
        return Ok(());
    };
    let facts = ClusterFacts {
        native_sidecars: u.arbitrary()?,
        pod_security: *u.choose(&[
            PodSecurityLevel::Privileged,
            PodSecurityLevel::Baseline,
            PodSecurityLevel::Restricted,
        ])?,
        workload: *u.choose(&[WorkloadKind::Other, WorkloadKind::StatefulSet])?,
        defaults: OperatorDefaults {
            image: if u.ratio(1, 4)? {
                word(u)?
            } else {
                OperatorDefaults::default().image
            },
            control_url: if u.ratio(1, 4)? { Some(word(u)?) } else { None },
            no_logs_no_support: u.arbitrary()?,
            // MagicDNS pods: the operator knows the cluster DNS and the resolver's image, or not.
            dns: if u.ratio(3, 4)? {
                DnsDefaults {
                    cluster_dns: vec!["10.96.0.10:53".to_string()],
                    cluster_domain: "cluster.local".to_string(),
                    proxy_image: Some("tailnode/tailnode:0.1.0".to_string()),
                }
            } else {
                DnsDefaults::default()
            },
            ..OperatorDefaults::default()
        },
        api_server_host: u
            .choose(&[None, Some("10.96.0.1".to_string()), Some("fd00::1".to_string())])?
            .clone(),
        namespace: u.choose(&[None, Some("apps".to_string())])?.clone(),
    };
    if let Ok(Outcome::Injected { object, .. }) = inject_pod(&pod, &node, &facts) {
        let spec = object.spec.as_ref().expect("an injected pod has a spec");
        let sidecars = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter(|c| c.name == SIDECAR_NAME)
            .count();
        assert_eq!(sidecars, 1, "an injected pod has exactly one sidecar");
        serde_json::to_vec(&object).expect("the injected pod serialises");
        assert_eq!(
            inject_pod(&object, &node, &facts),
            Ok(Outcome::Skipped(Skip::AlreadyInjected)),
            "injecting twice"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
