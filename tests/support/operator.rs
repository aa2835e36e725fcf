//! Runs the real operator (`tailnode run`'s code) in this test process against the harness,
//! behind a MutatingWebhookConfiguration of its own that only matches this binary's namespaces.

use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Harness, eventually, harness};

/// A running operator.
#[derive(Debug, Clone)]
pub struct Operator {
    /// Its namespace.
    pub namespace: String,
    /// Label every test namespace must carry for the webhook to see its pods.
    pub selector: (String, String),
    /// Webhook URL.
    pub webhook_url: String,
    /// Admin URL (metrics).
    pub admin_url: String,
    /// Name of its MutatingWebhookConfiguration.
    pub webhook_config: String,
}

static OPERATOR: OnceLock<Operator> = OnceLock::new();

/// Starts the operator once per test binary (on a runtime of its own that lives as long as the
/// process) and waits until its webhook answers.
pub fn operator() -> &'static Operator {
    operator_with(&[])
}

/// `operator()` with flags (`--name=value`) that replace the defaults of the same name; the first
/// call in a test binary decides.
pub fn operator_with(flags: &[&str]) -> &'static Operator {
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    OPERATOR.get_or_init(|| {
        let h = harness().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let op = prepare(&h).await;
                let argv = argv(&h, &op, &flags);
                let args = tailnode::args::Args::parse_from(argv);
                let tailnode::args::Command::Run(run) = args.command else {
                    unreachable!()
                };
                tailnode::telemetry::init(tailnode::args::LogFormat::Plain);
                let shutdown = CancellationToken::new();
                let client = h.client().await;
                let task = tokio::spawn(tailnode::app::run_operator(*run, client, shutdown));
                wait_ready(&h, &op).await;
                tx.send(op).unwrap();
                match task.await {
                    Ok(Err(e)) => eprintln!("operator stopped: {e:#}"),
                    Err(e) => eprintln!("operator task failed: {e}"),
                    Ok(Ok(())) => {}
                }
            });
        });
        rx.recv_timeout(Duration::from_secs(90))
            .expect("the operator never became ready (caBundle + /readyz)")
    })
}

/// `tailnode run`'s argv for `op` on the harness; `flags` (`--name=value`) replace the defaults of
/// the same name.
pub fn argv(h: &Harness, op: &Operator, flags: &[String]) -> Vec<String> {
    let mut argv = vec![
        "tailnode".to_string(),
        "run".into(),
        format!("--namespace={}", op.namespace),
        "--identity=test-operator".into(),
        format!(
            "--webhook-addr={}",
            op.webhook_url
                .trim_start_matches("https://")
                .trim_end_matches("/mutate")
        ),
        format!("--admin-addr={}", op.admin_url.trim_start_matches("http://")),
        "--webhook-extra-names=127.0.0.1".into(),
        format!("--webhook-config={}", op.webhook_config),
        "--key-ttl-seconds=600".into(),
        format!("--control-url={}", h.headscale_url),
    ];
    for flag in flags {
        let name = flag.split('=').next().unwrap_or_default();
        argv.retain(|a| a.split('=').next() != Some(name));
        argv.push(flag.clone());
    }
    argv
}

/// A namespace for an operator and a MutatingWebhookConfiguration that sends it the pods of
/// namespaces labelled with its selector.
pub async fn prepare(h: &Harness) -> Operator {
    let client = h.client().await;
    super::install_crd(&client).await;
    let id = super::unique("op");
    let namespace = format!("tailnode-{id}");
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let selector = ("tailnode-test/operator".to_string(), id.clone());
    let webhook_port = super::free_port();
    let admin_port = super::free_port();
    let webhook_url = format!("https://127.0.0.1:{webhook_port}/mutate");
    let webhook_config = format!("tailnode-{id}");
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": webhook_config},
        "webhooks": [{
            "name": "inject.tailnode.dev",
            "clientConfig": {"url": webhook_url},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "objectSelector": {"matchExpressions": [{"key": "tailnode.dev/node", "operator": "Exists"}]},
            "namespaceSelector": {"matchExpressions": [
                {"key": selector.0, "operator": "In", "values": [selector.1]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [namespace, "kube-system"]}
            ]},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded"
        }]
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            &webhook_config,
            &PatchParams::apply("tailnode-tests").force(),
            &Patch::Apply(&config),
        )
        .await
        .unwrap();
    Operator {
        namespace,
        selector,
        webhook_url,
        admin_url: format!("http://127.0.0.1:{admin_port}"),
        webhook_config,
    }
}

/// Starts the `tailnode` binary (`binary`: the test's `env!("CARGO_BIN_EXE_tailnode")`) as an
/// operator process for `op`, talking to the apiserver through `kubeconfig`, its output
/// appended to `logs/<log>.log` in the harness.
pub fn spawn_process(
    h: &Harness,
    op: &Operator,
    binary: &str,
    kubeconfig: &std::path::Path,
    flags: &[String],
    log: &str,
) -> std::process::Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(h.dir.join(format!("logs/{log}.log")))
        .unwrap();
    let args = argv(h, op, flags);
    std::process::Command::new(binary)
        .args(&args[1..])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start the tailnode binary")
}

/// Waits until the webhook configuration carries the operator's CA and `/readyz` answers.
pub async fn wait_ready(h: &Harness, op: &Operator) {
    {
        let client = h.client().await;
        let hooks = Api::<MutatingWebhookConfiguration>::all(client);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let ready = eventually(Duration::from_secs(60), || async {
            let cfg = hooks.get(&op.webhook_config).await.ok()?;
            let has_ca = cfg
                .webhooks?
                .first()?
                .client_config
                .ca_bundle
                .as_ref()
                .is_some_and(|b| !b.0.is_empty());
            let readyz = http.get(format!("{}/readyz", op.admin_url)).send().await.ok()?;
            (has_ca && readyz.status().is_success()).then_some(())
        })
        .await;
        assert!(ready.is_some(), "the operator never became ready (caBundle + /readyz)");
        // The apiserver picks up the caBundle change from its watch shortly after.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The operator's metrics text.
pub async fn metrics(op: &Operator) -> String {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/metrics", op.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Removes what [`prepare`] made: the webhook configuration (first, so no pod waits on a gone
/// webhook) and the operator's namespace. For an operator that has stopped.
pub async fn remove(client: &kube::Client, op: &Operator) {
    use kube::api::DeleteParams;
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&op.webhook_config, &DeleteParams::default())
        .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(&op.namespace, &DeleteParams::default())
        .await;
}
