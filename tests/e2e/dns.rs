//! MagicDNS in the app containers (`dns.magicDNS`): a userspace pod (in a PodSecurity
//! `restricted` namespace) and a TUN pod resolve tailnet names with plain busybox `nslookup`,
//! reach each other by name with `wget`, and still resolve cluster names.
//!
//! Local harness only: it relies on the harness's cluster DNS (CoreDNS on the kube-dns ClusterIP,
//! `TAILNODE_E2E_CLUSTER_DNS`, given to the chart as `clusterDNS`) and on Headscale's MagicDNS
//! base domain `tailnet.test` (e2e/local/up).
//!
//! busybox's `nslookup` (1.35) sends the name as given, without the search list, so cluster names
//! are looked up fully qualified there; `wget` resolves through the C library, which walks the
//! search list, so `kubernetes.default` by its short name is fetched with it.

use std::time::{Duration, Instant};

use kube::ResourceExt;
use serde_json::json;

use crate::cluster::{Cluster, Ns, WAIT, data, ips};
use crate::workloads::{deployment, member_with, node};

/// The tailnet's MagicDNS domain on the local harness (Headscale's `dns.base_domain`).
const BASE_DOMAIN: &str = "tailnet.test";
/// The `kubernetes` Service's ClusterIP on the local harness.
const APISERVER_IP: &str = "198.18.0.129";

/// Runs `sh -c script` in the app container until stdout+stderr contains `want`; returns it.
async fn app_until(c: &Cluster, ns: &Ns, pod: &str, script: &str, want: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, out, err) = c.exec(&ns.name, pod, "app", &["sh", "-c", script]);
        let all = format!("{out}{err}");
        if all.contains(want) {
            return all;
        }
        if Instant::now() > deadline {
            let (_, log, _) = c.kubectl(&["logs", "-n", &ns.name, pod, "-c", "tailscale-dns", "--tail=30"]);
            panic!("{pod}: {script:?} never printed {want:?}; last:\n{all}\n--- tailscale-dns log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// A ready MagicDNS pod of TailscaleNode `app`: (pod name, tailnet FQDN without the dot, IPv4).
async fn magic_pod(c: &Cluster, ns: &Ns, app: &str, spec: serde_json::Value, body: &str) -> (String, String, String) {
    node(ns, app, spec).await;
    deployment(c, ns, app, app, "default", body).await;
    let pod = ns.ready_pod(app).await;
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.dns_policy.as_deref(), Some("None"), "dnsPolicy");
    assert_eq!(
        spec.dns_config.as_ref().and_then(|d| d.nameservers.clone()),
        Some(vec!["127.0.0.1".to_string()])
    );
    let name = pod.name_any();
    let s = ns
        .secret_where(&format!("ts-{name}"), |s| {
            !ips(s).is_empty() && data(s, "device_fqdn").is_some()
        })
        .await;
    let fqdn = data(&s, "device_fqdn").unwrap().trim_end_matches('.').to_string();
    assert!(fqdn.ends_with(BASE_DOMAIN), "{fqdn} is not under {BASE_DOMAIN}");
    let ip = ips(&s).into_iter().find(|i| !i.contains(':')).expect("an IPv4 address");
    (name, fqdn, ip)
}

/// The scenario.
pub async fn magicdns_in_app_containers(c: Cluster) {
    let user_ns = Ns::new(
        &c,
        "dnsu",
        json!({"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}),
    )
    .await;
    let tun_ns = Ns::new(&c, "dnst", json!({"pod-security.kubernetes.io/enforce": "privileged"})).await;
    let member = member_with(&c, &tun_ns, "dnslaptop", "").await;
    let (_, out, _) = c.exec(
        &tun_ns.name,
        &member,
        "member",
        &["tailscale", "--socket=/tmp/ts.sock", "ip", "-4"],
    );
    let member_ip = out.trim().to_string();
    assert!(member_ip.starts_with("100."), "member IP: {out}");

    let user_spec = json!({"mode": "userspace", "tags": ["tag:k8s"], "dns": {"magicDNS": true}, "outbound": {"httpProxyPort": 1056}});
    let tun_spec = json!({"mode": "tun", "tags": ["tag:k8s"], "dns": {"magicDNS": true}});
    let (user, user_fqdn, user_ip) = magic_pod(&c, &user_ns, "dnsu", user_spec, "hello from userspace").await;
    let (tun, tun_fqdn, tun_ip) = magic_pod(&c, &tun_ns, "dnst", tun_spec, "hello from tun").await;
    let member_fqdn = format!("dnslaptop.{BASE_DOMAIN}");

    for (ns, pod, peer_fqdn, peer_ip) in [
        (&user_ns, &user, &tun_fqdn, &tun_ip),
        (&tun_ns, &tun, &user_fqdn, &user_ip),
    ] {
        // Tailnet names, with a plain nslookup: a member and the other pod.
        app_until(&c, ns, pod, &format!("nslookup {member_fqdn}"), &member_ip).await;
        app_until(&c, ns, pod, &format!("nslookup {peer_fqdn}"), peer_ip).await;
        // An unknown tailnet name is NXDOMAIN (tailscaled says REFUSED; the resolver turns that
        // into NXDOMAIN so stub resolvers move on), not a timeout or SERVFAIL.
        app_until(&c, ns, pod, &format!("nslookup nope-{pod}.{BASE_DOMAIN}"), "NXDOMAIN").await;
        // Cluster names still resolve: fully qualified with nslookup, by the short name
        // `kubernetes.default` through the search list with wget (the apiserver answers a plain
        // HTTP request on its TLS port with 400, which proves the name resolved and connected).
        app_until(
            &c,
            ns,
            pod,
            "nslookup kubernetes.default.svc.cluster.local",
            APISERVER_IP,
        )
        .await;
        app_until(
            &c,
            ns,
            pod,
            "timeout 10 wget -q -O- http://kubernetes.default:443/ 2>&1; true",
            "400",
        )
        .await;
    }

    // wget by MagicDNS name. TUN: straight over tailscale0 (the name resolves through the pod's
    // resolver, with the search list's cluster candidates first).
    app_until(
        &c,
        &tun_ns,
        &tun,
        &format!("timeout 10 wget -q -O- http://{user_fqdn}:8080/"),
        "hello from userspace",
    )
    .await;
    // Userspace: the app has no route to tailnet addresses; it reaches them through the
    // sidecar's HTTP proxy, by the same name.
    app_until(
        &c,
        &user_ns,
        &user,
        &format!("http_proxy=http://127.0.0.1:1056 timeout 10 wget -q -O- http://{tun_fqdn}:8080/"),
        "hello from tun",
    )
    .await;
    user_ns.delete().await;
    tun_ns.delete().await;
}
