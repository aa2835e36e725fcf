//! Policy mode (`injector: policy`) against the webhook, in one cluster: the chart's
//! MutatingAdmissionPolicy, ValidatingAdmissionPolicy and bindings (rendered with `helm template`)
//! serve namespaces labelled `tailnode.dev/injector=policy`, which the installed webhook's
//! namespaceSelector leaves out (`workloads::upgrade_operator`). Every example's pods, the
//! fixture's and a set of edge cases are created (server-side dry run: admission runs in full,
//! nothing is stored or started) once through each path; the pods the apiserver would store must
//! be identical after the names, uids and timestamps are normalised, and a refused pod must be
//! refused with the same message. Then pod CREATE latency through each path, in the same run.

use std::path::Path;
use std::time::Instant;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::cluster::{Cluster, Ns, OPERATOR_NS, WAIT};
use crate::policy_cases::{app, edge_nodes, edge_pods};
use crate::support;
use tailnode::api::TailscaleNode;

/// The namespace label the test's policy bindings select.
const POLICY_LABEL: &str = "tailnode.dev/injector";
/// Creates per path for the latency numbers.
const LATENCY_CREATES: usize = 60;

/// One namespace pair: `webhook` served by the webhook, `policy` by the policy.
struct Pair {
    webhook: Ns,
    policy: Ns,
}

impl Pair {
    async fn new(c: &Cluster, labels: Value) -> Pair {
        let mut policy_labels = labels.clone();
        policy_labels[POLICY_LABEL] = json!("policy");
        Pair {
            webhook: Ns::new(c, "pol-w", labels).await,
            policy: Ns::new(c, "pol-p", policy_labels).await,
        }
    }

    /// Creates the TailscaleNode (or ServiceAccount) in both namespaces; false if the apiserver
    /// refuses it (a fixture of an invalid node).
    async fn apply(&self, c: &Cluster, doc: &Value) -> bool {
        let mut ok = true;
        for ns in [&self.webhook, &self.policy] {
            let mut doc = doc.clone();
            doc["metadata"]["namespace"] = json!(ns.name);
            let path = std::env::temp_dir().join(support::unique("policy-doc"));
            std::fs::write(&path, serde_json::to_string(&doc).unwrap()).unwrap();
            let (applied, _, _) = c.kubectl(&["create", "-f", path.to_str().unwrap()]);
            let _ = std::fs::remove_file(&path);
            ok &= applied;
        }
        ok
    }

    async fn delete(self) {
        self.webhook.delete().await;
        self.policy.delete().await;
    }
}

/// What admission made of a pod: the pod it would store (normalised) or the refusal message.
async fn admit(ns: &Ns, pod: &Value) -> Result<Value, String> {
    let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match ns.api::<Pod>().create(&pp, &pod).await {
        Ok(stored) => Ok(normalise(serde_json::to_value(stored).unwrap())),
        Err(kube::Error::Api(e)) => {
            // `admission webhook "..." denied the request: M` / `ValidatingAdmissionPolicy '...'
            // with binding '...' denied request: M`: the message M.
            let m = e.message;
            let tail = ["denied the request: ", "denied request: "]
                .iter()
                .find_map(|sep| m.split_once(sep).map(|(_, t)| t.to_string()));
            Err(tail.unwrap_or(m))
        }
        Err(e) => Err(format!("transport: {e}")),
    }
}

/// Drops what differs between two creates of the same pod in two namespaces.
fn normalise(mut pod: Value) -> Value {
    // MagicDNS pods search their own namespace's services first.
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
    if let Some(searches) = pod["spec"]["dnsConfig"]["searches"].as_array_mut() {
        for s in searches
            .iter_mut()
            .filter(|s| s.as_str() == Some(&format!("{ns}.svc.cluster.local")))
        {
            *s = json!("<namespace>.svc.cluster.local");
        }
    }
    let meta = pod["metadata"].as_object_mut().unwrap();
    for k in [
        "namespace",
        "uid",
        "creationTimestamp",
        "resourceVersion",
        "managedFields",
        "generation",
    ] {
        meta.remove(k);
    }
    if meta.contains_key("generateName") {
        meta.remove("name");
    }
    if let Some(status) = pod.get_mut("status") {
        *status = json!({});
    }
    // The ServiceAccount admission's token volume has a random suffix.
    let text = serde_json::to_string(&pod).unwrap();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("kube-api-access-") {
        let end = i + "kube-api-access-".len();
        out.push_str(&rest[..end]);
        out.push_str("xxxxx");
        rest = &rest[(end + 5).min(rest.len())..];
    }
    out.push_str(rest);
    serde_json::from_str(&out).unwrap()
}

/// The pods a workload object would have, as the apiserver would see them at CREATE.
fn workload_pods(doc: &Value) -> Vec<Value> {
    let name = doc["metadata"]["name"].as_str().unwrap_or("x").to_string();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let template = match kind {
        "Pod" => return vec![doc.clone()],
        "Deployment" | "ReplicaSet" | "DaemonSet" | "Job" | "StatefulSet" => doc["spec"]["template"].clone(),
        "CronJob" => doc["spec"]["jobTemplate"]["spec"]["template"].clone(),
        _ => return vec![],
    };
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"].clone(),
        "spec": template["spec"].clone()});
    let meta = &mut pod["metadata"];
    if kind == "StatefulSet" {
        meta["name"] = json!(format!("{name}-0"));
        meta["labels"]["apps.kubernetes.io/pod-index"] = json!("0");
        meta["labels"]["statefulset.kubernetes.io/pod-name"] = json!(format!("{name}-0"));
        meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
            "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]);
        // The StatefulSet controller adds a volume per claim template.
        for claim in doc["spec"]["volumeClaimTemplates"].as_array().into_iter().flatten() {
            let claim_name = claim["metadata"]["name"].as_str().unwrap_or_default();
            let volume = json!({"name": claim_name,
                "persistentVolumeClaim": {"claimName": format!("{claim_name}-{name}-0")}});
            match pod["spec"]["volumes"].as_array_mut() {
                Some(v) => v.push(volume),
                None => pod["spec"]["volumes"] = json!([volume]),
            }
        }
    } else if kind == "Deployment" {
        meta["generateName"] = json!(format!("{name}-7d4b9c8f6d-"));
    } else {
        meta["generateName"] = json!(format!("{name}-"));
    }
    vec![pod]
}

/// Every YAML document of `path`.
fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde_yaml::Value::deserialize(d).ok())
        .filter_map(|v| serde_json::to_value(v).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// The chart's policy objects, selecting namespaces labelled `tailnode.dev/injector=policy`.
fn apply_policy(c: &Cluster) {
    let chart = support::repo_root().join("charts/tailnode");
    let (ok, out, err) = c.run(
        &c.helm,
        &[
            "template",
            "tailnode",
            chart.to_str().unwrap(),
            "--namespace",
            OPERATOR_NS,
            "--set",
            "injector=policy",
            "--set",
            "policy.namespaceSelector.matchLabels.tailnode\\.dev/injector=policy",
            "--show-only",
            "templates/injectionpolicy.yaml",
        ],
    );
    assert!(ok, "helm template: {err}");
    let path = std::env::temp_dir().join(support::unique("injection-policy"));
    std::fs::write(&path, out).unwrap();
    let (ok, _, err) = c.kubectl(&["apply", "-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(ok, "kubectl apply of the policy objects: {err}");
}

fn delete_policy(c: &Cluster) {
    for kind in [
        "mutatingadmissionpolicybinding",
        "mutatingadmissionpolicy",
        "validatingadmissionpolicybinding",
        "validatingadmissionpolicy",
    ] {
        let _ = c.kubectl(&["delete", kind, "tailnode-inject", "--ignore-not-found"]);
    }
}

/// Waits until both paths know every TailscaleNode of `pair` (the webhook's cache, the node's
/// `status.injection`).
async fn wait_for_nodes(pair: &Pair, nodes: &[String]) {
    for name in nodes {
        let api = pair.policy.api::<TailscaleNode>();
        let rendered = support::eventually(WAIT, || async {
            api.get(name).await.ok()?.status?.injection.map(|_| ())
        })
        .await;
        assert!(rendered.is_some(), "TailscaleNode {name} never got status.injection");
        let probe = json!({"metadata": {"name": "probe", "labels": {"tailnode.dev/node": name}},
            "spec": {"containers": [app()]}});
        for ns in [&pair.webhook, &pair.policy] {
            let known = support::eventually(WAIT, || async {
                match admit(ns, &probe).await {
                    Err(m) if m.contains("there is no TailscaleNode") || m.contains("has no status.injection") => None,
                    Err(m) if m.starts_with("transport") => None,
                    // Admitted without a sidecar: the policy is not in force yet.
                    Ok(p) if !serde_json::from_value(p.clone()).is_ok_and(|p: Pod| support::has_sidecar(&p)) => None,
                    _ => Some(()),
                }
            })
            .await;
            assert!(known.is_some(), "{} never learnt TailscaleNode {name}", ns.name);
        }
    }
}

/// Admits `pod` through both paths of `pair` and compares; returns a description of a mismatch.
async fn compare(pair: &Pair, case: &str, pod: &Value) -> Option<String> {
    // Refusals may name the namespace.
    let webhook = admit(&pair.webhook, pod)
        .await
        .map_err(|m| m.replace(&pair.webhook.name, "<namespace>"));
    let policy = admit(&pair.policy, pod)
        .await
        .map_err(|m| m.replace(&pair.policy.name, "<namespace>"));
    if webhook == policy {
        let verdict = match &webhook {
            Ok(p) if support::has_sidecar(&serde_json::from_value(p.clone()).unwrap()) => "injected",
            Ok(_) => "admitted",
            Err(m) => m.as_str(),
        };
        eprintln!("policy-vs-webhook {case}: same ({verdict})");
        return None;
    }
    Some(format!(
        "{case}:\n  webhook: {}\n  policy:  {}",
        serde_json::to_string(&webhook).unwrap(),
        serde_json::to_string(&policy).unwrap()
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn latency(ns: &Ns, node: &str) -> (f64, f64) {
    let pod = json!({"metadata": {"generateName": "lat-", "labels": {"tailnode.dev/node": node}},
        "spec": {"containers": [{"name": "app", "image": "localhost/busybox:e2e"}]}});
    let mut ms = Vec::with_capacity(LATENCY_CREATES);
    for _ in 0..LATENCY_CREATES {
        let t = Instant::now();
        let r = admit(ns, &pod).await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(r.is_ok(), "latency create in {}: {r:?}", ns.name);
    }
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 50.0), percentile(&ms, 99.0))
}

/// The scenario.
pub async fn policy_matches_webhook(c: Cluster) {
    apply_policy(&c);
    let mut mismatches = Vec::new();
    let mut compared = 0;

    // Examples and the fixture, one namespace pair per file, with the file's namespace labels.
    let root = support::repo_root();
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("examples"))
        .unwrap()
        .flatten()
        .filter(|d| d.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten().map(|f| f.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.push(root.join("tests/fixtures/web.yaml"));
    files.push(root.join("tests/fixtures/bad-node.yaml"));
    for file in files {
        let docs = docs(&file);
        let labels = docs
            .iter()
            .find(|d| d["kind"] == "Namespace")
            .map(|d| d["metadata"]["labels"].clone())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        let pair = Pair::new(&c, labels).await;
        let mut nodes = Vec::new();
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "TailscaleNode" || d["kind"] == "ServiceAccount")
        {
            if pair.apply(&c, d).await && d["kind"] == "TailscaleNode" {
                nodes.push(d["metadata"]["name"].as_str().unwrap_or_default().to_string());
            }
        }
        wait_for_nodes(&pair, &nodes).await;
        let stem = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
        let mut pods: Vec<(String, Value)> = docs
            .iter()
            .flat_map(workload_pods)
            .map(|mut p| {
                p["metadata"].as_object_mut().map(|m| m.remove("namespace"));
                (
                    format!(
                        "{stem} {}",
                        p["metadata"]["name"]
                            .as_str()
                            .or(p["metadata"]["generateName"].as_str())
                            .unwrap_or("?")
                    ),
                    p,
                )
            })
            .collect();
        for n in &nodes {
            pods.push((
                format!("{stem} generic pod of {n}"),
                json!({"metadata": {"generateName": "generic-", "labels": {"tailnode.dev/node": n}},
                    "spec": {"containers": [app()]}}),
            ));
        }
        for (case, pod) in pods {
            compared += 1;
            mismatches.extend(compare(&pair, &case, &pod).await);
        }
        pair.delete().await;
    }

    // The edge cases, in one pair of unlabelled namespaces (PodSecurity at the default level).
    let pair = Pair::new(&c, json!({})).await;
    let mut names = Vec::new();
    for (name, spec) in edge_nodes() {
        let doc = json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
            "metadata": {"name": name}, "spec": spec});
        assert!(pair.apply(&c, &doc).await, "create TailscaleNode {name}");
        names.push(name.to_string());
    }
    wait_for_nodes(&pair, &names).await;
    for (case, pod) in edge_pods() {
        compared += 1;
        mismatches.extend(compare(&pair, case, &pod).await);
    }

    // A namespace that opts every pod in. (The webhook's namespace entry does not honour
    // webhook.namespaceSelector, so in the policy namespace it runs after the policy and finds
    // the pods injected already: the stored pods are still the policy's.)
    let opted = Pair::new(&c, json!({"tailnode.dev/node": "plain"})).await;
    let doc = json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "plain"}, "spec": {}});
    assert!(opted.apply(&c, &doc).await, "create TailscaleNode plain");
    wait_for_nodes(&opted, &["plain".to_string()]).await;
    for (case, pod) in [
        (
            "namespace-opt-in",
            json!({"metadata": {"name": "n1"}, "spec": {"containers": [app()]}}),
        ),
        (
            "namespace-opt-out",
            json!({"metadata": {"name": "n2", "labels": {"tailnode.dev/inject": "false"}},
            "spec": {"containers": [app()]}}),
        ),
        (
            "namespace-opt-in-host-network",
            json!({"metadata": {"name": "n3"},
            "spec": {"hostNetwork": true, "containers": [app()]}}),
        ),
    ] {
        compared += 1;
        mismatches.extend(compare(&opted, case, &pod).await);
    }
    opted.delete().await;

    // Latency, alternating paths so that both see the same cluster.
    let (w1, _) = latency(&pair.webhook, "plain").await;
    let (p1, _) = latency(&pair.policy, "plain").await;
    let (w50, w99) = latency(&pair.webhook, "plain").await;
    let (p50, p99) = latency(&pair.policy, "plain").await;
    eprintln!("warm-up medians: webhook {w1:.2} ms, policy {p1:.2} ms");
    pair.delete().await;
    delete_policy(&c);
    eprintln!("compared {compared} pods through both paths");
    println!(
        "injector_latency creates={LATENCY_CREATES} webhook_p50_ms={w50:.2} webhook_p99_ms={w99:.2} policy_p50_ms={p50:.2} policy_p99_ms={p99:.2}"
    );
    assert!(
        mismatches.is_empty(),
        "policy mode and the webhook differ on {} of {compared} pods:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// The chart installed with `injector: policy` alone: no MutatingWebhookConfiguration, the
/// operator without its webhook, and a Deployment's pod injected by the apiserver joins the
/// tailnet; then back to the webhook for the scenarios after this one.
pub async fn policy_mode_alone(c: Cluster) {
    crate::workloads::upgrade_operator(&c, &["injector=policy"]).await;
    let hooks = kube::Api::<MutatingWebhookConfiguration>::all(c.client().await);
    let hook = hooks.get_opt(crate::workloads::RELEASE).await.unwrap();
    assert!(hook.is_none(), "policy mode renders no MutatingWebhookConfiguration");
    let ns = Ns::new(&c, "polonly", json!({})).await;
    crate::workloads::node(&ns, "web", json!({"tags": ["tag:k8s"]})).await;
    let api = ns.api::<TailscaleNode>();
    let rendered = support::eventually(WAIT, || async {
        api.get("web").await.ok()?.status?.injection.map(|_| ())
    })
    .await;
    assert!(rendered.is_some(), "TailscaleNode web never got status.injection");
    crate::workloads::deployment(&c, &ns, "web", "web", "default", "policy").await;
    let pod = ns.ready_pod("web").await;
    assert!(support::has_sidecar(&pod), "the policy injected the sidecar");
    let secret = format!("ts-{}", kube::ResourceExt::name_any(&pod));
    let s = ns.secret_where(&secret, |s| !crate::cluster::ips(s).is_empty()).await;
    eprintln!(
        "policy mode: pod {} joined the tailnet with {:?}",
        kube::ResourceExt::name_any(&pod),
        crate::cluster::ips(&s)
    );
    ns.delete().await;
    crate::workloads::upgrade_operator(&c, &[]).await;
}
