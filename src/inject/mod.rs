//! The injection engine: a pure function from (pod, TailscaleNode, cluster facts) to the injected
//! pod, or the reason nothing was done. No I/O, no clock; the webhook and `tailnode inject` call it.

pub mod dns;
mod env;
mod facts;
pub mod forwarding;
mod hostname;
mod optin;
pub mod policy;
mod serve;
mod sidecar;

pub use facts::{
    ClusterFacts, DEFAULT_CLUSTER_DOMAIN, DEFAULT_IMAGE, DnsDefaults, OperatorDefaults, PodSecurityLevel, WorkloadKind,
};
pub use hostname::{MAX_HOSTNAME, bound_label};
pub use optin::{INJECT_LABEL, Membership, membership};
pub use serve::{ServeConfig, render_serve_config};
pub use sidecar::{DEFAULT_HEALTH_PORT, SERVE_DIR, SERVE_FILE};

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};

use crate::api::{
    CREDENTIALS_GATE, IDENTITY_ANNOTATION, INJECTED_ANNOTATION, MODE_ANNOTATION, Mode, NODE_LABEL, NativeSidecar,
    ReplicaIdentity, SIDECAR_NAME, SLOT_ANNOTATION, SLOTS_IDENTITY, SPEC_ANNOTATION, TailscaleNode, TailscaleNodeSpec,
};

/// Why the engine left a pod as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The pod has no `tailnode.dev/node` label.
    NotOptedIn,
    /// The pod names another TailscaleNode than the one given.
    OtherNode(String),
    /// The pod already carries the sidecar or the injected annotation.
    AlreadyInjected,
}

/// What the engine did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// The injected object and the mode that was chosen.
    Injected { object: T, mode: EffectiveMode },
    /// A reinvocation (`reinvocationPolicy: IfNeeded`) on an object tailnode had already injected:
    /// app containers added since (by a later webhook) got the outbound proxy env; nothing else
    /// changed.
    Refreshed { object: T },
    /// Nothing to do.
    Skipped(Skip),
}

/// The networking mode after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectiveMode {
    /// Userspace networking.
    Userspace,
    /// Kernel TUN networking.
    Tun,
}

impl EffectiveMode {
    /// Lower-case name, as recorded in the `tailnode.dev/mode` annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            EffectiveMode::Userspace => "userspace",
            EffectiveMode::Tun => "tun",
        }
    }
}

/// A pod the engine refuses to inject; the message tells the user what to change.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum InjectError {
    /// TUN was asked for in a namespace whose PodSecurity level forbids NET_ADMIN.
    #[error(
        "TailscaleNode {node} asks for mode tun, but namespace PodSecurity level '{level}' forbids NET_ADMIN and hostPath /dev/net/tun; use mode userspace or auto, or label the namespace pod-security.kubernetes.io/enforce=privileged (an unlabelled namespace is taken to be at the operator's --default-pod-security level, the cluster's default)"
    )]
    TunForbidden { node: String, level: &'static str },
    /// `isolateCredentials` cannot hold when the app shares the sidecar's process namespace.
    #[error(
        "TailscaleNode {node} isolates the sidecar's credentials (spec.sidecar.isolateCredentials), but the pod sets shareProcessNamespace: true, which would let the app read them through /proc; remove one of the two"
    )]
    SharedProcessNamespace { node: String },
    /// hostNetwork pods would put the node's own network on the tailnet.
    #[error("pod uses hostNetwork; tailnode injects only pods with their own network namespace")]
    HostNetwork,
    /// A volume or container the engine adds already exists under that name.
    #[error("pod already has a {what} named '{name}', which tailnode needs for its sidecar; rename it")]
    NameTaken { what: &'static str, name: String },
    /// MagicDNS replaces the pod's DNS settings, which the pod chose itself.
    #[error(
        "TailscaleNode {node} turns on dns.magicDNS, which sets the pod's dnsPolicy to None with tailnode's resolver, but the pod sets dnsPolicy: {policy}; remove it (the resolver forwards every non-tailnet name to the cluster DNS, and a dnsConfig of the pod is merged in) or turn dns.magicDNS off"
    )]
    DnsPolicy { node: String, policy: String },
    /// MagicDNS needs operator settings that are missing.
    #[error("TailscaleNode {node} turns on dns.magicDNS, but the operator was started without {missing}")]
    DnsUnconfigured { node: String, missing: &'static str },
    /// The pod keeps non-root processes off port 53, where the resolver listens.
    #[error(
        "TailscaleNode {node} turns on dns.magicDNS, whose resolver listens on 127.0.0.1:53 without privileges, but the pod sets net.ipv4.ip_unprivileged_port_start={value}; use 53 or lower, or remove it"
    )]
    DnsPortSysctl { node: String, value: String },
    /// A native sidecar was demanded where the cluster cannot run one.
    #[error(
        "TailscaleNode {node} sets sidecar.nativeSidecar: always, but this cluster does not support native sidecars (Kubernetes 1.29+)"
    )]
    NativeUnsupported { node: String },
}

/// Injects a Pod. The pod must name `node` with its label; see [`inject_template`]. A pod that
/// is not bound to a node yet also gets the [`CREDENTIALS_GATE`] scheduling gate (a pod created
/// with `spec.nodeName` cannot carry one: its sidecar may start before its key and retries).
///
/// With `replicaIdentity: slots`, a gated pod that is no StatefulSet's takes a slot: its sidecar
/// reads the slot number from the `tailnode.dev/slot` annotation the controller sets before it
/// opens the gate (see `controller::slots`).
pub fn inject_pod(pod: &Pod, node: &TailscaleNode, facts: &ClusterFacts) -> Result<Outcome<Pod>, InjectError> {
    let template = PodTemplateSpec {
        metadata: Some(pod.metadata.clone()),
        spec: pod.spec.clone(),
    };
    let slot = takes_slot(pod, node, facts);
    Ok(match inject(&template, node, facts, slot)? {
        Outcome::Injected { object, mode } => Outcome::Injected {
            object: Pod {
                metadata: object.metadata.unwrap_or_default(),
                spec: object.spec.map(gate),
                status: pod.status.clone(),
            },
            mode,
        },
        // Nothing but env changed; the gate went on at the first injection.
        Outcome::Refreshed { object } => Outcome::Refreshed {
            object: Pod {
                metadata: object.metadata.unwrap_or_default(),
                spec: object.spec,
                status: pod.status.clone(),
            },
        },
        Outcome::Skipped(skip) => Outcome::Skipped(skip),
    })
}

/// Injects a pod template (of a Pod, Deployment, StatefulSet, Job, ...). Everything the engine does
/// not add stays exactly as it was, order included.
pub fn inject_template(
    template: &PodTemplateSpec,
    node: &TailscaleNode,
    facts: &ClusterFacts,
) -> Result<Outcome<PodTemplateSpec>, InjectError> {
    inject(template, node, facts, false)
}

/// True when `pod` takes a slot: its node asks for slot identity, the pod will be gated (no
/// `nodeName`), and no StatefulSet owns it (those keep their ordinals).
fn takes_slot(pod: &Pod, node: &TailscaleNode, facts: &ClusterFacts) -> bool {
    let stateful = facts.workload == WorkloadKind::StatefulSet
        || pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "StatefulSet" && o.controller == Some(true));
    node.spec.replica_identity == ReplicaIdentity::Slots
        && pod.spec.as_ref().is_none_or(|s| s.node_name.is_none())
        && !stateful
}

fn inject(
    template: &PodTemplateSpec,
    node: &TailscaleNode,
    facts: &ClusterFacts,
    slot: bool,
) -> Result<Outcome<PodTemplateSpec>, InjectError> {
    let meta = template.metadata.clone().unwrap_or_default();
    let node_name = node.metadata.name.clone().unwrap_or_default();
    match meta.labels.as_ref().and_then(|l| l.get(NODE_LABEL)) {
        None => return Ok(Outcome::Skipped(Skip::NotOptedIn)),
        Some(named) if *named != node_name => return Ok(Outcome::Skipped(Skip::OtherNode(named.clone()))),
        Some(_) => {}
    }
    let spec = template.spec.clone().unwrap_or_default();
    if is_injected(&meta, &spec) {
        return Ok(refresh(meta, spec, &node.spec));
    }
    if spec.host_network == Some(true) {
        return Err(InjectError::HostNetwork);
    }
    let isolate = node.spec.sidecar.as_ref().is_some_and(|s| s.isolate_credentials);
    if isolate && spec.share_process_namespace == Some(true) {
        return Err(InjectError::SharedProcessNamespace { node: node_name });
    }
    if dns::wanted(&node.spec) {
        dns::check(&node_name, &spec, facts)?;
    }
    let mode = effective_mode(&node_name, &node.spec, facts)?;
    let native = match node.spec.sidecar.as_ref().map(|s| s.native_sidecar).unwrap_or_default() {
        NativeSidecar::Auto => facts.native_sidecars,
        NativeSidecar::Always if !facts.native_sidecars => {
            return Err(InjectError::NativeUnsupported { node: node_name });
        }
        NativeSidecar::Always => true,
        NativeSidecar::Never => false,
    };
    let plan = sidecar::Plan {
        node_name: &node_name,
        spec: &node.spec,
        facts,
        mode,
        native,
        hostname: if slot {
            hostname::slot_hostname(&node_name, &node.spec)
        } else {
            hostname::hostname_for(&meta, &node_name, &node.spec, facts.workload)
        },
        own_token: isolate || spec.automount_service_account_token == Some(false),
        slot,
    };
    let mut spec = spec;
    if isolate {
        // The app containers get no token; the sidecar mounts its own (`own_token`). The
        // apiserver's ServiceAccount admission ran before this webhook and already mounted the
        // token into every container: take that out again.
        spec.automount_service_account_token = Some(false);
        strip_token_volumes(&mut spec);
    }
    sidecar::add(&mut spec, &plan)?;
    let mut meta = meta;
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    // Slots are tailnode's to hand out: whatever the pod brought is dropped.
    annotations.remove(SLOT_ANNOTATION);
    annotations.remove(IDENTITY_ANNOTATION);
    if slot {
        annotations.insert(IDENTITY_ANNOTATION.to_string(), SLOTS_IDENTITY.to_string());
    }
    annotations.insert(
        INJECTED_ANNOTATION.to_string(),
        spec_hash(&node.spec, facts, mode, native),
    );
    annotations.insert(MODE_ANNOTATION.to_string(), mode.as_str().to_string());
    annotations.insert(SPEC_ANNOTATION.to_string(), node_spec_hash(&node.spec));
    Ok(Outcome::Injected {
        object: PodTemplateSpec {
            metadata: Some(meta),
            spec: Some(spec),
        },
        mode,
    })
}

/// Reinvocation on an injected object: gives the outbound proxy env (when `outbound.exportEnv`
/// is set) to app containers that lack it, with the same merge as the first injection (a variable
/// a container sets is kept), and changes nothing else. Idempotent: a second call finds nothing
/// to add and skips. An object that carries the mark but not the sidecar is skipped too (its
/// proxies would point at nothing).
fn refresh(meta: ObjectMeta, spec: PodSpec, node: &TailscaleNodeSpec) -> Outcome<PodTemplateSpec> {
    let skip = Outcome::Skipped(Skip::AlreadyInjected);
    let Some(outbound) = node.outbound.as_ref().filter(|o| o.export_env) else {
        return skip;
    };
    let native = spec.init_containers.iter().flatten().any(|c| c.name == SIDECAR_NAME);
    if !native && spec.containers.iter().all(|c| c.name != SIDECAR_NAME) {
        return skip;
    }
    let mut updated = spec.clone();
    env::export_proxy_env(&mut updated, outbound, native);
    if updated == spec {
        return skip;
    }
    Outcome::Refreshed {
        object: PodTemplateSpec {
            metadata: Some(meta),
            spec: Some(updated),
        },
    }
}

/// Adds the credentials gate to an unbound pod's spec (once).
fn gate(mut spec: PodSpec) -> PodSpec {
    if spec.node_name.is_some() {
        return spec;
    }
    let gates = spec.scheduling_gates.get_or_insert_with(Vec::new);
    if gates.iter().all(|g| g.name != CREDENTIALS_GATE) {
        gates.push(k8s_openapi::api::core::v1::PodSchedulingGate {
            name: CREDENTIALS_GATE.to_string(),
        });
    }
    spec
}

/// True when the pod carries the credentials gate.
pub fn is_gated(spec: Option<&PodSpec>) -> bool {
    spec.and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == CREDENTIALS_GATE))
}

/// True when the pod already carries tailnode's sidecar or its mark.
pub fn is_injected(meta: &ObjectMeta, spec: &PodSpec) -> bool {
    let marked = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_NAME);
    marked || has_sidecar
}

/// Resolves `auto` against the namespace's PodSecurity level and refuses TUN where it cannot run.
pub fn effective_mode(
    node: &str,
    spec: &TailscaleNodeSpec,
    facts: &ClusterFacts,
) -> Result<EffectiveMode, InjectError> {
    let tun_allowed = facts.pod_security.allows_net_admin();
    match spec.mode {
        Mode::Userspace => Ok(EffectiveMode::Userspace),
        Mode::Auto if tun_allowed => Ok(EffectiveMode::Tun),
        Mode::Auto => Ok(EffectiveMode::Userspace),
        Mode::Tun if tun_allowed => Ok(EffectiveMode::Tun),
        Mode::Tun => Err(InjectError::TunForbidden {
            node: node.to_string(),
            level: facts.pod_security.as_str(),
        }),
    }
}

/// Removes the ServiceAccount token volumes the apiserver adds (`kube-api-access-*`, a projected
/// volume with a `serviceAccountToken` source) and every container's mount of them.
fn strip_token_volumes(spec: &mut k8s_openapi::api::core::v1::PodSpec) {
    let token_volumes: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.name.starts_with("kube-api-access-")
                && v.projected
                    .as_ref()
                    .is_some_and(|p| p.sources.iter().flatten().any(|s| s.service_account_token.is_some()))
        })
        .map(|v| v.name.clone())
        .collect();
    if token_volumes.is_empty() {
        return;
    }
    if let Some(volumes) = spec.volumes.as_mut() {
        volumes.retain(|v| !token_volumes.contains(&v.name));
    }
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for c in containers {
        if let Some(mounts) = c.volume_mounts.as_mut() {
            mounts.retain(|m| !token_volumes.contains(&m.name));
            if mounts.is_empty() {
                c.volume_mounts = None;
            }
        }
    }
}

/// A short, stable hash of a TailscaleNode spec: what the webhook records on each pod and the
/// controller compares with the current spec.
pub fn node_spec_hash(spec: &TailscaleNodeSpec) -> String {
    let digest = Sha256::digest(serde_json::to_vec(spec).unwrap_or_default());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A short, stable hash of everything that shaped the injected sidecar.
pub fn spec_hash(spec: &TailscaleNodeSpec, facts: &ClusterFacts, mode: EffectiveMode, native: bool) -> String {
    let mut h = Sha256::new();
    // Serialising typed values with sorted fields is deterministic.
    h.update(serde_json::to_vec(spec).unwrap_or_default());
    h.update(serde_json::to_vec(&facts.defaults).unwrap_or_default());
    h.update(mode.as_str().as_bytes());
    h.update([u8::from(native)]);
    // Only pods that use them depend on the DNS settings (other pods' hashes stay as they were).
    // The search list also names the pod's namespace, which no pod ever changes: it is left out,
    // so the policy's render (per node) and the webhook (per pod) agree.
    if dns::wanted(spec) {
        h.update(serde_json::to_vec(&facts.defaults.dns).unwrap_or_default());
    }
    let digest = h.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod fit_tests;
#[cfg(test)]
mod gate_tests;
#[cfg(test)]
mod slot_tests;
#[cfg(test)]
mod tests;
