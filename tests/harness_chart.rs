//! The Helm chart on the harness: `helm install` creates everything, and the operator runs with
//! nothing but a token of the chart's ServiceAccount — webhook caBundle, Lease, injection, key,
//! RBAC, status, cleanup — without a single 403, while `kubectl auth can-i` confirms what the
//! ServiceAccount must not do. Rendering-only checks live in harness_chart/render.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

#[path = "harness_chart/render.rs"]
mod render;
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use render::{chart_dir, container_args, parse_run_args};
use serde_json::json;
use support::*;
use tailnode::api::TailscaleNode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
/// Label that selects this test's workload namespace for the chart's webhook.
const SELECTOR: &str = "tailnode-chart-test";
const IDENTITY: &str = "chart-test-0";

/// Everything the operator logs (failure messages print it).
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    fn install() -> Self {
        let buf = Self::default();
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Removes what a failed run leaves on the shared harness: the release (and so its webhook
/// configuration), finalizers no operator will remove any more, the namespaces.
struct Leftovers {
    h: &'static Harness,
    release: String,
    namespaces: [String; 2],
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let [release_ns, apps] = &self.namespaces;
        let _ = self
            .h
            .run("helm", &["uninstall", &self.release, "--namespace", release_ns], None);
        let (_, names, _) = self.h.run(
            "kubectl",
            &["get", "tailscalenodes,secrets", "-n", apps, "-o", "name"],
            None,
        );
        for name in names.lines() {
            let patch = r#"{"metadata":{"finalizers":null}}"#;
            let _ = self.h.run(
                "kubectl",
                &["patch", name, "-n", apps, "--type=merge", "-p", patch],
                None,
            );
        }
        let _ = self.h.run(
            "kubectl",
            &["delete", "namespace", release_ns, apps, "--wait=false"],
            None,
        );
    }
}

fn pem_to_der(pem: &[u8]) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut body = String::new();
    for line in text.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE") {
            body.clear();
        } else if line.starts_with("-----END CERTIFICATE") {
            out.push(
                base64::engine::general_purpose::STANDARD
                    .decode(&body)
                    .expect("PEM body"),
            );
        } else {
            body.push_str(line.trim());
        }
    }
    assert!(!out.is_empty(), "no certificate in the harness CA file");
    out
}

/// A client that authenticates with a ServiceAccount token minted through TokenRequest.
async fn service_account_client(h: &Harness, admin: &Client, ns: &str, sa: &str) -> Client {
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .expect("TokenRequest for the chart's ServiceAccount")
        .status
        .and_then(|s| s.token)
        .expect("a token");
    let mut cfg = kube::Config::new(h.apiserver_url().parse().expect("apiserver URL"));
    cfg.root_cert = Some(pem_to_der(&h.ca_pem()));
    cfg.auth_info.token = Some(token.into());
    cfg.default_namespace = ns.to_string();
    Client::try_from(cfg).expect("service account client")
}

/// What `helm install` made.
struct Installed {
    release: String,
    namespace: String,
    service_account: String,
    webhook_config: String,
    /// The operator container's args.
    args: Vec<String>,
}

async fn helm_install(h: &Harness, release: &str, release_ns: &TestNamespace) -> Installed {
    let creds: Secret = serde_json::from_value(json!({"metadata": {"name": "headscale-creds"},
        "stringData": {"api-key": h.headscale_api_key}}))
    .unwrap();
    release_ns
        .api::<Secret>()
        .create(&PostParams::default(), &creds)
        .await
        .unwrap();
    let mut args: Vec<String> = vec![
        "install".into(),
        release.into(),
        chart_dir(),
        "--namespace".into(),
        release_ns.name.clone(),
        // The CRD is shared by every test on the harness and install_crd applied the generated
        // one; the chart's copy is the same bytes (render.rs: chart_crd_is_the_generated_crd).
        "--skip-crds".into(),
    ];
    for kv in [
        "credentials.kind=headscale".to_string(),
        "credentials.existingSecret=headscale-creds".into(),
        format!("credentials.headscaleURL={}", h.headscale_url),
        format!("credentials.headscaleUser={}", h.headscale_user_id),
        format!("controlURL={}", h.headscale_url),
        // Only this test's namespace: other test binaries' pods never reach this webhook.
        format!("webhook.namespaceSelector.matchLabels.{SELECTOR}={release}"),
    ] {
        args.extend(["--set-string".to_string(), kv]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = h.run("helm", &argv, None);
    assert!(ok, "helm install failed: {err}\n{out}");
    assert!(out.contains("kubectl get tsn"), "NOTES.txt names the next step: {out}");

    let by_release = ListParams::default().labels(&format!("app.kubernetes.io/instance={release}"));
    let deployments = release_ns.api::<Deployment>().list(&by_release).await.unwrap().items;
    assert_eq!(deployments.len(), 1);
    let deployment = serde_json::to_value(&deployments[0]).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let client = h.client().await;
    let configs = Api::<MutatingWebhookConfiguration>::all(client)
        .list(&by_release)
        .await
        .unwrap()
        .items;
    assert_eq!(configs.len(), 1);
    let installed = Installed {
        release: release.into(),
        namespace: release_ns.name.clone(),
        service_account: deployment["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .into(),
        webhook_config: configs[0].name_any(),
        args: container_args(&deployment),
    };
    let want = [
        format!("--webhook-config={}", installed.webhook_config),
        "--leader-elect=true".into(),
    ];
    for arg in want {
        assert!(installed.args.contains(&arg), "{arg} in {:?}", installed.args);
    }

    // PodSecurity `restricted` admits the operator's pods (no kubelet runs them here).
    let pods = eventually(WAIT, || async {
        let pods = release_ns.api::<Pod>().list(&by_release).await.ok()?.items;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    assert!(
        pods.is_some(),
        "the ReplicaSet never created 2 pods in a PodSecurity-restricted namespace"
    );
    installed
}

/// Starts the operator with the chart's args and the ServiceAccount's token, behind the chart's
/// own webhook configuration, and waits until it took over the caBundle, the Lease and /readyz.
async fn start_operator(
    h: &Harness,
    inst: &Installed,
    logs: &LogBuffer,
) -> (CancellationToken, JoinHandle<anyhow::Result<()>>) {
    let admin = h.client().await;
    let webhook_port = free_port();
    let admin_port = free_port();
    // The Service has no endpoints here: point the chart's webhook at the in-process operator.
    // Its caBundle must still be patched through the chart's RBAC (resourceNames).
    let hooks = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    let patch = json!([{"op": "replace", "path": "/webhooks/0/clientConfig",
        "value": {"url": format!("https://127.0.0.1:{webhook_port}/mutate")}}]);
    hooks
        .patch(
            &inst.webhook_config,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(patch).unwrap()),
        )
        .await
        .unwrap();

    let mut argv: Vec<String> = inst
        .args
        .iter()
        .filter(|a| !a.starts_with("--webhook-addr=") && !a.starts_with("--admin-addr="))
        .cloned()
        .collect();
    argv.extend([
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        format!("--admin-addr=127.0.0.1:{admin_port}"),
        "--webhook-extra-names=127.0.0.1".into(),
        format!("--namespace={}", inst.namespace),
        format!("--identity={IDENTITY}"),
    ]);
    let run = parse_run_args(&argv);
    let (lease_name, tls_secret) = (run.lease_name.clone(), run.webhook_secret.clone());
    let client = service_account_client(h, &admin, &inst.namespace, &inst.service_account).await;
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(tailnode::app::run_operator(run, client, shutdown.clone()));

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let ready = eventually(WAIT, || async {
        let cfg = hooks.get(&inst.webhook_config).await.ok()?;
        let has_ca = !cfg.webhooks?.first()?.client_config.ca_bundle.as_ref()?.0.is_empty();
        let url = format!("http://127.0.0.1:{admin_port}/readyz");
        let readyz = http.get(url).send().await.ok()?;
        (has_ca && readyz.status().is_success()).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "the operator never patched the caBundle and became ready; log:\n{}",
        logs.text()
    );
    let secrets = Api::<Secret>::namespaced(admin.clone(), &inst.namespace);
    assert!(
        secrets.get_opt(&tls_secret).await.unwrap().is_some(),
        "self-managed certificate Secret {tls_secret} in the release namespace"
    );
    let leases = Api::<Lease>::namespaced(admin, &inst.namespace);
    let lease = eventually(WAIT, || async {
        let l = leases.get_opt(&lease_name).await.ok()??;
        (l.spec?.holder_identity.as_deref() == Some(IDENTITY)).then_some(())
    })
    .await;
    assert!(lease.is_some(), "the operator never took Lease {lease_name}");
    // The apiserver picks up the caBundle change from its watch shortly after.
    tokio::time::sleep(Duration::from_secs(1)).await;
    (shutdown, operator)
}

/// A labelled Deployment gets the sidecar, a keyed Secret, the sidecar Role and a status, with
/// the chart's default (Headscale) credentials.
async fn basic_scenario(apps: &TestNamespace, logs: &LogBuffer) {
    let node: TailscaleNode = serde_json::from_value(json!({"apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode", "metadata": {"name": "web"}, "spec": {"tags": ["tag:k8s"]}}))
    .unwrap();
    apps.api::<TailscaleNode>()
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "web"}},
                     "spec": {"containers": [{"name": "app", "image": "nginx"}]}}}}))
    .unwrap();
    apps.api::<Deployment>()
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let pod = eventually(WAIT, || async {
        let lp = ListParams::default().labels("app=web");
        apps.api::<Pod>().list(&lp).await.ok()?.items.into_iter().next()
    })
    .await
    .unwrap_or_else(|| panic!("no pod of Deployment web; log:\n{}", logs.text()));
    assert!(has_sidecar(&pod), "the chart's webhook injected the sidecar");
    let secret_name = format!("ts-{}", pod.name_any());
    let key = eventually(WAIT, || async {
        let s = apps.api::<Secret>().get_opt(&secret_name).await.ok()??;
        s.data?.remove("authkey").filter(|k| !k.0.is_empty())
    })
    .await;
    assert!(
        key.is_some(),
        "Secret {secret_name} never held a key; log:\n{}",
        logs.text()
    );
    let role = eventually(WAIT, || async { apps.api::<Role>().get_opt("tsn-web").await.ok()? }).await;
    assert!(role.is_some(), "Role tsn-web; log:\n{}", logs.text());
    let status = eventually(WAIT, || async {
        let st = serde_json::to_value(apps.api::<TailscaleNode>().get("web").await.ok()?.status?).ok()?;
        (st["totalReplicas"] == 1).then_some(st)
    })
    .await;
    assert!(
        status.is_some(),
        "TailscaleNode web never counted 1 replica; log:\n{}",
        logs.text()
    );
}

/// `kubectl auth can-i --as=<sa> ARGS` → true for "yes".
fn can_i(h: &Harness, sa: &str, args: &[&str]) -> bool {
    let who = format!("--as={sa}");
    let mut all = vec!["auth", "can-i", who.as_str()];
    all.extend_from_slice(args);
    let (_, out, err) = h.run("kubectl", &all, None);
    match out.trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {args:?}: {other} {err}"),
    }
}

/// What the ServiceAccount may do, and a sample of what it must not.
fn assert_least_privilege(h: &Harness, inst: &Installed, apps: &str) {
    let rns = inst.namespace.as_str();
    let who = format!("system:serviceaccount:{rns}:{}", inst.service_account);
    let lease = format!("leases/{}", parse_run_args(&inst.args).lease_name);
    let own_config = format!("mutatingwebhookconfigurations/{}", inst.webhook_config);
    let other_config = format!("{own_config}-other");
    let own_sa = format!("serviceaccounts/{}", inst.service_account);
    for (want, args) in [
        (true, vec!["get", "secrets", "-A"]),
        (true, vec!["patch", own_config.as_str()]),
        (true, vec!["create", "leases", "-n", rns]),
        (true, vec!["update", lease.as_str(), "-n", rns]),
        (true, vec!["create", "roles", "-n", apps]),
        (true, vec!["patch", "pods", "-n", apps]),
        (true, vec!["create", "pods", "--subresource=eviction", "-n", apps]),
        (true, vec!["create", own_sa.as_str(), "--subresource=token", "-n", rns]),
        (
            false,
            vec!["create", "serviceaccounts/default", "--subresource=token", "-n", rns],
        ),
        (true, vec!["create", "subjectaccessreviews"]),
        (false, vec!["delete", "deployments", "-A"]),
        (false, vec!["create", "pods", "-n", apps]),
        (false, vec!["update", "pods", "-n", apps]),
        (false, vec!["delete", "pods", "-n", apps]),
        (false, vec!["create", "pods/ephemeralcontainers", "-n", apps]),
        (false, vec!["create", "clusterroles"]),
        (false, vec!["create", "clusterrolebindings"]),
        (false, vec!["escalate", "roles", "-A"]),
        (false, vec!["bind", "clusterroles"]),
        (false, vec!["patch", other_config.as_str()]),
        (false, vec!["create", "mutatingwebhookconfigurations"]),
        (false, vec!["update", "leases/someone-else", "-n", rns]),
        (false, vec!["create", "leases", "-n", "kube-system"]),
        (false, vec!["delete", "namespaces", "-A"]),
        (false, vec!["impersonate", "serviceaccounts", "-A"]),
        (false, vec!["update", "configmaps", "-A"]),
    ] {
        assert_eq!(can_i(h, &who, &args), want, "can-i {args:?} should be {want}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_the_operator_with_only_the_chart_rbac() {
    let logs = LogBuffer::install();
    let h = harness();
    let admin = h.client().await;
    install_crd(&admin).await;
    let release = unique("chart");
    // The release namespace enforces PodSecurity `restricted`: the operator's pods must pass.
    let restricted = json!({"pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted"});
    let release_ns = TestNamespace::new(&admin, "tailnode-chart", restricted).await;
    let apps = TestNamespace::new(&admin, "chart-app", json!({SELECTOR: release})).await;
    let _leftovers = Leftovers {
        h,
        release: release.clone(),
        namespaces: [release_ns.name.clone(), apps.name.clone()],
    };

    let inst = helm_install(h, &release, &release_ns).await;
    let (shutdown, operator) = start_operator(h, &inst, &logs).await;
    basic_scenario(&apps, &logs).await;
    assert_least_privilege(h, &inst, &apps.name);

    // Clean up while the operator runs (it removes its finalizers).
    let nodes = apps.api::<TailscaleNode>();
    nodes.delete("web", &DeleteParams::default()).await.unwrap();
    let gone = eventually(WAIT, || async {
        nodes.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "TailscaleNode web was never finalized; log:\n{}",
        logs.text()
    );
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), operator).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "the operator did not stop cleanly: {stopped:?}"
    );

    // Not one request of the whole run was refused.
    let log = logs.text();
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            // Other tests' namespaces being deleted refuse new objects: not an RBAC refusal.
            // (" 403": a status code, not digits inside a uid.)
            (l.contains("forbidden") || l.contains(" 403")) && !l.contains("namespaceterminating")
        })
        .collect();
    assert!(
        denied.is_empty(),
        "the chart's RBAC refused the operator:\n{}",
        denied.join("\n")
    );

    let (ok, _, err) = h.run(
        "helm",
        &["uninstall", &inst.release, "--namespace", &inst.namespace],
        None,
    );
    assert!(ok, "helm uninstall: {err}");
    let hooks = Api::<MutatingWebhookConfiguration>::all(admin);
    assert!(
        hooks.get_opt(&inst.webhook_config).await.unwrap().is_none(),
        "helm uninstall removes the webhook configuration"
    );
    apps.cleanup().await;
    release_ns.cleanup().await;
}
