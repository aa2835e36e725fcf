//! PURE: what the chart's MutatingAdmissionPolicy adds to a pod (`injector: policy`), rendered by
//! the engine itself.
//!
//! CEL cannot run this engine (no SHA-256, no regex replace), so the controller runs it for every
//! TailscaleNode on canonical pods, one per variant the policy must tell apart, and writes the
//! result into `status.injection`; the policy only picks a variant and copies it. A variant is
//! keyed `<pod security level>/<identity>/<own token>`:
//! - the namespace's PodSecurity level (`privileged`, `baseline`, `restricted`), which decides
//!   `auto` and refuses `tun`;
//! - the identity: `pod` (per-pod identity), `statefulset` (a StatefulSet's replica, by ordinal)
//!   or `slot` (`replicaIdentity: slots`, a pod without `spec.nodeName` and no StatefulSet's);
//! - whether the sidecar mounts its own token (`isolateCredentials`, or the pod turned
//!   automounting off).
//!
//! What depends on the pod itself stays in CEL and is given here as tables: the hostname of a
//! per-pod identity (`hostnamePrefixes[room]` is [`bound_label`] of the prefix for every room, so
//! CEL never hashes), the outbound proxy variables (`proxyEnv`), the credentials gate, the token
//! volumes `isolateCredentials` strips, and MagicDNS's pod settings (`dns`: the resolver's
//! `dnsConfig` and sysctl, into which CEL merges the pod's own, and the refusals around the
//! pod's values).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, PodDNSConfig, PodSpec, Sysctl, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;

use super::{ClusterFacts, InjectError, MAX_HOSTNAME, Outcome, PodSecurityLevel, bound_label, dns, env, inject_pod};
use crate::api::{NODE_LABEL, ReplicaIdentity, SIDECAR_NAME, TailscaleNode};

/// The hostname env var whose value the policy replaces for per-pod identities.
const HOSTNAME_ENV: &str = "TS_HOSTNAME";
/// Identities, as the policy spells them in a variant key.
const POD: &str = "pod";
const STATEFULSET: &str = "statefulset";
const SLOT: &str = "slot";

/// `status.injection`: everything the policy copies.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInjection {
    /// The level of a namespace without a `pod-security.kubernetes.io/enforce` label.
    pub default_pod_security: &'static str,
    /// `spec.sidecar.isolateCredentials`.
    pub isolate_credentials: bool,
    /// `replicaIdentity: slots`.
    pub slots: bool,
    /// The sidecar is a native sidecar (first init container); else the last container.
    pub native: bool,
    /// `bound_label(spec.hostname, room)` for room 0..=62; empty without `spec.hostname`.
    pub hostname_prefixes: Vec<String>,
    /// The outbound proxy variables (`outbound.exportEnv`), empty without.
    pub proxy_env: Vec<ProxyVar>,
    /// MagicDNS (`spec.dns.magicDNS`): what the policy merges into the pod; absent without.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<PolicyDns>,
    /// Variant key to an index of `renders`.
    pub variants: BTreeMap<String, usize>,
    /// The distinct renders.
    pub renders: Vec<Render>,
}

/// One proxy variable and its lower-case twin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyVar {
    /// Upper-case name.
    pub upper: String,
    /// Lower-case name.
    pub lower: String,
    /// Value.
    pub value: String,
}

/// What MagicDNS does to the pod itself, as tables: the policy merges the pod's own `dnsConfig`
/// and sysctls into these the way `dns::configure_pod` does, and refuses what `dns::check`
/// refuses, with the same messages.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDns {
    /// The `dnsConfig` of a pod that brings none: the resolver first, the namespace's search
    /// list, the default options. The pod's own entries are merged in after these.
    pub config: PodDNSConfig,
    /// The sysctl the resolver needs, added unless the pod sets it (to 53 or lower) itself.
    pub sysctl: Sysctl,
    /// The refusal of a pod whose `dnsPolicy` is not `ClusterFirst`: the text before and after
    /// the policy's name.
    pub policy_refusal: [String; 2],
    /// The refusal of a pod whose port sysctl is above 53 (or no number): before and after its
    /// value.
    pub sysctl_refusal: [String; 2],
    /// The refusal of every such pod when the operator lacks a setting MagicDNS needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unconfigured: Option<String>,
}

/// What one variant adds, or why the engine refuses it.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Render {
    /// The webhook's refusal message for this variant; nothing else is set then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Init containers to put first, in order (the native sidecar among them).
    pub init_containers: Vec<Container>,
    /// Containers to append (a regular sidecar).
    pub containers: Vec<Container>,
    /// Volumes to append.
    pub volumes: Vec<Volume>,
    /// Annotations to set.
    pub annotations: BTreeMap<String, String>,
    /// Index of the sidecar in `init_containers` (native) or -1.
    pub sidecar_init_index: i64,
    /// Index of `TS_HOSTNAME` in the sidecar's env.
    pub hostname_env: i64,
}

/// Renders `status.injection` for `node` (its name and spec; `facts.pod_security` and
/// `facts.workload` are ignored: each variant sets its own).
pub fn render(node: &TailscaleNode, facts: &ClusterFacts) -> PolicyInjection {
    let spec = &node.spec;
    // MagicDNS pods get their search list from their namespace, the node's.
    let facts = &ClusterFacts {
        namespace: node.metadata.namespace.clone(),
        ..facts.clone()
    };
    let isolate = spec.sidecar.as_ref().is_some_and(|s| s.isolate_credentials);
    let slots = spec.replica_identity == ReplicaIdentity::Slots;
    let mut identities = vec![POD, STATEFULSET];
    if slots {
        identities.push(SLOT);
    }
    let owns: &[bool] = if isolate { &[true] } else { &[false, true] };
    let levels = [
        PodSecurityLevel::Privileged,
        PodSecurityLevel::Baseline,
        PodSecurityLevel::Restricted,
    ];
    let mut renders: Vec<Render> = Vec::new();
    let mut variants = BTreeMap::new();
    for level in levels {
        for identity in &identities {
            for own in owns {
                let facts = ClusterFacts {
                    pod_security: level,
                    ..facts.clone()
                };
                let r = render_one(node, &facts, identity, *own);
                let index = match renders.iter().position(|x| *x == r) {
                    Some(i) => i,
                    None => {
                        renders.push(r);
                        renders.len() - 1
                    }
                };
                variants.insert(format!("{}/{identity}/{own}", level.as_str()), index);
            }
        }
    }
    let hostname_prefixes = spec
        .hostname
        .as_deref()
        .map(|h| bound_label(h, usize::MAX))
        .filter(|p| !p.is_empty())
        .map(|p| (0..MAX_HOSTNAME).map(|room| bound_label(&p, room)).collect())
        .unwrap_or_default();
    let proxy_env = spec
        .outbound
        .as_ref()
        .filter(|o| o.export_env)
        .map(|o| {
            env::proxy_vars(o)
                .into_iter()
                .map(|(upper, lower, value)| ProxyVar {
                    upper: upper.to_string(),
                    lower: lower.to_string(),
                    value,
                })
                .collect()
        })
        .unwrap_or_default();
    PolicyInjection {
        default_pod_security: facts.defaults.unlabelled_namespace_level.as_str(),
        isolate_credentials: isolate,
        slots,
        native: native(node, facts),
        hostname_prefixes,
        proxy_env,
        dns: dns::wanted(spec).then(|| policy_dns(node, facts)),
        variants,
        renders,
    }
}

/// The MagicDNS tables of `node`, from the engine's own functions and messages.
fn policy_dns(node: &TailscaleNode, facts: &ClusterFacts) -> PolicyDns {
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut bare = PodSpec::default();
    dns::configure_pod(&mut bare, facts);
    let sysctl = bare
        .security_context
        .and_then(|s| s.sysctls)
        .and_then(|s| s.into_iter().find(|s| s.name == dns::PORT_SYSCTL))
        .unwrap_or_else(|| Sysctl {
            name: dns::PORT_SYSCTL.into(),
            value: "53".into(),
        });
    let around = |e: InjectError| {
        let message = format!("tailnode: {e}");
        let (before, after) = message.split_once(MARK).unwrap_or((&message, ""));
        [before.to_string(), after.to_string()]
    };
    PolicyDns {
        config: bare.dns_config.unwrap_or_default(),
        sysctl,
        policy_refusal: around(InjectError::DnsPolicy {
            node: name.clone(),
            policy: MARK.into(),
        }),
        sysctl_refusal: around(InjectError::DnsPortSysctl {
            node: name.clone(),
            value: MARK.into(),
        }),
        // A pod without DNS settings of its own passes every check but the operator's.
        unconfigured: dns::check(&name, &PodSpec::default(), facts)
            .err()
            .map(|e| format!("tailnode: {e}")),
    }
}

/// Stands for the pod's value in a refusal split around it.
const MARK: &str = "\u{1}";

/// Whether the sidecar goes among the init containers (as the engine decides it).
fn native(node: &TailscaleNode, facts: &ClusterFacts) -> bool {
    use crate::api::NativeSidecar;
    match node.spec.sidecar.as_ref().map(|s| s.native_sidecar).unwrap_or_default() {
        NativeSidecar::Auto => facts.native_sidecars,
        NativeSidecar::Always => true,
        NativeSidecar::Never => false,
    }
}

/// The canonical pod of one variant, injected by the engine; what it gained is the render.
fn render_one(node: &TailscaleNode, facts: &ClusterFacts, identity: &str, own: bool) -> Render {
    let name = node.metadata.name.clone().unwrap_or_default();
    let owner = (identity == STATEFULSET).then(|| {
        vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            name: "canonical".into(),
            uid: "canonical".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }]
    });
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("canonical".into()),
            labels: Some(BTreeMap::from([(NODE_LABEL.to_string(), name)])),
            owner_references: owner,
            ..Default::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: own.then_some(false),
            // A per-pod identity on a slots node: a pod bound to a node at creation keeps it.
            node_name: (identity == POD).then(|| "canonical".to_string()),
            ..Default::default()
        }),
        status: None,
    };
    let injected = match inject_pod(&pod, node, facts) {
        Ok(Outcome::Injected { object, .. }) => object,
        Ok(_) => return Render::default(),
        Err(e) => {
            return Render {
                error: Some(format!("tailnode: {e}")),
                ..Render::default()
            };
        }
    };
    let spec = injected.spec.unwrap_or_default();
    let init_containers = spec.init_containers.unwrap_or_default();
    let containers = spec.containers;
    let sidecar_init_index = init_containers
        .iter()
        .position(|c| c.name == SIDECAR_NAME)
        .and_then(|i| i64::try_from(i).ok())
        .unwrap_or(-1);
    let hostname_env = init_containers
        .iter()
        .chain(&containers)
        .find(|c| c.name == SIDECAR_NAME)
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().position(|e| e.name == HOSTNAME_ENV))
        .and_then(|i| i64::try_from(i).ok())
        .unwrap_or(-1);
    Render {
        error: None,
        init_containers,
        containers,
        volumes: spec.volumes.unwrap_or_default(),
        annotations: injected.metadata.annotations.unwrap_or_default(),
        sidecar_init_index,
        hostname_env,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(spec: serde_json::Value) -> TailscaleNode {
        serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
            "metadata": {"name": "web", "namespace": "apps"}, "spec": spec}))
        .unwrap()
    }

    #[test]
    fn magic_dns_is_rendered_with_the_tables_the_policy_merges_and_the_engine_s_refusals() {
        let mut facts = ClusterFacts::default();
        facts.defaults.dns = super::super::DnsDefaults {
            cluster_dns: vec!["10.96.0.10:53".into()],
            cluster_domain: "cluster.local".into(),
            proxy_image: Some("tailnode/tailnode:dev".into()),
        };
        let magic = node(json!({"dns": {"magicDNS": true}}));
        let r = render(&magic, &facts);
        assert!(r.renders.iter().all(|x| x.error.is_none()));
        let base = &r.renders[r.variants["baseline/pod/false"]];
        let names: Vec<&str> = base.init_containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["tailscale-dns", "tailscale"]);
        assert_eq!(base.sidecar_init_index, 1);
        let d = r.dns.as_ref().expect("MagicDNS tables");
        assert_eq!(d.config.nameservers.as_deref(), Some(&["127.0.0.1".to_string()][..]));
        // The search list is the node's namespace's: the policy's pods are in the same one.
        assert_eq!(d.config.searches.as_ref().unwrap()[0], "apps.svc.cluster.local");
        assert_eq!(d.sysctl.name, "net.ipv4.ip_unprivileged_port_start");
        assert_eq!(d.sysctl.value, "53");
        assert!(d.unconfigured.is_none());
        // The refusals, joined around the pod's value, are the webhook's own messages.
        let refused = |spec: serde_json::Value| {
            let pod: Pod =
                serde_json::from_value(json!({"metadata": {"name": "p", "labels": {NODE_LABEL: "web"}}, "spec": spec}))
                    .unwrap();
            match inject_pod(&pod, &magic, &facts) {
                Err(e) => format!("tailnode: {e}"),
                Ok(_) => panic!("the engine injected {spec}"),
            }
        };
        let [a, b] = &d.policy_refusal;
        assert_eq!(
            format!("{a}Default{b}"),
            refused(json!({"dnsPolicy": "Default", "containers": []}))
        );
        let [a, b] = &d.sysctl_refusal;
        let sysctls = json!({"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "1024"}]});
        assert_eq!(
            format!("{a}1024{b}"),
            refused(json!({"securityContext": sysctls, "containers": []}))
        );
        // Without the operator's settings every pod is refused, first by the tables.
        let r = render(&magic, &ClusterFacts::default());
        let unconfigured = r.dns.and_then(|d| d.unconfigured).expect("the missing flag");
        assert!(unconfigured.contains("--cluster-dns"));
        assert!(
            r.renders
                .iter()
                .all(|x| x.error.as_deref() == Some(unconfigured.as_str()))
        );
        assert!(render(&node(json!({})), &facts).dns.is_none());
    }

    #[test]
    fn auto_renders_tun_only_where_privileged_and_tun_is_refused_elsewhere() {
        let auto = render(&node(json!({"mode": "auto"})), &ClusterFacts::default());
        let priv_ = &auto.renders[auto.variants["privileged/pod/false"]];
        let base = &auto.renders[auto.variants["baseline/pod/false"]];
        assert_eq!(priv_.annotations["tailnode.dev/mode"], "tun");
        assert_eq!(base.annotations["tailnode.dev/mode"], "userspace");
        let tun = render(&node(json!({"mode": "tun"})), &ClusterFacts::default());
        let refused = &tun.renders[tun.variants["restricted/statefulset/true"]];
        assert!(refused.error.as_deref().unwrap().contains("forbids NET_ADMIN"));
    }

    #[test]
    fn the_sidecar_and_its_hostname_env_are_located() {
        let r = render(&node(json!({"hostname": "Web.App"})), &ClusterFacts::default());
        assert_eq!(r.hostname_prefixes.len(), MAX_HOSTNAME);
        assert_eq!(r.hostname_prefixes[62], "web-app");
        assert_eq!(r.hostname_prefixes[3], "web");
        let sts = &r.renders[r.variants["baseline/statefulset/false"]];
        assert_eq!(sts.sidecar_init_index, 0);
        let env = sts.init_containers[0].env.as_ref().unwrap();
        let h = &env[usize::try_from(sts.hostname_env).unwrap()];
        assert_eq!(h.value.as_deref(), Some("web-app-$(TS_POD_INDEX)"));
        // Identical variants share one render.
        assert!(r.renders.len() < r.variants.len());
    }

    #[test]
    fn slots_render_their_identity_and_proxy_env_is_tabled() {
        let r = render(
            &node(json!({"replicaIdentity": "slots", "outbound": {"socks5Port": 1055, "exportEnv": true}})),
            &ClusterFacts::default(),
        );
        let slot = &r.renders[r.variants["baseline/slot/false"]];
        assert_eq!(slot.annotations["tailnode.dev/identity"], "slots");
        assert!(
            !r.renders[r.variants["baseline/pod/false"]]
                .annotations
                .contains_key("tailnode.dev/identity")
        );
        assert_eq!(r.proxy_env[0].upper, "ALL_PROXY");
    }
}
