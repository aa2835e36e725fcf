//! Subnet routes both ways, on the local real node, with Headscale approving the routes
//! (`POST /api/v1/node/{id}/approve_routes`). Local only: the test plumbs network namespaces of
//! its own into the pods' namespaces.
//!
//! ```text
//!  netns tnsa-*               router pod (TUN sidecar)                member pod (userspace)             netns tnsb-*
//!  10.77.0.2 httpd :8080 ==veth== 10.77.0.1   tailscale0 ~~ tailnet ~~ netstack   10.78.0.1 ==veth== 10.78.0.2 httpd :8080
//!                                 eth0 198.18.0.x (bridge)              eth0 198.18.0.y (bridge)
//! ```
//!
//! A. The router pod advertises 10.77.0.0/24; once approved, the member (`--accept-routes`)
//!    fetches `http://10.77.0.2:8080/` through it: the pod forwards in the kernel, with forwarding
//!    on in its own namespace (the `tailscale-forwarding` init container) and tailscaled's SNAT.
//! B. The member advertises 10.78.0.0/24; once approved, the router pod's app container
//!    (`routes.accept`) fetches `http://10.78.0.2:8080/` over `tailscale0`.
//!
//! The host's namespace keeps ip_forward 0 and no NAT: the only forwarding is inside the pods.
//!
//! Exit node (`exit_node_keeps_the_cluster_reachable`):
//!
//! ```text
//!  egress pod (TUN, exitNode.use)        member pod (userspace, exit node)   netns tnsr-* (router)       netns tnsh-*
//!  tailscale0 ~~~~~~~~ tailnet ~~~~~~~~~~ netstack  10.99.0.1 ==veth== 10.99.0.2   203.0.113.1 ==veth== 203.0.113.10 httpd :8080
//!  eth0 198.18.0.x/25 ---- bridge: other pods (198.18.0.0/25), the apiserver at the
//!                          `kubernetes` ClusterIP 198.18.0.129 (service range 198.18.0.128/25)
//! ```
//!
//! The "internet" host 203.0.113.10 and the service range are outside the pod's directly connected
//! prefix (198.18.0.0/25), so `--exit-node-allow-lan-access` alone would not keep the apiserver
//! reachable: the `tailscale-local-routes` init container's rules do. A userspace pod's proxied
//! traffic (`outbound.exportEnv`: the app's `http_proxy`) reaches the internet host through the
//! exit node as well.

use std::process::Command;

use kube::ResourceExt;
use serde_json::json;

use crate::cluster::{Cluster, Ns, data};
use crate::support;
use crate::workloads::{app_container, deployment, member_get, member_with, node};

/// A network namespace with a host (`addr`/24, busybox httpd on :8080 saying `body`), wired by a
/// veth pair to the network namespace of process `pid` (which gets `gateway`/24). Removed on drop.
struct SubnetHost {
    netns: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip ARGS` in the network namespace of process `pid`.
fn ip_in(pid: u32, args: &[&str]) {
    let pid = pid.to_string();
    let mut all = vec!["-t", pid.as_str(), "-n", "ip"];
    all.extend_from_slice(args);
    let out = Command::new("nsenter").args(&all).output().expect("nsenter");
    assert!(
        out.status.success(),
        "nsenter ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// busybox httpd on `addr:8080` in network namespace `netns`, answering `body` (it daemonizes;
/// the namespace's drop stops it).
fn serve(netns: &str, addr: &str, body: &str) {
    let root = std::env::temp_dir().join(netns);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), body).unwrap();
    let listen = format!("{addr}:8080");
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "busybox", "httpd", "-p", &listen, "-h"])
        .arg(&root)
        .output()
        .expect("busybox httpd");
    assert!(out.status.success(), "httpd: {}", String::from_utf8_lossy(&out.stderr));
}

/// The names of a pod's init containers, in order.
fn init_names(pod: &k8s_openapi::api::core::v1::Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .map(|c| c.name.clone())
        .collect()
}

impl SubnetHost {
    fn wire(tag: &str, pid: u32, gateway: &str, addr: &str, body: &str) -> SubnetHost {
        let netns = format!("tns{tag}-{}", std::process::id());
        let (inner, outer) = (format!("tnv{tag}i{}", pid % 10000), format!("tnv{tag}o{}", pid % 10000));
        ip(&["netns", "add", &netns]);
        let host = SubnetHost { netns: netns.clone() };
        ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer]);
        ip(&["link", "set", &inner, "netns", &pid.to_string()]);
        ip(&["link", "set", &outer, "netns", &netns]);
        ip_in(pid, &["addr", "add", &format!("{gateway}/24"), "dev", &inner]);
        ip_in(pid, &["link", "set", &inner, "up"]);
        ip(&["-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", &outer]);
        ip(&["-n", &netns, "link", "set", &outer, "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        serve(&netns, addr, body);
        host
    }
}

impl Drop for SubnetHost {
    fn drop(&mut self) {
        if crate::cluster::keep() {
            return;
        }
        // The httpd first (it lives in the namespace), then the namespace and its veth ends.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.netns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.netns));
    }
}

/// An "internet" host behind a router, both in network namespaces of their own, wired to the
/// network namespace of process `pid` (an exit node): the exit node reaches `203.0.113.10` via
/// `10.99.0.2`, a hop away. (A host on one of its own links would not do: an exit node keeps its
/// directly connected LANs out of the default route it offers.) Removed on drop.
struct InternetHost {
    _host: SubnetHost,
    _router: SubnetHost,
}

impl InternetHost {
    fn wire(pid: u32, body: &str) -> InternetHost {
        let router = SubnetHost::wire("r", pid, "10.99.0.1", "10.99.0.2", "router");
        let host_ns = format!("tnsh-{}", std::process::id());
        ip(&["netns", "add", &host_ns]);
        let host = SubnetHost { netns: host_ns.clone() };
        let (r_if, h_if) = (format!("tnvhr{}", pid % 10000), format!("tnvhh{}", pid % 10000));
        ip(&["link", "add", &r_if, "type", "veth", "peer", "name", &h_if]);
        ip(&["link", "set", &r_if, "netns", &router.netns]);
        ip(&["link", "set", &h_if, "netns", &host_ns]);
        ip(&["-n", &router.netns, "addr", "add", "203.0.113.1/24", "dev", &r_if]);
        ip(&["-n", &router.netns, "link", "set", &r_if, "up"]);
        ip(&["-n", &host_ns, "addr", "add", "203.0.113.10/24", "dev", &h_if]);
        ip(&["-n", &host_ns, "link", "set", &h_if, "up"]);
        ip(&["-n", &host_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &host_ns, "route", "add", "default", "via", "203.0.113.1"]);
        // Forwarding inside the router's own namespace only (the host's stays 0).
        ip(&["netns", "exec", &router.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ip_in(pid, &["route", "add", "203.0.113.0/24", "via", "10.99.0.2"]);
        serve(&host_ns, "203.0.113.10", body);
        InternetHost {
            _host: host,
            _router: router,
        }
    }
}

/// The pid of a process whose `/proc/PID/<file>` has a NUL-separated part that `pred` accepts.
fn pid_where(file: &str, pred: impl Fn(&str) -> bool) -> Option<u32> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{file}")) else {
            continue;
        };
        if bytes
            .split(|b| *b == 0)
            .any(|part| pred(&String::from_utf8_lossy(part)))
        {
            found = Some(found.map_or(pid, |p: u32| p.min(pid)));
        }
    }
    found
}

/// Approves `routes` of Headscale node `id`.
async fn approve(c: &Cluster, id: &str, routes: &[&str]) {
    let resp = c
        .headscale()
        .request(reqwest::Method::POST, &format!("/api/v1/node/{id}/approve_routes"))
        .json(&json!({"routes": routes}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "approve_routes {id}: {}", resp.status());
}

pub async fn subnet_routes_both_ways(c: Cluster) {
    let ns = Ns::new(
        &c,
        "routes",
        json!({"pod-security.kubernetes.io/enforce": "privileged"}),
    )
    .await;
    node(
        &ns,
        "router",
        json!({"mode": "tun", "tags": ["tag:k8s"],
               "routes": {"advertise": ["10.77.0.0/24"], "accept": true}}),
    )
    .await;
    deployment(&c, &ns, "router", "router", "default", "router").await;
    let pod = ns.ready_pod("router").await;
    let name = pod.name_any();
    let init = init_names(&pod);
    assert_eq!(
        init.first().map(String::as_str),
        Some("tailscale-forwarding"),
        "the forwarding init container comes first: {init:?}"
    );
    let (ok, fwd, err) = c.exec(&ns.name, &name, "app", &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert!(
        ok && fwd.trim() == "1",
        "forwarding is off in the router pod: {fwd} {err}"
    );
    let s = ns
        .secret_where(&format!("ts-{name}"), |s| data(s, "device_id").is_some())
        .await;
    let router_id = data(&s, "device_id").unwrap();

    let member_name = format!("subnets-{}", support::unique("m"));
    let member = member_with(&c, &ns, &member_name, "--accept-routes --advertise-routes=10.78.0.0/24").await;
    let nodes = c.headscale_nodes().await;
    let member_id = nodes
        .iter()
        .find(|n| {
            [&n["name"], &n["givenName"]]
                .iter()
                .any(|v| v.as_str() == Some(member_name.as_str()))
        })
        .and_then(|n| n["id"].as_str().map(String::from))
        .expect("the member in Headscale");
    approve(&c, &router_id, &["10.77.0.0/24"]).await;
    approve(&c, &member_id, &["10.78.0.0/24"]).await;

    // The subnets, each behind its router.
    let router_pid = pid_where("environ", |e| e == format!("TS_KUBE_SECRET=ts-{name}"))
        .expect("the router pod's containerboot on this node");
    let member_pid = pid_where("cmdline", |a| a.contains(&format!("--hostname={member_name};")))
        .expect("the member pod's shell on this node");
    let _a = SubnetHost::wire("a", router_pid, "10.77.0.1", "10.77.0.2", "behind-the-router");
    let _b = SubnetHost::wire("b", member_pid, "10.78.0.1", "10.78.0.2", "behind-the-member");

    // A: a member reaches the pod's subnet through the pod.
    member_get(&c, &ns, &member, "10.77.0.2", 8080, "behind-the-router").await;
    // B: the pod reaches the member's subnet, from its app container, over tailscale0.
    c.exec_until(
        &ns.name,
        &name,
        "app",
        // (Not `wget -T`: this busybox's wget crashes with it.)
        &["timeout", "8", "wget", "-q", "-O-", "http://10.78.0.2:8080/"],
        "behind-the-member",
    )
    .await;
    ns.delete().await;
}

/// The harness's `kubernetes` ClusterIP, where the apiserver listens (`e2e/local/up`).
const APISERVER: &str = "198.18.0.129";

/// Headscale's id and first IPv4 of the node named `name`.
async fn headscale_node(c: &Cluster, name: &str) -> (String, String) {
    let nodes = c.headscale_nodes().await;
    let n = nodes
        .iter()
        .find(|n| [&n["name"], &n["givenName"]].iter().any(|v| v.as_str() == Some(name)))
        .unwrap_or_else(|| panic!("{name} is not in Headscale"));
    let ip = n["ipAddresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .find(|a| a.contains('.'))
        .expect("an IPv4 tailnet address")
        .to_string();
    (n["id"].as_str().unwrap_or_default().to_string(), ip)
}

pub async fn exit_node_keeps_the_cluster_reachable(c: Cluster) {
    let ns = Ns::new(&c, "exit", json!({"pod-security.kubernetes.io/enforce": "privileged"})).await;
    // The exit node, in front of an "internet" host of its own.
    let exit_name = format!("exit-{}", support::unique("m"));
    member_with(&c, &ns, &exit_name, "--advertise-exit-node").await;
    let (exit_id, exit_ip) = headscale_node(&c, &exit_name).await;
    approve(&c, &exit_id, &["0.0.0.0/0", "::/0"]).await;
    let exit_pid = pid_where("cmdline", |a| a.contains(&format!("--hostname={exit_name};")))
        .expect("the exit node's shell on this node");
    let internet = InternetHost::wire(exit_pid, "from-the-internet");
    // Another pod, on the cluster network only.
    ns.create::<k8s_openapi::api::core::v1::Pod>(json!({"metadata": {"name": "plain", "labels": {"app": "plain"}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [app_container(&c, "plain-pod")]}}))
        .await;
    let plain = ns.ready_pod("plain").await;
    let plain_ip = plain.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("a pod IP");

    node(
        &ns,
        "egress",
        json!({"mode": "tun", "tags": ["tag:k8s"], "exitNode": {"use": exit_ip}}),
    )
    .await;
    deployment(&c, &ns, "egress", "egress", "default", "egress").await;
    let pod = ns.ready_pod("egress").await;
    let name = pod.name_any();
    let init = init_names(&pod);
    assert!(
        init.iter().any(|n| n == "tailscale-local-routes"),
        "no local-routes init container: {init:?}"
    );
    let route = |dst: &str| {
        let (ok, out, err) = c.exec(&ns.name, &name, "tailscale", &["ip", "route", "get", dst]);
        assert!(ok, "ip route get {dst}: {err}");
        out
    };
    // The internet goes through the exit node...
    c.exec_until(
        &ns.name,
        &name,
        "app",
        &["timeout", "8", "wget", "-q", "-O-", "http://203.0.113.10:8080/"],
        "from-the-internet",
    )
    .await;
    let out = route("203.0.113.10");
    assert!(
        out.contains("dev tailscale0"),
        "the internet host is not routed via the exit node: {out}"
    );
    // ...while the apiserver and the other pod stay on the cluster network.
    for dst in [APISERVER, plain_ip.as_str()] {
        let out = route(dst);
        assert!(!out.contains("tailscale0"), "{dst} goes to the exit node: {out}");
    }
    c.exec_until(
        &ns.name,
        &name,
        "app",
        &["timeout", "8", "wget", "-q", "-O-", &format!("http://{plain_ip}:8080/")],
        "plain-pod",
    )
    .await;
    // An HTTP request to the apiserver's HTTPS port: its "400 Bad Request" shows it was reached.
    c.exec_until(
        &ns.name,
        &name,
        "app",
        &[
            "sh",
            "-c",
            &format!("timeout 8 wget -q -O- http://{APISERVER}:443/ 2>&1; true"),
        ],
        "400",
    )
    .await;
    // Userspace: what the app sends through the sidecar's HTTP proxy uses the exit node too.
    node(
        &ns,
        "proxied",
        json!({"mode": "userspace", "tags": ["tag:k8s"], "exitNode": {"use": exit_ip},
               "outbound": {"httpProxyPort": 1080, "exportEnv": true}}),
    )
    .await;
    deployment(&c, &ns, "proxied", "proxied", "default", "proxied").await;
    let proxied = ns.ready_pod("proxied").await;
    c.exec_until(
        &ns.name,
        &proxied.name_any(),
        "app",
        &["timeout", "8", "wget", "-q", "-O-", "http://203.0.113.10:8080/"],
        "from-the-internet",
    )
    .await;
    drop(internet);
    ns.delete().await;
}
