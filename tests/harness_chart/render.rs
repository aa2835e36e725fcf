//! The chart and config/ rendered, without a cluster: the CRD copies match the generated CRD,
//! the chart renders flags the real `tailnode run` parser accepts, its variants (self-managed
//! certificates, cert-manager, an existing issuer) hang together, config/ equals the chart, and
//! the values schema refuses bad values. Only the harness' helm and kubectl binaries are used.

use clap::Parser as _;
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::support::{Harness, harness, path_str, repo_root};

const CRD: &str = "crds/tailscalenode.yaml";

fn assert_same_file(copy: &str, fix: &str) {
    let root = repo_root();
    let want = std::fs::read(root.join(CRD)).expect("generated CRD");
    let got = std::fs::read(root.join(copy)).unwrap_or_else(|e| panic!("reading {copy}: {e}"));
    assert!(
        want == got,
        "{copy} differs from {CRD} (regenerated with `tailnode crd`); fix with: {fix}"
    );
}

#[test]
fn chart_crd_is_the_generated_crd() {
    assert_same_file(
        "charts/tailnode/crds/tailscalenode.yaml",
        "cp crds/tailscalenode.yaml charts/tailnode/crds/",
    );
}

#[test]
fn kustomize_crd_is_the_generated_crd() {
    assert_same_file(
        "config/crd/tailscalenode.yaml",
        "cp crds/tailscalenode.yaml config/crd/",
    );
}

pub fn chart_dir() -> String {
    path_str(&repo_root().join("charts/tailnode")).to_string()
}

/// `helm template` of the chart with `--set`-style arguments, as JSON documents.
fn render(h: &Harness, namespace: &str, extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut args = vec!["template", "tailnode", chart.as_str(), "--namespace", namespace];
    args.extend_from_slice(extra);
    let (ok, out, err) = h.run("helm", &args, None);
    assert!(ok, "helm template {extra:?} failed: {err}");
    parse_docs(&out)
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let all = find(docs, kind);
    assert_eq!(all.len(), 1, "exactly one {kind} rendered");
    all[0]
}

pub fn container_args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

/// The rendered args must be accepted by the operator's own command-line parser.
pub fn parse_run_args(args: &[String]) -> tailnode::args::RunArgs {
    let argv = std::iter::once("tailnode".to_string()).chain(args.iter().cloned());
    match tailnode::args::Args::try_parse_from(argv) {
        Ok(tailnode::args::Args {
            command: tailnode::args::Command::Run(run),
        }) => *run,
        Ok(other) => panic!("the chart's args are not `run`: {other:?}"),
        Err(e) => panic!("`tailnode` rejects the chart's args {args:?}: {e}"),
    }
}

fn mwc_rule(docs: &[Value]) -> Option<Value> {
    one(docs, "ClusterRole")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == json!(["mutatingwebhookconfigurations"]))
        .cloned()
}

#[test]
fn chart_renders_self_managed_and_cert_manager_variants() {
    let h = harness();
    // Self-managed certificates (the default).
    let docs = render(
        h,
        "tailnode-system",
        &[
            "--set",
            "credentials.kind=headscale",
            "--set",
            "credentials.headscaleURL=http://headscale.example:8080",
        ],
    );
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(mwc["metadata"]["name"], "tailnode");
    let hook = &mwc["webhooks"][0];
    assert_eq!(hook["clientConfig"]["service"]["name"], "tailnode-webhook");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE"]));
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["timeoutSeconds"], 5);
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0],
        json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["tailnode-system", "kube-system"]})
    );
    // Namespace-wide opt-in: unlabelled pods in namespaces labelled for a node, never the
    // excluded namespaces, never a pod that opts out.
    let ns_hook = &mwc["webhooks"][1];
    assert_eq!(ns_hook["name"], "namespace.inject.tailnode.dev");
    assert_eq!(ns_hook["clientConfig"], hook["clientConfig"]);
    assert_eq!(
        ns_hook["namespaceSelector"]["matchExpressions"],
        json!([{"key": "tailnode.dev/node", "operator": "Exists"},
               {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["tailnode-system", "kube-system"]}])
    );
    assert_eq!(
        ns_hook["objectSelector"]["matchExpressions"],
        json!([{"key": "tailnode.dev/node", "operator": "DoesNotExist"},
               {"key": "tailnode.dev/inject", "operator": "NotIn", "values": ["false"]}])
    );
    assert!(mwc["metadata"]["annotations"].is_null(), "no cert-manager annotation");
    let deployment = one(&docs, "Deployment");
    let run = parse_run_args(&container_args(deployment));
    assert_eq!(run.webhook_config, "tailnode");
    assert_eq!(run.webhook_service, "tailnode-webhook");
    assert_eq!(run.webhook_secret, "tailnode-webhook-tls");
    assert!(run.leader_elect);
    assert!(run.tls_cert_file.is_none());
    assert_eq!(run.log_format, tailnode::args::LogFormat::Json);
    assert_eq!(run.defaults.sidecar_image, tailnode::inject::DEFAULT_IMAGE);
    assert_eq!(run.default_credentials, Some(tailnode::args::CredentialKind::Headscale));
    assert_eq!(
        run.default_headscale_url.as_deref(),
        Some("http://headscale.example:8080")
    );
    assert_eq!(run.webhook_addr.port(), 8443);
    assert_eq!(run.admin_addr.port(), 8080);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let rule = mwc_rule(&docs).expect("self-managed certificates need the caBundle rule");
    assert_eq!(rule["resourceNames"], json!(["tailnode"]));
    assert_eq!(rule["verbs"], json!(["get", "patch"]));
    assert!(find(&docs, "Certificate").is_empty());

    // cert-manager.
    let docs = render(h, "tailnode-system", &["--set", "certManager.enabled=true"]);
    let cert = one(&docs, "Certificate");
    let issuer = one(&docs, "Issuer");
    assert_eq!(cert["spec"]["issuerRef"]["name"], issuer["metadata"]["name"]);
    let dns: Vec<&str> = cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(dns.contains(&"tailnode-webhook.tailnode-system.svc"), "{dns:?}");
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("tailnode-system/{}", cert["metadata"]["name"].as_str().unwrap())
    );
    let deployment = one(&docs, "Deployment");
    let run = parse_run_args(&container_args(deployment));
    let cert_file = run.tls_cert_file.expect("--tls-cert-file");
    let key_file = run.tls_key_file.expect("--tls-key-file");
    let pod = &deployment["spec"]["template"]["spec"];
    let mount = &pod["containers"][0]["volumeMounts"][0];
    let dir = mount["mountPath"].as_str().unwrap();
    assert!(cert_file.starts_with(dir) && key_file.starts_with(dir));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["secret"]["secretName"], cert["spec"]["secretName"]);
    assert!(
        mwc_rule(&docs).is_none(),
        "cert-manager: no access to webhook configurations"
    );

    // An existing issuer: no Issuer of ours; ServiceMonitor on request.
    let docs = render(
        h,
        "ops",
        &[
            "--set",
            "certManager.enabled=true",
            "--set",
            "certManager.issuerRef.name=corp-ca",
            "--set",
            "certManager.issuerRef.kind=ClusterIssuer",
            "--set",
            "serviceMonitor.enabled=true",
        ],
    );
    assert!(find(&docs, "Issuer").is_empty());
    assert_eq!(one(&docs, "Certificate")["spec"]["issuerRef"]["name"], "corp-ca");
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(find(&docs, "Service").len(), 2, "webhook and metrics Services");
}

/// `injector: policy`: the policy objects, no MutatingWebhookConfiguration, an operator without
/// its webhook that renders `status.injection`; `policy.renderStatus` alone only adds the flag.
#[test]
fn chart_renders_policy_mode() {
    let h = harness();
    let docs = render(h, "tailnode-system", &["--set", "injector=policy"]);
    assert!(find(&docs, "MutatingWebhookConfiguration").is_empty());
    let map = one(&docs, "MutatingAdmissionPolicy");
    assert_eq!(map["spec"]["paramKind"]["kind"], "TailscaleNode");
    assert_eq!(map["spec"]["mutations"].as_array().map(Vec::len), Some(3));
    let binding = one(&docs, "MutatingAdmissionPolicyBinding");
    assert_eq!(binding["spec"]["paramRef"]["parameterNotFoundAction"], "Allow");
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["tailnode-system", "kube-system"])
    );
    let refusals = find(&docs, "ValidatingAdmissionPolicy");
    assert!(refusals.iter().any(|p| p["metadata"]["name"] == "tailnode-inject"));
    let run = parse_run_args(&container_args(one(&docs, "Deployment")));
    assert!(!run.webhook && run.policy_injection && run.controller);

    let docs = render(h, "tailnode-system", &["--set", "policy.renderStatus=true"]);
    assert!(find(&docs, "MutatingAdmissionPolicy").is_empty());
    one(&docs, "MutatingWebhookConfiguration");
    let run = parse_run_args(&container_args(one(&docs, "Deployment")));
    assert!(run.webhook && run.policy_injection);
}

/// config/policy (kustomize) is the chart rendered with `injector: policy`: the same injection
/// policies and bindings, the same operator args, no MutatingWebhookConfiguration.
#[test]
fn kustomize_policy_mode_matches_the_chart() {
    let h = harness();
    let dir = repo_root().join("config/policy");
    let (ok, out, err) = h.run("kubectl", &["kustomize", path_str(&dir)], None);
    assert!(ok, "kubectl kustomize config/policy: {err}");
    let k = parse_docs(&out);
    let c = render(h, "tailnode-system", &["--set", "injector=policy"]);
    assert!(find(&k, "MutatingWebhookConfiguration").is_empty());
    let named = |docs: &[Value], kind: &str| {
        find(docs, kind)
            .into_iter()
            .find(|p| p["metadata"]["name"] == "tailnode-inject")
            .map(|p| p["spec"].clone())
    };
    for kind in [
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(
            named(&k, kind).is_some(),
            "{kind} tailnode-inject missing in config/policy"
        );
        assert_eq!(
            named(&k, kind),
            named(&c, kind),
            "{kind}: config/policy differs from the chart"
        );
    }
    assert_eq!(
        container_args(one(&k, "Deployment")),
        container_args(one(&c, "Deployment")),
        "operator args: config/policy differs from the chart"
    );
}

/// config/ (kustomize) is the chart rendered as release `tailnode` in `tailnode-system`, minus
/// Helm's labels: the same RBAC, webhook, flags and pod security.
#[test]
fn kustomize_matches_the_chart() {
    let h = harness();
    let dir = repo_root().join("config/default");
    let (ok, out, err) = h.run("kubectl", &["kustomize", path_str(&dir)], None);
    assert!(ok, "kubectl kustomize config/default: {err}");
    let k = parse_docs(&out);
    let c = render(h, "tailnode-system", &[]);
    let ns = one(&k, "Namespace");
    assert_eq!(ns["metadata"]["name"], "tailnode-system");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    assert_eq!(
        one(&k, "CustomResourceDefinition")["metadata"]["name"],
        "tailscalenodes.tailnode.dev"
    );
    let same = |kind: &str, pointer: &str| {
        let (a, b) = (one(&k, kind).pointer(pointer), one(&c, kind).pointer(pointer));
        assert!(a.is_some(), "{kind}{pointer} missing in config/");
        assert_eq!(a, b, "{kind}{pointer}: config/ differs from the chart");
    };
    same("ClusterRole", "/rules");
    same("ClusterRole", "/metadata/name");
    same("ClusterRoleBinding", "/subjects");
    same("Role", "/rules");
    same("RoleBinding", "/subjects");
    same("ServiceAccount", "/metadata/name");
    same("ServiceAccount", "/metadata/namespace");
    same("Service", "/spec");
    same("PodDisruptionBudget", "/spec");
    same("MutatingWebhookConfiguration", "/webhooks");
    same("MutatingWebhookConfiguration", "/metadata/name");
    // The admission policies, by name: the same rules.
    let policy = |docs: &[Value], name: &str| {
        find(docs, "ValidatingAdmissionPolicy")
            .into_iter()
            .find(|p| p["metadata"]["name"] == name)
            .map(|p| p["spec"].clone())
    };
    for name in [
        "tailnode-pod-updates",
        "tailnode-ephemeral-containers",
        "tailnode-pod-identity",
    ] {
        assert!(
            policy(&k, name).is_some(),
            "ValidatingAdmissionPolicy {name} missing in config/"
        );
        assert_eq!(
            policy(&k, name),
            policy(&c, name),
            "{name}: config/ differs from the chart"
        );
    }
    same("Deployment", "/spec/replicas");
    same("Deployment", "/spec/selector");
    for field in ["securityContext", "serviceAccountName", "affinity"] {
        same("Deployment", &format!("/spec/template/spec/{field}"));
    }
    for field in [
        "args",
        "env",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "resources",
        "securityContext",
        "image",
    ] {
        same("Deployment", &format!("/spec/template/spec/containers/0/{field}"));
    }
}

#[test]
fn chart_rejects_invalid_values() {
    let h = harness();
    let chart = chart_dir();
    for bad in [
        "credentials.kind=vault",
        "webhook.failurePolicy=Sometimes",
        "logFormat=xml",
        "injector=sidecar",
        "credentials.kind=headscale",
        "notAValue=1",
    ] {
        let (ok, _, err) = h.run("helm", &["template", "t", chart.as_str(), "--set", bad], None);
        assert!(!ok, "helm template --set {bad} should fail");
        assert!(err.contains("schema"), "--set {bad}: {err}");
    }
}
