//! Real tailnet scenarios: the operator on the harness, Headscale as control, and the injected
//! sidecar's real containerboot run by the pod runner (the test kubelet) exactly as the stored
//! pod spec says. Network discipline: everything is on loopback or in netns the runner made.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use support::operator::{Operator, operator};
use support::podrunner::{self, PodOptions, RunningPod};
use support::*;
use tailnode::api::TailscaleNode;

const WAIT: Duration = Duration::from_secs(90);

struct Env {
    h: &'static Harness,
    ns: TestNamespace,
    _op: &'static Operator,
}

async fn env(prefix: &str, labels: Value) -> Env {
    let h = harness();
    let op = operator();
    let client = h.client().await;
    let mut labels = labels;
    labels[op.selector.0.clone()] = json!(op.selector.1.clone());
    let ns = TestNamespace::new(&client, prefix, labels).await;
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "headscale"},
        "stringData": {"api-key": h.headscale_api_key}}))
    .unwrap();
    ns.api::<Secret>().create(&PostParams::default(), &s).await.unwrap();
    Env { h, ns, _op: op }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn headscale_creds(h: &Harness) -> Value {
    json!({"headscale": {"url": h.headscale_url, "apiKeySecretName": "headscale", "user": h.headscale_user_id}})
}

async fn node(e: &Env, name: &str, mut spec: Value) {
    spec["credentials"] = headscale_creds(e.h);
    let n: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": name}, "spec": spec}))
    .unwrap();
    e.ns.api::<TailscaleNode>()
        .create(&PostParams::default(), &n)
        .await
        .unwrap();
}

async fn service_account(e: &Env, name: &str) {
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    e.ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
}

async fn deployment(e: &Env, app: &str, node: &str, sa: &str) {
    let d: Deployment = serde_json::from_value(json!({"metadata": {"name": app}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": app}},
        "template": {"metadata": {"labels": {"app": app, "tailnode.dev/node": node}},
                     "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "demo"}]}}}}))
    .unwrap();
    e.ns.api::<Deployment>()
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
}

async fn the_pod(e: &Env, app: &str) -> Pod {
    let api = e.ns.api::<Pod>();
    let lp = ListParams::default().labels(&format!("app={app}"));
    eventually(WAIT, || async {
        api.list(&lp)
            .await
            .ok()?
            .items
            .into_iter()
            .find(|p| p.metadata.deletion_timestamp.is_none())
    })
    .await
    .unwrap_or_else(|| panic!("no pod for {app}"))
}

fn data(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8(v.0.clone()).unwrap())
}

async fn secret_where(e: &Env, name: &str, pred: impl Fn(&Secret) -> bool) -> Secret {
    let api = e.ns.api::<Secret>();
    eventually(WAIT, || async {
        api.get_opt(name).await.ok().flatten().filter(|s| pred(s))
    })
    .await
    .unwrap_or_else(|| panic!("Secret {name} never reached the expected state"))
}

/// Waits for the operator's key, then runs the pod's sidecar (and a fake app answering `body`).
async fn run(e: &Env, pod: &Pod, body: &str) -> RunningPod {
    let name = pod.name_any();
    secret_where(e, &format!("ts-{name}"), |s| {
        data(s, "authkey").is_some() || data(s, "device_id").is_some()
    })
    .await;
    let (h, ns, body) = (e.h.clone(), e.ns.name.clone(), body.to_string());
    let opts = PodOptions {
        app: Some((8080, body)),
        wait: Some(WAIT),
        ..Default::default()
    };
    blocking(move || podrunner::start_pod_with(&h, &ns, &name, &opts).unwrap_or_else(|e| panic!("{e}"))).await
}

fn ips(s: &Secret) -> Vec<String> {
    serde_json::from_str(&data(s, "device_ips").unwrap_or_default()).unwrap_or_default()
}

async fn headscale_node(h: &Harness, id: &str) -> Option<Value> {
    h.headscale_nodes()
        .await
        .into_iter()
        .find(|n| n["id"].as_str() == Some(id))
}

/// Scenarios 1-5: join with operator-made RBAC only, restart keeps the node, per-pod Secret
/// isolation, inbound over the tailnet, outbound through the injected proxy env.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_pods_join_restart_isolate_and_carry_traffic() {
    let e = env("tailnet", json!({})).await;
    let h = e.h;
    let spec = json!({"tags": ["tag:k8s"], "outbound": {"socks5Port": 1055, "httpProxyPort": 1056, "exportEnv": true}});
    node(&e, "alpha", spec.clone()).await;
    node(&e, "beta", spec).await;
    service_account(&e, "sa-a").await;
    service_account(&e, "sa-b").await;
    deployment(&e, "a", "alpha", "sa-a").await;
    deployment(&e, "b", "beta", "sa-b").await;
    let (pod_a, pod_b) = (the_pod(&e, "a").await, the_pod(&e, "b").await);
    let created = Instant::now();
    let run_a = run(&e, &pod_a, "hello from pod a").await;
    let run_b = run(&e, &pod_b, "hello from pod b").await;

    // 1. containerboot wrote its device into its own Secret with the operator's RBAC only.
    let secret_a = format!("ts-{}", pod_a.name_any());
    let sa = secret_where(&e, &secret_a, |s| data(s, "device_id").is_some() && !ips(s).is_empty()).await;
    let device_a = data(&sa, "device_id").unwrap();
    assert!(data(&sa, "authkey").is_none(), "the key is gone once registered");
    println!("pod a: CREATE -> registered in {:.1}s", created.elapsed().as_secs_f64());
    let hs = headscale_node(h, &device_a)
        .await
        .expect("Headscale lists pod a's node");
    assert!(
        hs["tags"].to_string().contains("tag:k8s") || hs["forcedTags"].to_string().contains("tag:k8s"),
        "{hs}"
    );
    let fqdn = data(&sa, "device_fqdn").unwrap();
    assert!(
        fqdn.starts_with(&pod_a.name_any()),
        "hostname derives from the pod name: {fqdn}"
    );
    let st = eventually(WAIT, || async {
        let n = e.ns.api::<TailscaleNode>().get("alpha").await.ok()?;
        let st = serde_json::to_value(n.status?).ok()?;
        (st["readyReplicas"] == 1).then_some(st)
    })
    .await
    .expect("status shows the registered replica");
    assert_eq!(st["replicas"][0]["ips"], json!(ips(&sa)));
    assert_eq!(st["replicas"][0]["deviceId"], json!(device_a));

    // 3. Pod a's own token cannot read pod b's Secret (403 from the real apiserver).
    // A token bound to pod a, as the kubelet projects it into the pod.
    let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod_a.name_any(), "uid": pod_a.metadata.uid}}});
    let tr: Value =
        e.ns.api::<ServiceAccount>()
            .create_subresource("token", "sa-a", &PostParams::default(), &request)
            .await
            .unwrap();
    let token = tr["status"]["token"].as_str().unwrap().to_string();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&h.ca_pem()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let get = |secret: String| {
        let url = format!("{}/api/v1/namespaces/{}/secrets/{secret}", h.apiserver_url(), e.ns.name);
        let req = http.get(url).bearer_auth(token.trim().to_string());
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(secret_a.clone()).await, 200, "pod a reads its own Secret");
    assert_eq!(
        get(format!("ts-{}", pod_b.name_any())).await,
        403,
        "pod a cannot read pod b's Secret"
    );

    // 4. A plain tailnet member fetches pod a's app through the tailnet (userspace inbound lands
    //    on 127.0.0.1:8080 in the pod).
    let key = h.preauth_key(&["tag:test"]).await;
    let hh = h.clone();
    let member = blocking(move || podrunner::member_start(&hh, &unique("m"), &key)).await;
    let ip_a = ips(&sa)[0].clone();
    let m = member.clone();
    let url = format!("http://{ip_a}:8080/");
    let body = blocking(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            match m.curl(&url) {
                Ok(b) => return b,
                Err(err) if Instant::now() > deadline => panic!("member could not reach pod a: {err}"),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    })
    .await;
    assert!(body.contains("hello from pod a"), "{body}");

    // Network discipline: every socket in pod a's netns talks to loopback or the pod itself.
    let (r, pod_ip) = (run_a.clone(), run_a.ip.clone());
    let sockets = blocking(move || r.exec(&["ss", "-tunaH"])).await;
    let text = String::from_utf8_lossy(&sockets.stdout).to_string();
    assert!(
        sockets.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&sockets.stderr)
    );
    assert!(
        text.contains(":8080") && text.contains(":9002"),
        "expected the app and the health port:\n{text}"
    );
    for line in text.lines() {
        let peer = line.split_whitespace().nth(5).unwrap_or("*");
        let host = peer
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(peer)
            .trim_matches(['[', ']']);
        let local = ["*", "0.0.0.0", "::", "127.0.0.1", "::1", pod_ip.as_str()].contains(&host)
            || host.starts_with("127.")
            || host.starts_with("::ffff:127.");
        assert!(local, "pod a has a socket to a non-local peer: {line}\n{text}");
    }

    // 5. The app in pod a reaches pod b over the tailnet through the injected proxy env.
    let sb = secret_where(&e, &format!("ts-{}", pod_b.name_any()), |s| !ips(s).is_empty()).await;
    let ip_b = ips(&sb)[0].clone();
    let stored_a = e.ns.api::<Pod>().get(&pod_a.name_any()).await.unwrap();
    let app_env: Vec<(String, String)> = stored_a.spec.unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.value.clone()?)))
        .collect();
    let all_proxy = app_env
        .iter()
        .find(|(k, _)| k == "ALL_PROXY")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(all_proxy, "socks5h://127.0.0.1:1055");
    let http_proxy = app_env
        .iter()
        .find(|(k, _)| k == "HTTP_PROXY")
        .map(|(_, v)| v.clone())
        .unwrap();
    let (hh, target) = (h.clone(), format!("{}/{}", e.ns.name, pod_a.name_any()));
    for proxy in [all_proxy, http_proxy] {
        let (hh, target, url) = (hh.clone(), target.clone(), format!("http://{ip_b}:8080/"));
        let out = blocking(move || {
            let deadline = Instant::now() + WAIT;
            loop {
                let env = format!("ALL_PROXY={proxy}");
                let o = podrunner::exec(&hh, &target, &["env", &env, "curl", "-sS", "--max-time", "10", &url]);
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                if o.status.success() || Instant::now() > deadline {
                    return (o.status.success(), text, String::from_utf8_lossy(&o.stderr).to_string());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .await;
        assert!(
            out.0 && out.1.contains("hello from pod b"),
            "outbound via the proxy failed: {out:?}"
        );
    }

    // 2. Restarting the sidecar keeps the node: same device, no new key, no new Headscale node.
    let nodes_before = h.headscale_nodes().await.len();
    let restarted = Instant::now();
    let run_a2 = blocking(move || run_a.restart()).await;
    println!(
        "pod a: sidecar restart -> back online in {:.1}s",
        restarted.elapsed().as_secs_f64()
    );
    let after = e.ns.api::<Secret>().get(&secret_a).await.unwrap();
    assert_eq!(data(&after, "device_id").as_deref(), Some(device_a.as_str()));
    assert!(data(&after, "authkey").is_none(), "no new key minted");
    assert_eq!(
        h.headscale_nodes().await.len(),
        nodes_before,
        "no new node in Headscale"
    );

    blocking(move || {
        run_a2.stop();
        run_b.stop();
        member.stop();
    })
    .await;
    e.ns.cleanup().await;
}

/// Scenario 6: deleting a Deployment pod removes its node from Headscale; restarting a
/// StatefulSet pod (delete + recreate) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pods_leave_the_tailnet_statefulset_pods_do_not() {
    let e = env("cleanup", json!({})).await;
    let h = e.h;
    node(&e, "web", json!({"tags": ["tag:k8s"], "hostname": "web"})).await;
    deployment(&e, "web", "web", "default").await;
    let pod = the_pod(&e, "web").await;
    let running = run(&e, &pod, "web").await;
    let s = secret_where(&e, &format!("ts-{}", pod.name_any()), |s| {
        data(s, "device_id").is_some()
    })
    .await;
    let device = data(&s, "device_id").unwrap();
    assert!(headscale_node(h, &device).await.is_some());
    // The kubelet stops the containers of a deleted pod; then the operator deletes the device.
    e.ns.api::<Pod>()
        .delete(&pod.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    blocking(move || running.stop()).await;
    let gone = eventually(WAIT, || async {
        headscale_node(h, &device).await.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "Headscale still lists the deleted pod's node {device}");

    node(&e, "db", json!({"tags": ["tag:k8s"], "hostname": "db"})).await;
    let sts: StatefulSet = serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {
        "replicas": 1, "serviceName": "db", "podManagementPolicy": "Parallel", "selector": {"matchLabels": {"app": "db"}},
        "template": {"metadata": {"labels": {"app": "db", "tailnode.dev/node": "db"}},
                     "spec": {"containers": [{"name": "db", "image": "demo"}]}}}}))
    .unwrap();
    e.ns.api::<StatefulSet>()
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
    let db0 = the_pod(&e, "db").await;
    let running = run(&e, &db0, "db").await;
    let s = secret_where(&e, "ts-db-0", |s| data(s, "device_id").is_some()).await;
    let device = data(&s, "device_id").unwrap();
    assert!(
        data(&s, "device_fqdn").unwrap().starts_with("db-0"),
        "StatefulSet hostname is <prefix>-<ordinal>"
    );
    e.ns.api::<Pod>()
        .delete("db-0", &DeleteParams::default())
        .await
        .unwrap();
    blocking(move || running.stop()).await;
    let old_uid = db0.metadata.uid.clone();
    let again = eventually(WAIT, || async {
        let p = e.ns.api::<Pod>().get_opt("db-0").await.ok()??;
        (p.metadata.uid != old_uid).then_some(p)
    })
    .await
    .expect("the StatefulSet recreates db-0");
    let running = run(&e, &again, "db").await;
    let s = secret_where(&e, "ts-db-0", |s| !ips(s).is_empty()).await;
    assert_eq!(
        data(&s, "device_id").as_deref(),
        Some(device.as_str()),
        "same node after the restart"
    );
    assert!(headscale_node(h, &device).await.is_some(), "Headscale still lists db-0");
    blocking(move || running.stop()).await;
    e.ns.cleanup().await;
}

/// Scenario 7: TUN mode in a pod netns with /dev/net/tun gets a tailscale0 interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tun_mode_pod_gets_a_tailscale0_interface() {
    let e = env("tun", json!({"pod-security.kubernetes.io/enforce": "privileged"})).await;
    node(&e, "router", json!({"mode": "auto", "tags": ["tag:k8s"]})).await;
    deployment(&e, "router", "router", "default").await;
    let pod = the_pod(&e, "router").await;
    assert_eq!(
        pod.annotations()["tailnode.dev/mode"],
        "tun",
        "auto picks TUN in a privileged namespace"
    );
    let running = run(&e, &pod, "router").await;
    let s = secret_where(&e, &format!("ts-{}", pod.name_any()), |s| !ips(s).is_empty()).await;
    let r = running.clone();
    let link = blocking(move || r.exec(&["ip", "-brief", "addr", "show", "tailscale0"])).await;
    let text = String::from_utf8_lossy(&link.stdout).to_string();
    assert!(
        link.status.success(),
        "no tailscale0: {}",
        String::from_utf8_lossy(&link.stderr)
    );
    assert!(text.contains(&ips(&s)[0]), "tailscale0 carries the tailnet IP: {text}");
    blocking(move || running.stop()).await;
    e.ns.cleanup().await;
}

/// Scenario 8: the serve config reaches containerboot. Headscale issues no HTTPS certificates, so
/// a config with an HTTPS endpoint is reported as needing HTTPS (containerboot then applies none
/// of it); a TCP-forward config is applied and carries traffic over the tailnet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_config_is_applied() {
    let e = env("serve", json!({})).await;
    let h = e.h;
    node(
        &e,
        "secure",
        json!({"tags": ["tag:k8s"], "serve": [{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080"}]}),
    )
    .await;
    node(
        &e,
        "plain",
        json!({"tags": ["tag:k8s"], "serve": [{"port": 81, "protocol": "tcp", "target": "tcp://127.0.0.1:8080"}]}),
    )
    .await;
    deployment(&e, "secure", "secure", "default").await;
    deployment(&e, "plain", "plain", "default").await;
    let cm = eventually(WAIT, || async {
        e.ns.api::<k8s_openapi::api::core::v1::ConfigMap>()
            .get_opt("tsn-plain-serve")
            .await
            .ok()
            .flatten()
    })
    .await
    .expect("serve ConfigMap");
    assert!(cm.data.unwrap()["serve.json"].contains("\"TCPForward\": \"127.0.0.1:8080\""));

    let secure = run(&e, &the_pod(&e, "secure").await, "secure").await;
    let r = secure.clone();
    let said = blocking(move || {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if r.logs().contains("ensure that HTTPS is enabled for your tailnet") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    })
    .await;
    assert!(
        said,
        "containerboot never reported the HTTPS endpoint:\n{}",
        secure.logs()
    );

    let pod = the_pod(&e, "plain").await;
    let running = run(&e, &pod, "served over tcp").await;
    let s = secret_where(&e, &format!("ts-{}", pod.name_any()), |s| !ips(s).is_empty()).await;
    let key = h.preauth_key(&["tag:test"]).await;
    let hh = h.clone();
    let member = blocking(move || podrunner::member_start(&hh, &unique("ms"), &key)).await;
    let (m, url, r) = (member.clone(), format!("http://{}:81/", ips(&s)[0]), running.clone());
    let body = blocking(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            match m.curl(&url) {
                Ok(b) => return b,
                Err(err) if Instant::now() > deadline => {
                    panic!("serve TCP forward unreachable: {err}\n--- sidecar log:\n{}", r.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    })
    .await;
    assert!(body.contains("served over tcp"), "{body}");
    blocking(move || {
        running.stop();
        secure.stop();
        member.stop();
    })
    .await;
    e.ns.cleanup().await;
}
