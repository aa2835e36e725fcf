//! IP forwarding for a TUN sidecar that routes for others. A subnet router or exit node in TUN
//! mode forwards packets between `tailscale0` and the pod's own interfaces in the kernel, which
//! needs `net.ipv4.ip_forward` (and its IPv6 twin) on in the pod's network namespace. A new
//! namespace starts with forwarding off, containerboot does not turn it on, and a container can
//! write `/proc/sys` only when privileged. So such a pod gets a first init container, privileged,
//! that turns forwarding on and exits (the way Tailscale's own proxies do it); the sidecar itself
//! stays as it was. Namespace-scoped sysctls set here touch the pod alone, not the node.
//! (In userspace mode tailscaled dials the routed destinations itself: no forwarding needed.)

use k8s_openapi::api::core::v1::{Container, ResourceRequirements, SecurityContext};

use super::EffectiveMode;
use crate::api::TailscaleNodeSpec;

/// The init container's name.
pub const FORWARDING_NAME: &str = "tailscale-forwarding";

/// PURE: whether a sidecar of `spec` in `mode` forwards for others (advertises routes or offers
/// itself as an exit node) in the kernel.
pub fn needed(spec: &TailscaleNodeSpec, mode: EffectiveMode) -> bool {
    mode == EffectiveMode::Tun
        && (spec.routes.as_ref().is_some_and(|r| !r.advertise.is_empty())
            || spec.exit_node.as_ref().is_some_and(|e| e.advertise))
}

/// PURE: the init container that turns forwarding on, from the sidecar's own image (whose shell
/// has `sysctl`: the official image's busybox).
pub fn container(image: &str) -> Container {
    Container {
        name: FORWARDING_NAME.to_string(),
        image: Some(image.to_string()),
        command: Some(vec![
            "sysctl".into(),
            "-w".into(),
            "net.ipv4.ip_forward=1".into(),
            "net.ipv6.conf.all.forwarding=1".into(),
        ]),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(
                [(
                    "cpu".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("1m".into()),
                )]
                .into(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> TailscaleNodeSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_a_tun_router_or_exit_node_forwards() {
        let router = spec(json!({"routes": {"advertise": ["10.0.0.0/24"]}}));
        let exit = spec(json!({"exitNode": {"advertise": true}}));
        let accepting = spec(json!({"routes": {"accept": true}, "exitNode": {"use": "100.64.0.9"}}));
        assert!(needed(&router, EffectiveMode::Tun));
        assert!(needed(&exit, EffectiveMode::Tun));
        assert!(!needed(&router, EffectiveMode::Userspace), "netstack dials for itself");
        assert!(
            !needed(&accepting, EffectiveMode::Tun),
            "accepting routes forwards nothing"
        );
        assert!(!needed(&spec(json!({})), EffectiveMode::Tun));
    }

    #[test]
    fn the_init_container_is_privileged_and_only_sets_forwarding() {
        let c = container("tailscale/tailscale:v1.102.5");
        assert_eq!(c.image.as_deref(), Some("tailscale/tailscale:v1.102.5"));
        let cmd = c.command.unwrap();
        assert_eq!(cmd[..2], ["sysctl".to_string(), "-w".to_string()]);
        assert!(
            cmd[2..]
                .iter()
                .all(|a| a.ends_with("forwarding=1") || a == "net.ipv4.ip_forward=1")
        );
        assert_eq!(c.security_context.unwrap().privileged, Some(true));
    }
}
