//! The pods `policy.rs` admits through both paths beside the examples: TailscaleNodes and pods
//! that reach every branch of the engine the policy must reproduce (hostnames, tokens, proxy env,
//! identities, refusals).

use serde_json::{Value, json};

/// An app container that passes PodSecurity `restricted`.
pub fn app() -> Value {
    json!({"name": "app", "image": "localhost/busybox:e2e", "securityContext": crate::workloads::restricted()})
}

/// The edge cases beside the examples: (node name, node spec), then (case, pod).
pub fn edge_nodes() -> Vec<(&'static str, Value)> {
    vec![
        ("plain", json!({})),
        (
            "named",
            json!({"hostname": "a-rather-long-hostname-prefix-for-the-room-table"}),
        ),
        ("isolated", json!({"sidecar": {"isolateCredentials": true}})),
        (
            "proxy",
            json!({"outbound": {"socks5Port": 1055, "httpProxyPort": 1056, "exportEnv": true, "noProxy": ["db.internal"]}}),
        ),
        ("slots", json!({"replicaIdentity": "slots", "hostname": "web"})),
        ("tun", json!({"mode": "tun"})),
        (
            "regular",
            json!({"sidecar": {"nativeSidecar": "never"}, "outbound": {"socks5Port": 1055, "exportEnv": true}}),
        ),
        ("dns", json!({"dns": {"magicDNS": true}})),
        (
            "dns-regular",
            json!({"dns": {"magicDNS": true}, "sidecar": {"nativeSidecar": "never"}}),
        ),
    ]
}

pub fn edge_pods() -> Vec<(&'static str, Value)> {
    let app = json!({"name": "app", "image": "localhost/busybox:e2e"});
    let pod = |node: &str, meta: Value, spec: Value| {
        let mut p = json!({"metadata": meta, "spec": spec});
        p["metadata"]["labels"]["tailnode.dev/node"] = json!(node);
        if p["spec"]["containers"].is_null() {
            p["spec"]["containers"] = json!([app.clone()]);
        }
        p
    };
    vec![
        ("plain-named", pod("plain", json!({"name": "p1"}), json!({}))),
        (
            "plain-generated",
            pod("plain", json!({"generateName": "web-"}), json!({})),
        ),
        (
            "named-prefix-generated-long",
            pod(
                "named",
                json!({"generateName": "a-very-long-generated-name-base-that-leaves-little-room-"}),
                json!({}),
            ),
        ),
        ("named-prefix-named", pod("named", json!({"name": "short"}), json!({}))),
        (
            "named-hostname-annotation",
            pod(
                "plain",
                json!({"name": "p2", "annotations": {"tailnode.dev/hostname": "Custom-Host"}}),
                json!({}),
            ),
        ),
        (
            "isolated-token-stripped",
            pod("isolated", json!({"name": "p3"}), json!({})),
        ),
        (
            "isolated-share-process-namespace",
            pod(
                "isolated",
                json!({"name": "p4"}),
                json!({"shareProcessNamespace": true}),
            ),
        ),
        (
            "automount-off",
            pod(
                "plain",
                json!({"name": "p5"}),
                json!({"automountServiceAccountToken": false}),
            ),
        ),
        (
            "proxy-env-merge",
            pod(
                "proxy",
                json!({"name": "p6"}),
                json!({
            "initContainers": [{"name": "init", "image": "localhost/busybox:e2e"}],
            "containers": [{"name": "app", "image": "localhost/busybox:e2e", "env": [{"name": "http_proxy", "value": "mine"}]},
                           {"name": "other", "image": "localhost/busybox:e2e"}]}),
            ),
        ),
        (
            "regular-sidecar-proxy",
            pod("regular", json!({"name": "p7"}), json!({})),
        ),
        (
            "slots-gated",
            pod(
                "slots",
                json!({"generateName": "web-5f7c-", "annotations": {"tailnode.dev/slot": "3"}}),
                json!({}),
            ),
        ),
        (
            "slots-bound-to-a-node",
            pod("slots", json!({"name": "p8"}), json!({"nodeName": "tailnode-e2e"})),
        ),
        (
            "statefulset-replica",
            pod(
                "plain",
                json!({"name": "db-2", "labels": {"apps.kubernetes.io/pod-index": "2"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "00000000-0000-0000-0000-000000000002", "controller": true}]}),
                json!({}),
            ),
        ),
        ("tun-refused-at-baseline", pod("tun", json!({"name": "p9"}), json!({}))),
        ("missing-node", pod("nowhere", json!({"name": "p10"}), json!({}))),
        (
            "host-network",
            pod("plain", json!({"name": "p11"}), json!({"hostNetwork": true})),
        ),
        (
            "volume-name-taken",
            pod(
                "plain",
                json!({"name": "p12"}),
                json!({"volumes": [{"name": "tailnode-tmp", "emptyDir": {}}]}),
            ),
        ),
        (
            "already-has-a-sidecar",
            pod(
                "plain",
                json!({"name": "p13"}),
                json!({"containers": [app.clone(), {"name": "tailscale", "image": "x"}]}),
            ),
        ),
        (
            "existing-gate-and-annotations",
            pod(
                "plain",
                json!({"name": "p14", "annotations": {"team": "a"}}),
                json!({"schedulingGates": [{"name": "other"}]}),
            ),
        ),
        // MagicDNS: the pod's own DNS settings are merged into the resolver's, or refused.
        ("dns-plain", pod("dns", json!({"name": "d1"}), json!({}))),
        (
            "dns-merges-the-pod-s-own-config-and-sysctls",
            pod(
                "dns",
                json!({"name": "d2"}),
                json!({"dnsConfig": {"nameservers": ["198.18.0.9", "127.0.0.1"],
                    "searches": ["corp.internal", "svc.cluster.local", "corp.internal", "lab.internal"],
                    "options": [{"name": "edns0"}, {"name": "timeout", "value": "2"}]},
                    "securityContext": {"runAsNonRoot": true,
                        "sysctls": [{"name": "net.ipv4.ping_group_range", "value": "0 1000"}]}}),
            ),
        ),
        (
            "dns-keeps-the-pod-s-ndots-and-a-low-port-sysctl",
            pod(
                "dns",
                json!({"name": "d3"}),
                json!({"dnsPolicy": "ClusterFirstWithHostNet",
                    "dnsConfig": {"options": [{"name": "ndots", "value": "2"}]},
                    "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "+0052"}]}}),
            ),
        ),
        (
            "dns-refuses-dns-policy-default",
            pod("dns", json!({"name": "d4"}), json!({"dnsPolicy": "Default"})),
        ),
        (
            "dns-refuses-a-higher-port-sysctl",
            pod(
                "dns",
                json!({"name": "d5"}),
                json!({"securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "1024"}]}}),
            ),
        ),
        (
            "dns-refuses-a-port-sysctl-that-is-no-number",
            pod(
                "dns",
                json!({"name": "d6"}),
                json!({"securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "low"}]}}),
            ),
        ),
        (
            "dns-regular-sidecar",
            pod("dns-regular", json!({"generateName": "web-"}), json!({})),
        ),
    ]
}
