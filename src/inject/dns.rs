//! MagicDNS for the app containers (`spec.dns.magicDNS`).
//!
//! The pod's `dnsPolicy` becomes `None` with a `dnsConfig` whose first nameserver is 127.0.0.1,
//! where the `tailscale-dns` container (`tailnode dns-proxy`, from the operator's image: the
//! sidecar image is Tailscale's own and cannot carry it) answers tailnet names from tailscaled's
//! LocalAPI and forwards the rest to the cluster DNS. Why not the alternatives:
//! - 100.100.100.100: a userspace pod has no route to it, and with `--accept-dns=false` (which
//!   keeps containerboot away from resolv.conf) it has no upstream for cluster names.
//! - a hosts file kept in sync from the netmap: the app's `/etc/hosts` is the kubelet's, written
//!   at start; a shared volume over it would need a writer in the sidecar image, which is not ours.
//! - forwarding only in `dnsConfig`: resolvers ask nameservers in order and the kubelet puts the
//!   cluster DNS first under `ClusterFirst`, so tailnet names would go there and fail.
//!
//! The resolver starts before the tailscale sidecar (so tailscaled itself can resolve a control
//! server's name) and needs tailscaled's LocalAPI socket, in the sidecar's `/tmp` volume, with
//! write access: it runs as tailscaled's uid (1000 in userspace mode, root in TUN mode). It binds
//! port 53 without privileges through the pod sysctl `net.ipv4.ip_unprivileged_port_start=53`,
//! one of the safe sysctls PodSecurity `restricted` admits.

use k8s_openapi::api::core::v1::{
    Container, PodDNSConfig, PodDNSConfigOption, PodSecurityContext, PodSpec, ResourceRequirements, Sysctl,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{ClusterFacts, EffectiveMode, InjectError};
use crate::api::TailscaleNodeSpec;

/// The resolver container's name.
pub const DNS_NAME: &str = "tailscale-dns";
/// Where the resolver listens; the pod's first nameserver.
pub const RESOLVER_IP: &str = "127.0.0.1";
/// The sysctl that lets a non-root process bind port 53 in the pod's network namespace.
pub const PORT_SYSCTL: &str = "net.ipv4.ip_unprivileged_port_start";
/// Where the resolver mounts the sidecar's `/tmp` (tailscaled's socket is in it).
pub const SOCKET_DIR: &str = "/var/run/tailscale";
/// The `ndots` MagicDNS pods get, as under `ClusterFirst`.
const NDOTS: &str = "5";

/// PURE: whether `spec` asks for MagicDNS.
pub fn wanted(spec: &TailscaleNodeSpec) -> bool {
    spec.dns.as_ref().is_some_and(|d| d.magic_dns)
}

/// PURE: checks that a pod can take MagicDNS and that the operator knows the cluster DNS.
pub fn check(node: &str, pod: &PodSpec, facts: &ClusterFacts) -> Result<(), InjectError> {
    let dns = &facts.defaults.dns;
    match pod.dns_policy.as_deref() {
        None | Some("ClusterFirst") | Some("ClusterFirstWithHostNet") => {}
        Some(other) => {
            return Err(InjectError::DnsPolicy {
                node: node.to_string(),
                policy: other.to_string(),
            });
        }
    }
    if dns.cluster_dns.is_empty() {
        return Err(InjectError::DnsUnconfigured {
            node: node.to_string(),
            missing: "--cluster-dns (the cluster DNS Service's IP; chart value clusterDNS)",
        });
    }
    if dns.proxy_image.is_none() {
        return Err(InjectError::DnsUnconfigured {
            node: node.to_string(),
            missing: "--dns-proxy-image (tailnode's own image; the chart sets it)",
        });
    }
    let sysctl = pod
        .security_context
        .as_ref()
        .and_then(|s| s.sysctls.as_ref())
        .and_then(|s| s.iter().find(|s| s.name == PORT_SYSCTL));
    if let Some(s) = sysctl
        && s.value.trim().parse::<u32>().map_or(true, |v| v > 53)
    {
        return Err(InjectError::DnsPortSysctl {
            node: node.to_string(),
            value: s.value.clone(),
        });
    }
    Ok(())
}

/// PURE: the search list: the namespace's services, all services, the cluster domain (the
/// kubelet's `ClusterFirst` list), then the pod's own `dnsConfig.searches`.
pub fn searches(namespace: Option<&str>, cluster_domain: &str, own: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(ns) = namespace.filter(|n| !n.is_empty()) {
        out.push(format!("{ns}.svc.{cluster_domain}"));
    }
    out.push(format!("svc.{cluster_domain}"));
    out.push(cluster_domain.to_string());
    for s in own {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// PURE: sets the pod's DNS to the resolver: `dnsPolicy: None`, 127.0.0.1 first (then any
/// nameservers the pod added itself), the cluster's search list, `ndots:5` unless the pod sets
/// its own, the pod's other options kept; and the port sysctl.
pub fn configure_pod(spec: &mut PodSpec, facts: &ClusterFacts) {
    let own = spec.dns_config.take().unwrap_or_default();
    let mut nameservers = vec![RESOLVER_IP.to_string()];
    nameservers.extend(
        own.nameservers
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n != RESOLVER_IP),
    );
    let mut options = own.options.unwrap_or_default();
    if options.iter().all(|o| o.name.as_deref() != Some("ndots")) {
        options.insert(
            0,
            PodDNSConfigOption {
                name: Some("ndots".into()),
                value: Some(NDOTS.into()),
            },
        );
    }
    spec.dns_policy = Some("None".into());
    spec.dns_config = Some(PodDNSConfig {
        nameservers: Some(nameservers),
        searches: Some(searches(
            facts.namespace.as_deref(),
            &facts.defaults.dns.cluster_domain,
            &own.searches.unwrap_or_default(),
        )),
        options: Some(options),
    });
    let sysctls = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default)
        .sysctls
        .get_or_insert_with(Vec::new);
    if sysctls.iter().all(|s| s.name != PORT_SYSCTL) {
        sysctls.push(Sysctl {
            name: PORT_SYSCTL.into(),
            value: "53".into(),
        });
    }
}

/// PURE: the resolver container. `volume` is the sidecar's `/tmp` volume (tailscaled's socket).
pub fn container(facts: &ClusterFacts, mode: EffectiveMode, native: bool, volume: &str) -> Container {
    let dns = &facts.defaults.dns;
    let uid = match mode {
        EffectiveMode::Userspace => super::sidecar::NON_ROOT_UID,
        EffectiveMode::Tun => 0,
    };
    let q = |s: &str| Quantity(s.to_string());
    Container {
        name: DNS_NAME.into(),
        image: dns.proxy_image.clone(),
        command: Some(vec![
            "/tailnode".into(),
            "dns-proxy".into(),
            format!("--upstream={}", dns.cluster_dns.join(",")),
            format!("--socket={SOCKET_DIR}/tailscaled.sock"),
        ]),
        security_context: Some(super::sidecar::locked_down(uid)),
        resources: Some(ResourceRequirements {
            requests: Some([("cpu".to_string(), q("5m")), ("memory".to_string(), q("8Mi"))].into()),
            limits: Some([("memory".to_string(), q("64Mi"))].into()),
            claims: None,
        }),
        volume_mounts: Some(vec![k8s_openapi::api::core::v1::VolumeMount {
            name: volume.into(),
            mount_path: SOCKET_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        restart_policy: native.then(|| "Always".to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
