//! Scenarios that only a real node can show: TUN with a hostPath /dev/net/tun, serve over the
//! tailnet, PodSecurity `restricted` with a read-only root, a Job completing with its sidecar.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use serde_json::json;

use crate::cluster::{Cluster, Ns, WAIT, data, ips};
use crate::support;
use crate::workloads::{deployment, member, member_get, node, restricted};

/// TUN mode: `auto` picks TUN in a privileged namespace; the pod gets `tailscale0` with its IP.
pub async fn tun_mode(c: Cluster) {
    let ns = Ns::new(&c, "tun", json!({"pod-security.kubernetes.io/enforce": "privileged"})).await;
    node(&ns, "router", json!({"mode": "auto", "tags": ["tag:k8s"]})).await;
    deployment(&c, &ns, "router", "router", "default", "router").await;
    let pod = ns.ready_pod("router").await;
    assert_eq!(pod.annotations()["tailnode.dev/mode"], "tun", "auto picks TUN here");
    let spec = pod.spec.clone().unwrap();
    let tun = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.is_some())
        .expect("a hostPath volume");
    assert_eq!(tun.host_path.as_ref().unwrap().path, "/dev/net/tun");
    let s = ns
        .secret_where(&format!("ts-{}", pod.name_any()), |s| !ips(s).is_empty())
        .await;
    let ip = ips(&s)[0].clone();
    c.exec_until(
        &ns.name,
        &pod.name_any(),
        "tailscale",
        &["ip", "-brief", "addr", "show", "tailscale0"],
        &ip,
    )
    .await;
    // Stateful filtering stays off (tailscaled's default since 1.66.4; tailnode never turns it
    // on): a subnet router or exit node must forward packets it did not see leave.
    let (ok, prefs, err) = c.exec(
        &ns.name,
        &pod.name_any(),
        "tailscale",
        &["tailscale", "--socket=/tmp/tailscaled.sock", "debug", "prefs"],
    );
    assert!(ok, "tailscale debug prefs: {err}");
    let at = prefs
        .find("\"NoStatefulFiltering\"")
        .expect("prefs name NoStatefulFiltering");
    let value: String = prefs[at..].chars().skip(21).take(12).collect();
    assert!(value.contains("true"), "stateful filtering is on: {value}");
    // The app container shares the netns: it sees tailscale0 too, and a member reaches it there.
    let member_pod = member(&c, &ns, "laptop").await;
    member_get(&c, &ns, &member_pod, &ip, 8080, "router").await;
    ns.delete().await;
}

/// Serve: a TCP forward carries tailnet traffic to the app; an HTTPS endpoint is reported by
/// containerboot as needing HTTPS (Headscale issues no certificates).
pub async fn serve(c: Cluster) {
    let ns = Ns::new(&c, "serve", json!({})).await;
    node(
        &ns,
        "plain",
        json!({"tags": ["tag:k8s"], "serve": [{"port": 81, "protocol": "tcp", "target": "tcp://127.0.0.1:8080"}]}),
    )
    .await;
    node(
        &ns,
        "secure",
        json!({"tags": ["tag:k8s"], "serve": [{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080"}]}),
    )
    .await;
    let cm = support::eventually(WAIT, || async {
        ns.api::<ConfigMap>().get_opt("tsn-plain-serve").await.ok().flatten()
    })
    .await
    .expect("serve ConfigMap");
    assert!(cm.data.unwrap()["serve.json"].contains("\"TCPForward\": \"127.0.0.1:8080\""));
    deployment(&c, &ns, "plain", "plain", "default", "served over tcp").await;
    deployment(&c, &ns, "secure", "secure", "default", "secure").await;
    let pod = ns.ready_pod("plain").await;
    let s = ns
        .secret_where(&format!("ts-{}", pod.name_any()), |s| !ips(s).is_empty())
        .await;
    let member_pod = member(&c, &ns, "laptop").await;
    member_get(&c, &ns, &member_pod, &ips(&s)[0], 81, "served over tcp").await;

    let secure = ns.ready_pod("secure").await.name_any();
    let said = support::eventually(WAIT, || async {
        let (_, log, _) = c.kubectl(&["logs", "-n", &ns.name, &secure, "-c", "tailscale"]);
        log.contains("ensure that HTTPS is enabled for your tailnet")
            .then_some(())
    })
    .await;
    assert!(said.is_some(), "containerboot never reported the HTTPS endpoint");
    ns.delete().await;
}

/// A namespace that enforces PodSecurity `restricted` runs the userspace sidecar, whose root
/// filesystem is read-only (only its /tmp emptyDir is writable).
pub async fn restricted_namespace(c: Cluster) {
    let ns = Ns::new(
        &c,
        "restricted",
        json!({"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}),
    )
    .await;
    node(&ns, "web", json!({"mode": "auto", "tags": ["tag:k8s"]})).await;
    deployment(&c, &ns, "web", "web", "default", "restricted web").await;
    let pod = ns.ready_pod("web").await;
    assert_eq!(pod.annotations()["tailnode.dev/mode"], "userspace");
    let name = pod.name_any();
    ns.secret_where(&format!("ts-{name}"), |s| data(s, "device_id").is_some())
        .await;
    let (ok, _, err) = c.exec(&ns.name, &name, "tailscale", &["touch", "/probe"]);
    assert!(!ok && err.contains("Read-only file system"), "root is writable: {err}");
    let (ok, _, err) = c.exec(&ns.name, &name, "tailscale", &["touch", "/tmp/probe"]);
    assert!(ok, "/tmp is not writable: {err}");
    let (ok, id, err) = c.exec(&ns.name, &name, "tailscale", &["id", "-u"]);
    assert!(ok && id.trim() != "0", "the sidecar runs as root: {id}{err}");
    ns.delete().await;
}

/// A Job whose pod has the native sidecar reaches Complete when its main container exits, and
/// its main container found the tailnet up when it started.
pub async fn job_completes(c: Cluster) {
    let ns = Ns::new(&c, "job", json!({})).await;
    node(&ns, "batch", json!({"tags": ["tag:k8s"]})).await;
    ns.create::<Job>(
        json!({"metadata": {"name": "once"}, "spec": {"backoffLimit": 0, "template": {
        "metadata": {"labels": {"app": "once", "tailnode.dev/node": "batch"}},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [{
            "name": "app", "image": c.app_image, "securityContext": restricted(),
            "command": ["sh", "-c", "timeout 5 wget -q -O- http://127.0.0.1:9002/healthz && echo job-done"]}]}}}}),
    )
    .await;
    let done = support::eventually(WAIT, || async {
        let j = ns.api::<Job>().get("once").await.ok()?;
        let conds = j.status?.conditions?;
        conds
            .iter()
            .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            .map(|c| c.type_.clone())
    })
    .await;
    let pod = ns.pod("once").await.name_any();
    let (_, log, _) = c.kubectl(&["logs", "-n", &ns.name, &pod, "-c", "app"]);
    assert_eq!(
        done.as_deref(),
        Some("Complete"),
        "the Job did not complete; app log: {log}"
    );
    assert!(log.contains("job-done"), "{log}");
    ns.delete().await;
}

/// Namespace-wide opt-in: a namespace labelled `tailnode.dev/node: web` has its unlabelled pods
/// injected (and labelled) for TailscaleNode `web`; a pod labelled `tailnode.dev/inject: "false"`
/// is left alone.
pub async fn namespace_opt_in(c: Cluster) {
    let ns = Ns::new(&c, "optin", json!({"tailnode.dev/node": "web"})).await;
    node(&ns, "web", json!({"tags": ["tag:k8s"]})).await;
    // The webhook's caches learn of the node within moments; until then it refuses (Fail).
    let app = crate::workloads::app_container(&c, "opted in by its namespace");
    ns.create::<k8s_openapi::api::apps::v1::Deployment>(json!({"metadata": {"name": "plain"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "plain"}},
        "template": {"metadata": {"labels": {"app": "plain"}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [app.clone()]}}}}))
        .await;
    let pod = ns.ready_pod("plain").await;
    assert_eq!(
        pod.labels().get("tailnode.dev/node").map(String::as_str),
        Some("web"),
        "labelled by the webhook"
    );
    let s = ns
        .secret_where(&format!("ts-{}", pod.name_any()), |s| data(s, "device_id").is_some())
        .await;
    assert!(c.headscale_node(&data(&s, "device_id").unwrap()).await.is_some());
    // Opted out: no sidecar, no Secret.
    ns.create::<k8s_openapi::api::core::v1::Pod>(json!({"metadata": {"name": "out",
        "labels": {"app": "out", "tailnode.dev/inject": "false"}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [app]}}))
        .await;
    let out = ns
        .pod_where("out", "Running", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await;
    let spec = out.spec.unwrap();
    assert!(
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .all(|c| c.name != "tailscale"),
        "the opted-out pod was injected"
    );
    ns.delete().await;
}

/// `spec.sidecar.isolateCredentials`: the app container has no ServiceAccount token at all (so
/// nothing it holds can read the state Secret); the sidecar, with a token of its own, joins and
/// survives a restart without a new key.
pub async fn isolated_credentials(c: Cluster) {
    let ns = Ns::new(&c, "isolate", json!({})).await;
    node(
        &ns,
        "web",
        json!({"tags": ["tag:k8s"], "sidecar": {"isolateCredentials": true}}),
    )
    .await;
    deployment(&c, &ns, "web", "web", "default", "isolated").await;
    let pod = ns.ready_pod("web").await;
    let name = pod.name_any();
    assert_eq!(pod.spec.as_ref().unwrap().automount_service_account_token, Some(false));
    let secret = format!("ts-{name}");
    let s = ns.secret_where(&secret, |s| data(s, "device_id").is_some()).await;
    let (device, minted) = (
        data(&s, "device_id").unwrap(),
        s.annotations().get("tailnode.dev/minted-at").cloned(),
    );
    // The app: no token file, no service-account directory.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let (ok, out, _) = c.exec(&ns.name, &name, "app", &["ls", sa]);
    assert!(!ok, "the app container sees {sa}: {out}");
    let (ok, _, _) = c.exec(&ns.name, &name, "app", &["cat", &format!("{sa}/token")]);
    assert!(!ok, "the app container can read a token");
    // The sidecar has its own, and uses it: a restart rejoins as the same device, no new key.
    let (ok, _, err) = c.exec(
        &ns.name,
        &name,
        "tailscale",
        &["sh", "-c", &format!("test -s {sa}/token")],
    );
    assert!(ok, "the sidecar has no token: {err}");
    let (ok, _, err) = c.exec(&ns.name, &name, "tailscale", &["kill", "-TERM", "1"]);
    assert!(ok, "kill: {err}");
    ns.pod_where(&name, "restarted and Ready", |p| {
        crate::cluster::sidecar_restarts(p) >= 1 && crate::cluster::is_ready(p)
    })
    .await;
    let after = ns.secret_where(&secret, |s| !ips(s).is_empty()).await;
    assert_eq!(data(&after, "device_id"), Some(device), "same device after the restart");
    assert_eq!(
        after.annotations().get("tailnode.dev/minted-at").cloned(),
        minted,
        "a new key was minted"
    );
    debug_side_doors(&ns, &name).await;
    ns.delete().await;
}

/// `kubectl debug` cannot reach the sidecar's token (the chart's ephemeral-container policy): an
/// ephemeral container may neither mount the sidecar's token volume nor target the sidecar, while
/// debugging the app stays possible. Dry runs: admission runs in full, nothing is added.
async fn debug_side_doors(ns: &Ns, pod: &str) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams};
    let pods = ns.api::<Pod>();
    let pp = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    let add = |extra: serde_json::Value| {
        let mut c = json!({"name": "debug", "image": "busybox", "command": ["sh"], "stdin": true, "tty": true});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            c[k] = v;
        }
        let pods = pods.clone();
        let pp = pp.clone();
        async move {
            let body = json!({"spec": {"ephemeralContainers": [c]}});
            pods.patch_subresource("ephemeralcontainers", pod, &pp, &Patch::Strategic(body))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let mount = json!({"volumeMounts": [{"name": "tailnode-kube-api-access", "mountPath": "/t"}]});
    let refused = support::eventually(WAIT, || async {
        add(mount.clone())
            .await
            .err()
            .filter(|e| e.contains("may not mount the volume tailnode-kube-api-access"))
    })
    .await;
    assert!(
        refused.is_some(),
        "an ephemeral container could mount the sidecar's token"
    );
    let target = add(json!({"targetContainerName": "tailscale"})).await;
    assert!(
        target
            .as_ref()
            .is_err_and(|e| e.contains("may not target the tailscale sidecar")),
        "an ephemeral container could target the sidecar: {target:?}"
    );
    let app = add(json!({"targetContainerName": "app"})).await;
    assert!(app.is_ok(), "debugging the app container was refused: {app:?}");
}
