//! The pod network namespace's own settings a TUN sidecar needs before it starts: IP forwarding
//! for one that routes for others, and rules that keep cluster traffic off an exit node.
//!
//! IP forwarding for a TUN sidecar that routes for others. A subnet router or exit node in TUN
//! mode forwards packets between `tailscale0` and the pod's own interfaces in the kernel, which
//! needs `net.ipv4.ip_forward` (and its IPv6 twin) on in the pod's network namespace. A new
//! namespace starts with forwarding off, containerboot does not turn it on, and a container can
//! write `/proc/sys` only when privileged. So such a pod gets a first init container, privileged,
//! that turns forwarding on and exits (the way Tailscale's own proxies do it); the sidecar itself
//! stays as it was. Namespace-scoped sysctls set here touch the pod alone, not the node.
//! (In userspace mode tailscaled dials the routed destinations itself: no forwarding needed.)
//!
//! An exit node becomes the default route of tailscaled's table 52, which its `ip rule` 5270
//! consults before the main table: without more, traffic to Services, other pods and the
//! apiserver would leave through the exit node (tailscale/tailscale#7695, #15173), and
//! `--exit-node-allow-lan-access` only exempts directly connected prefixes, which a Service range
//! never is. So such a pod gets an init container (NET_ADMIN, no privilege) that adds rules at
//! priority 5200 sending the cluster's ranges and the apiserver to the main table.

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

/// The init container that keeps cluster traffic off an exit node.
pub const LOCAL_ROUTES_NAME: &str = "tailscale-local-routes";

/// The `ip rule` priority of the cluster's ranges: before tailscaled's own rules (5210-5270, the
/// last of which sends everything to its table 52, where an exit node is the default route).
pub const LOCAL_RULE_PRIORITY: u32 = 5200;

/// PURE: the ranges a TUN sidecar of `spec` must keep off its exit node: the cluster's pod and
/// service CIDRs (`cluster`), when it uses one at all. (The apiserver's own address is added by
/// the container from `KUBERNETES_SERVICE_HOST`.) Userspace sidecars route nothing of the pod's.
pub fn local_ranges(spec: &TailscaleNodeSpec, mode: EffectiveMode, cluster: &[String]) -> Option<Vec<String>> {
    let uses_exit = spec.exit_node.as_ref().is_some_and(|e| e.use_node.is_some());
    (mode == EffectiveMode::Tun && uses_exit).then(|| cluster.to_vec())
}

/// PURE: the script that sends `ranges`, and the apiserver's address, to the main routing table
/// ahead of tailscaled's rules. Idempotent (a restarted pod sandbox runs it again).
pub fn local_routes_script(ranges: &[String]) -> String {
    let mut script = String::from(
        "set -e\nkeep() { case $1 in *:*) f=-6;; *) f=-4;; esac; \
         ip $f rule del to \"$1\" lookup main priority PRIO 2>/dev/null || true; \
         ip $f rule add to \"$1\" lookup main priority PRIO; echo \"local: $1\"; }\n",
    )
    .replace("PRIO", &LOCAL_RULE_PRIORITY.to_string());
    for r in ranges {
        script.push_str(&format!("keep '{r}'\n"));
    }
    script.push_str(
        "case ${KUBERNETES_SERVICE_HOST:-} in '') ;; *:*) keep \"$KUBERNETES_SERVICE_HOST/128\";; \
         *) keep \"$KUBERNETES_SERVICE_HOST/32\";; esac\n",
    );
    script
}

/// PURE: the init container that runs [`local_routes_script`] with NET_ADMIN (rules of the pod's
/// own network namespace; nothing of the node's).
pub fn local_routes_container(image: &str, ranges: &[String]) -> Container {
    use k8s_openapi::api::core::v1::Capabilities;
    Container {
        name: LOCAL_ROUTES_NAME.to_string(),
        image: Some(image.to_string()),
        command: Some(vec!["sh".into(), "-c".into(), local_routes_script(ranges)]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: container("").resources,
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
    fn only_a_tun_sidecar_that_uses_an_exit_node_keeps_cluster_ranges_local() {
        let cluster = vec!["10.244.0.0/16".to_string(), "fd00::/108".to_string()];
        let exit = spec(json!({"exitNode": {"use": "100.64.0.9"}}));
        assert_eq!(local_ranges(&exit, EffectiveMode::Tun, &cluster), Some(cluster.clone()));
        assert_eq!(local_ranges(&exit, EffectiveMode::Userspace, &cluster), None);
        let offering = spec(json!({"exitNode": {"advertise": true}}));
        assert_eq!(local_ranges(&offering, EffectiveMode::Tun, &cluster), None);
        // No ranges configured: the apiserver is still kept local.
        assert_eq!(local_ranges(&exit, EffectiveMode::Tun, &[]), Some(vec![]));
    }

    #[test]
    fn the_local_routes_script_puts_each_range_and_the_apiserver_before_tailscale() {
        let script = local_routes_script(&["10.244.0.0/16".into(), "fd00::/108".into()]);
        assert!(script.contains("priority 5200"), "{script}");
        assert!(script.contains("keep '10.244.0.0/16'\n") && script.contains("keep 'fd00::/108'\n"));
        assert!(script.contains("$KUBERNETES_SERVICE_HOST/32"), "{script}");
        assert!(script.contains("rule del to"), "idempotent: {script}");
        let c = local_routes_container("img", &[]);
        let sc = c.security_context.unwrap();
        assert_eq!(sc.privileged, None);
        assert_eq!(sc.capabilities.unwrap().add, Some(vec!["NET_ADMIN".to_string()]));
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
