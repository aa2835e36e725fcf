//! Scenarios on the tailnet: join, isolation, inbound and outbound traffic, restart, cleanup.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::ResourceExt;
use kube::api::DeleteParams;
use serde_json::json;

use crate::cluster::{Cluster, Ns, WAIT, data, ips, is_ready, sidecar_restarts};
use crate::support;
use crate::workloads::{deployment, member, member_get, node};
use tailnode::api::TailscaleNode;

/// Join with the operator's RBAC only; the probes gate the app; pod A's token gets 403 on pod
/// B's Secret; a member reaches A's app; A's app reaches B through the injected proxy env; the
/// pod's netns has no default route and only local peers; logs and exec work; a sidecar restart
/// keeps the node.
pub async fn userspace_pods(c: Cluster) {
    let ns = Ns::new(&c, "tailnet", json!({})).await;
    let spec = json!({"tags": ["tag:k8s"], "outbound": {"socks5Port": 1055, "httpProxyPort": 1056, "exportEnv": true}});
    node(&ns, "alpha", spec.clone()).await;
    node(&ns, "beta", spec).await;
    for sa in ["sa-a", "sa-b"] {
        ns.create::<ServiceAccount>(json!({"metadata": {"name": sa}})).await;
    }
    deployment(&c, &ns, "a", "alpha", "sa-a", "hello from pod a").await;
    deployment(&c, &ns, "b", "beta", "sa-b", "hello from pod b").await;
    let member_pod = member(&c, &ns, "laptop").await;
    let (pod_a, pod_b) = (ns.ready_pod("a").await, ns.ready_pod("b").await);
    let (a, b) = (pod_a.name_any(), pod_b.name_any());

    // Joined: the sidecar wrote its device into its own Secret; Headscale lists it with the tag.
    let secret_a = ns
        .secret_where(&format!("ts-{a}"), |s| {
            data(s, "device_id").is_some() && !ips(s).is_empty()
        })
        .await;
    let device_a = data(&secret_a, "device_id").unwrap();
    // The controller removes the used key once the device registered.
    ns.secret_where(&format!("ts-{a}"), |s| data(s, "authkey").is_none())
        .await;
    let hs = c.headscale_node(&device_a).await.expect("Headscale lists pod a's node");
    assert!(hs["tags"].to_string().contains("tag:k8s"), "{hs}");
    let st = support::eventually(WAIT, || async {
        let n = ns.api::<TailscaleNode>().get("alpha").await.ok()?;
        let st = serde_json::to_value(n.status?).ok()?;
        (st["readyReplicas"] == 1 && st["replicas"][0]["ips"] == json!(ips(&secret_a))).then_some(st)
    })
    .await;
    assert!(st.is_some(), "status never showed pod a's tailnet IPs");
    // Readable without -o yaml: `kubectl get tsn -o wide` and the pod's own annotations.
    let (ok, wide, err) = c.kubectl(&["get", "tsn", "alpha", "-n", &ns.name, "-o", "wide"]);
    assert!(ok, "kubectl get tsn -o wide: {err}");
    let header = wide.lines().next().unwrap_or_default();
    assert!(header.contains("HOSTNAMES") && header.contains("ADDRESSES"), "{wide}");
    assert!(wide.contains(&ips(&secret_a)[0]), "-o wide lacks pod a's IP: {wide}");
    let fqdn = data(&secret_a, "device_fqdn").unwrap_or_default();
    let host = fqdn.split('.').next().unwrap_or_default().to_string();
    assert!(
        !host.is_empty() && wide.contains(&host),
        "-o wide lacks pod a's hostname: {wide}"
    );
    let annotated = ns
        .pod_where(&a, "annotated with its tailnet address", |p| {
            p.annotations().get("tailnode.dev/tailnet-ips") == Some(&ips(&secret_a).join(","))
        })
        .await;
    let name = annotated.annotations().get("tailnode.dev/tailnet-name").cloned();
    assert_eq!(name.as_deref(), Some(fqdn.trim_end_matches('.')));

    // The native sidecar's startup probe gated the app: the tailnet was up when the app started.
    let (ok, log, err) = c.kubectl(&["logs", "-n", &ns.name, &a, "-c", "app"]);
    assert!(ok && log.contains("tailnet-at-start=ok"), "app log: {log}{err}");
    let (ok, log, err) = c.kubectl(&["logs", "-n", &ns.name, &a, "-c", "tailscale"]);
    assert!(
        ok && log.contains("Startup complete"),
        "kubectl logs -c tailscale: {log}{err}"
    );

    // Pod a's own token (read through kubectl exec) cannot read pod b's Secret.
    let (ok, token, err) = c.exec(
        &ns.name,
        &a,
        "app",
        &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"],
    );
    assert!(ok, "kubectl exec: {err}");
    let status_of = |secret: String| {
        let cfg = std::fs::read_to_string(&c.kubeconfig).unwrap();
        let kc: kube::config::Kubeconfig = serde_yaml::from_str(&cfg).unwrap();
        let cluster = kc.clusters[0].cluster.clone().unwrap();
        let server = cluster.server.unwrap();
        let ca = cluster.certificate_authority_data.unwrap();
        let ca = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ca).unwrap();
        let url = format!("{server}/api/v1/namespaces/{}/secrets/{secret}", ns.name);
        let token = token.trim().to_string();
        async move {
            let http = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
                .no_proxy()
                .build()
                .unwrap();
            http.get(url).bearer_auth(token).send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(status_of(format!("ts-{a}")).await, 200, "pod a reads its own Secret");
    assert_eq!(
        status_of(format!("ts-{b}")).await,
        403,
        "pod a cannot read pod b's Secret"
    );

    // Inbound: a tailnet member fetches pod a's app over the tailnet.
    let ip_a = ips(&secret_a)[0].clone();
    member_get(&c, &ns, &member_pod, &ip_a, 8080, "hello from pod a").await;

    // Outbound: pod a's app reaches pod b over the tailnet through the injected http_proxy.
    let secret_b = ns.secret_where(&format!("ts-{b}"), |s| !ips(s).is_empty()).await;
    let url_b = format!("http://{}:8080/", ips(&secret_b)[0]);
    let env = c.exec(&ns.name, &a, "app", &["env"]).1;
    assert!(
        env.contains("http_proxy=http://127.0.0.1:1056"),
        "injected proxy env: {env}"
    );
    c.exec_until(
        &ns.name,
        &a,
        "app",
        &["timeout", "10", "wget", "-q", "-O-", &url_b],
        "hello from pod b",
    )
    .await;

    // Network discipline: no default route; every socket peer is local or on the cluster network.
    if c.isolated {
        assert_isolated(&c, &ns, &a);
    }

    // A sidecar restart (containerboot exits on SIGTERM; the kubelet restarts it) keeps the node.
    let (ok, _, err) = c.exec(&ns.name, &a, "tailscale", &["kill", "-TERM", "1"]);
    assert!(ok, "kill: {err}");
    let restarted = ns
        .pod_where(&a, "restarted and Ready", |p| sidecar_restarts(p) >= 1 && is_ready(p))
        .await;
    assert!(sidecar_restarts(&restarted) >= 1);
    let after = ns.secret_where(&format!("ts-{a}"), |s| !ips(s).is_empty()).await;
    assert_eq!(
        data(&after, "device_id").as_deref(),
        Some(device_a.as_str()),
        "same device"
    );
    assert!(data(&after, "authkey").is_none(), "no new key");
    member_get(&c, &ns, &member_pod, &ip_a, 8080, "hello from pod a").await;
    // Other scenarios run at the same time: look only at nodes named after pod a.
    let named_a: Vec<String> = c
        .headscale_nodes()
        .await
        .iter()
        .filter(|n| n["name"].as_str().is_some_and(|h| h.contains(a.as_str())))
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(named_a, vec![device_a.clone()], "no new node in Headscale for pod a");
    ns.delete().await;
}

/// Deleting a Deployment pod removes its node from Headscale; a StatefulSet pod that is deleted
/// and recreated keeps its node.
pub async fn deleted_pods(c: Cluster) {
    let ns = Ns::new(&c, "cleanup", json!({})).await;
    node(&ns, "web", json!({"tags": ["tag:k8s"], "hostname": "web"})).await;
    deployment(&c, &ns, "web", "web", "default", "web").await;
    let pod = ns.ready_pod("web").await;
    let s = ns
        .secret_where(&format!("ts-{}", pod.name_any()), |s| data(s, "device_id").is_some())
        .await;
    let device = data(&s, "device_id").unwrap();
    assert!(c.headscale_node(&device).await.is_some());
    ns.api::<Pod>()
        .delete(&pod.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let gone = support::eventually(WAIT, || async {
        c.headscale_node(&device).await.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "Headscale still lists the deleted pod's node {device}");

    node(&ns, "db", json!({"tags": ["tag:k8s"], "hostname": "db"})).await;
    ns.create::<StatefulSet>(json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
        "template": {"metadata": {"labels": {"app": "db", "tailnode.dev/node": "db"}},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [crate::workloads::app_container(&c, "db")]}}}}))
        .await;
    let db0 = ns.pod_where("db-0", "Ready", is_ready).await;
    let s = ns.secret_where("ts-db-0", |s| data(s, "device_id").is_some()).await;
    let device = data(&s, "device_id").unwrap();
    assert!(
        data(&s, "device_fqdn").unwrap().starts_with("db-0"),
        "StatefulSet hostname is <prefix>-<ordinal>"
    );
    ns.api::<Pod>().delete("db-0", &DeleteParams::default()).await.unwrap();
    let old_uid = db0.metadata.uid.clone();
    ns.pod_where("db-0", "recreated and Ready", |p| {
        p.metadata.uid != old_uid && is_ready(p)
    })
    .await;
    let s = ns.secret_where("ts-db-0", |s| !ips(s).is_empty()).await;
    assert_eq!(
        data(&s, "device_id").as_deref(),
        Some(device.as_str()),
        "same node after the restart"
    );
    assert!(c.headscale_node(&device).await.is_some(), "Headscale still lists db-0");
    ns.delete().await;
}

/// The local node's network discipline, seen from inside pod `a`: no default route, and every
/// socket peer is loopback or on the harness bridge.
fn assert_isolated(c: &Cluster, ns: &Ns, a: &str) {
    let (ok, routes, err) = c.exec(&ns.name, a, "tailscale", &["ip", "route", "show", "table", "main"]);
    assert!(
        ok && !routes.contains("default"),
        "pod a has a default route: {routes}{err}"
    );
    let (ok, sockets, err) = c.exec(&ns.name, a, "tailscale", &["ss", "-tunaH"]);
    assert!(ok, "ss: {err}");
    for line in sockets.lines() {
        let peer = line.split_whitespace().nth(5).unwrap_or("*");
        let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h).trim_matches(['[', ']']);
        let host = host.strip_prefix("::ffff:").unwrap_or(host);
        let local = ["*", "0.0.0.0", "::", "::1"].contains(&host)
            || host.starts_with("127.")
            || c.allowed_peers.iter().any(|p| host.starts_with(p.as_str()));
        assert!(local, "pod a has a socket to a non-local peer: {line}");
    }
}
