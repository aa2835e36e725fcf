//! The operator (installed with the chart, as a user would), and the pods scenarios run: an app
//! that serves HTTP and records whether the tailnet was up when it started, and a plain tailnet
//! member ("a laptop") that reaches pods over the tailnet.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::cluster::{Cluster, Ns, OPERATOR_NS, WAIT};
use crate::support;
use tailnode::api::TailscaleNode;

/// The release name (and so the webhook configuration's and the operator's names).
pub const RELEASE: &str = "tailnode";

fn split_image(image: &str) -> (&str, &str) {
    image.rsplit_once(':').expect("image has a tag")
}

/// `helm install` of charts/tailnode with only image and credential values set; waits until the
/// webhook injects a probe pod (server-side dry run).
pub async fn install_operator(c: &Cluster) {
    upgrade_operator(c, &[]).await;
}

/// `helm upgrade --install` with `extra` `--set` values on top (e.g. to run the webhook alone).
pub async fn upgrade_operator(c: &Cluster, extra: &[&str]) {
    let client = c.client().await;
    let (ok, _, err) = c.kubectl(&["create", "namespace", OPERATOR_NS]);
    assert!(
        ok || err.contains("already exists") || err.contains("AlreadyExists"),
        "create namespace: {err}"
    );
    let (ok, _, err) = c.kubectl(&[
        "-n",
        OPERATOR_NS,
        "create",
        "secret",
        "generic",
        "tailnode-credentials",
        &format!("--from-literal=api-key={}", c.headscale_api_key),
    ]);
    assert!(ok || err.contains("already exists"), "create credentials: {err}");
    let (repo, tag) = split_image(&c.operator_image);
    let (srepo, stag) = split_image(&c.sidecar_image);
    let chart = support::repo_root().join("charts/tailnode");
    let sets = [
        format!("image.repository={repo}"),
        format!("image.tag={tag}"),
        format!("sidecar.image.repository={srepo}"),
        format!("sidecar.image.tag={stag}"),
        "credentials.kind=headscale".into(),
        "credentials.existingSecret=tailnode-credentials".into(),
        format!("credentials.headscaleURL={}", c.headscale_in_cluster),
        // A slot without a pod is retired soon (tests/e2e/slots.rs waits for it).
        "slotGracePeriod=20s".into(),
        // Policy mode beside the webhook (tests/e2e/policy.rs): the controller renders
        // status.injection, and namespaces labelled for the policy are not the webhook's.
        "policy.renderStatus=true".into(),
        "webhook.namespaceSelector.matchExpressions[0].key=tailnode.dev/injector".into(),
        "webhook.namespaceSelector.matchExpressions[0].operator=NotIn".into(),
        "webhook.namespaceSelector.matchExpressions[0].values[0]=policy".into(),
    ];
    let cidrs = format!("clusterCIDRs={{{}}}", c.cluster_cidrs.join(","));
    let dns = format!("clusterDNS={{{}}}", c.cluster_dns.join(","));
    let sets: Vec<String> = sets
        .into_iter()
        .chain((!c.cluster_cidrs.is_empty()).then_some(cidrs))
        .chain((!c.cluster_dns.is_empty()).then_some(dns))
        .collect();
    let mut args = vec![
        "upgrade".to_string(),
        "--install".into(),
        RELEASE.into(),
        chart.to_string_lossy().into_owned(),
        "--namespace".into(),
        OPERATOR_NS.into(),
        "--wait".into(),
        "--timeout".into(),
        "180s".into(),
        "--set-string".into(),
        format!("credentials.headscaleUser={}", c.headscale_user_id),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = c.run(&c.helm, &argv);
    if !ok {
        let (_, pods, _) = c.kubectl(&["-n", OPERATOR_NS, "get", "pods", "-o", "wide"]);
        let (_, logs, _) = c.kubectl(&["-n", OPERATOR_NS, "logs", "deploy/tailnode", "--tail=40"]);
        panic!("helm install failed: {err}\n{out}\n{pods}\n{logs}");
    }
    // The operator patches the caBundle itself; the apiserver routes to its endpoints once Ready.
    let probe = Ns::new(c, "probe", json!({})).await;
    probe
        .create::<TailscaleNode>(json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
            "metadata": {"name": "probe"}, "spec": {}}))
        .await;
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "probe", "labels": {"tailnode.dev/node": "probe"}},
        "spec": {"containers": [{"name": "app", "image": c.app_image}]}}),
    )
    .expect("pod");
    let hooks = Api::<MutatingWebhookConfiguration>::all(client);
    // Policy mode has no webhook: the apiserver's own policy injects the probe.
    let policy = extra.contains(&"injector=policy");
    let injected = support::eventually(WAIT, || async {
        if !policy {
            hooks.get(RELEASE).await.ok()?;
        }
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let p = probe.api::<Pod>().create(&pp, &pod).await.ok()?;
        let spec = p.spec?;
        let all = spec.init_containers.iter().flatten().chain(spec.containers.iter());
        all.clone().any(|c| c.name == "tailscale").then_some(())
    })
    .await;
    probe.delete().await;
    assert!(injected.is_some(), "the chart's injector never injected a pod");
}

/// Deletes every scenario namespace (the operator retires their devices), then the release.
pub async fn uninstall_operator(c: &Cluster) {
    let (_, out, _) = c.kubectl(&["get", "namespaces", "-l", crate::cluster::SCENARIO_LABEL, "-o", "name"]);
    let names: Vec<&str> = out.lines().collect();
    if !names.is_empty() {
        let mut args = vec!["delete", "--wait=true", "--timeout=120s"];
        args.extend(names);
        let (ok, _, err) = c.kubectl(&args);
        if !ok {
            eprintln!("deleting the scenario namespaces: {err}");
        }
    }
    let (ok, _, err) = c.run(&c.helm, &["uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait"]);
    if !ok {
        eprintln!("helm uninstall: {err}");
    }
    let _ = c.kubectl(&["delete", "namespace", OPERATOR_NS, "--wait=false"]);
}

/// A TailscaleNode in `ns`.
pub async fn node(ns: &Ns, name: &str, spec: Value) -> TailscaleNode {
    ns.create(json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": name}, "spec": spec}))
        .await
}

/// The app container: records whether the sidecar's health endpoint answered when it started
/// (`tailnet-at-start=ok`), then serves `body` on :8080 as uid 1000 with a `restricted`
/// security context.
pub fn app_container(c: &Cluster, body: &str) -> Value {
    let script = format!(
        "if timeout 2 wget -q -O /dev/null http://127.0.0.1:9002/healthz; then echo tailnet-at-start=ok; \
         else echo tailnet-at-start=down; fi; mkdir -p /tmp/www && echo '{body}' > /tmp/www/index.html && \
         exec httpd -f -p 8080 -h /tmp/www"
    );
    json!({"name": "app", "image": c.app_image, "command": ["sh", "-c", script],
        "securityContext": restricted()})
}

pub fn restricted() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 1000, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
}

/// A Deployment of one app replica labelled for TailscaleNode `node`.
pub async fn deployment(c: &Cluster, ns: &Ns, app: &str, node: &str, sa: &str, body: &str) {
    ns.create::<k8s_openapi::api::apps::v1::Deployment>(json!({"metadata": {"name": app}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": app}},
        "template": {"metadata": {"labels": {"app": app, "tailnode.dev/node": node}},
            "spec": {"serviceAccountName": sa, "terminationGracePeriodSeconds": 5,
                     "containers": [app_container(c, body)]}}}}))
        .await;
}

/// A plain tailnet member in its own pod (not injected): userspace tailscaled with a Headscale
/// key, reached with `kubectl exec`. [`member_get`] fetches a URL over the tailnet through it.
pub async fn member(c: &Cluster, ns: &Ns, name: &str) -> String {
    member_with(c, ns, name, "").await
}

/// [`member`] with more `tailscale up` flags (`--accept-routes`, `--advertise-routes=...`).
pub async fn member_with(c: &Cluster, ns: &Ns, name: &str, up_flags: &str) -> String {
    let key = c.member_key().await;
    let script = format!(
        "tailscaled --tun=userspace-networking --state=mem: --statedir=/tmp/ts --socket=/tmp/ts.sock \
         --no-logs-no-support & \
         until tailscale --socket=/tmp/ts.sock up --login-server={} --authkey={key} {up_flags} --hostname={name}; \
         do sleep 1; done; echo member-up; wait",
        c.headscale_in_cluster
    );
    ns.create::<Pod>(json!({"metadata": {"name": name, "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "member", "image": c.sidecar_image,
            "command": ["sh", "-c", script], "env": [{"name": "HOME", "value": "/tmp"}]}]}}))
        .await;
    let pod = ns
        .pod_where(name, "Running", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await;
    c.exec_until(
        &ns.name,
        &pod.name_any(),
        "member",
        &["tailscale", "--socket=/tmp/ts.sock", "status", "--json"],
        "\"BackendState\": \"Running\"",
    )
    .await;
    pod.name_any()
}

/// GET http://IP:PORT/ from member pod `member` through the tailnet (`tailscale nc`); retries
/// until the body contains `want`.
pub async fn member_get(c: &Cluster, ns: &Ns, member: &str, ip: &str, port: u16, want: &str) -> String {
    // `tailscale nc` closes the connection when its stdin ends: keep it open for the answer.
    let cmd = format!(
        "(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 2) | timeout 8 tailscale --socket=/tmp/ts.sock nc {ip} {port}"
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (ok, out, err) = c.exec(&ns.name, member, "member", &["sh", "-c", &cmd]);
        if ok && out.contains(want) {
            return out;
        }
        if std::time::Instant::now() > deadline {
            // What the member knows of the peer, for the failure message.
            let ts = |args: &[&str]| {
                let mut all = vec!["tailscale", "--socket=/tmp/ts.sock"];
                all.extend_from_slice(args);
                let (_, o, e) = c.exec(&ns.name, member, "member", &all);
                format!("{o}{e}")
            };
            panic!(
                "member {member} never got {want:?} from {ip}:{port}: ok={ok}\n{out}\n{err}\n--- status:\n{}\n--- ping:\n{}",
                ts(&["status"]),
                ts(&["ping", "-c", "3", "--timeout", "3s", ip]),
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
}

/// TailscaleNode `db` (hostname `db`, `tag:k8s`) and a one-replica StatefulSet `db` of it.
pub async fn db_statefulset(c: &Cluster, ns: &Ns) {
    node(ns, "db", json!({"tags": ["tag:k8s"], "hostname": "db"})).await;
    ns.create::<k8s_openapi::api::apps::v1::StatefulSet>(json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
        "template": {"metadata": {"labels": {"app": "db", "tailnode.dev/node": "db"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app_container(c, "db")]}}}}))
        .await;
}
