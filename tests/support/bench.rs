//! What the harness benchmarks share: an operator identity the apiserver audits, the operator's
//! memory from /proc, and its requests counted from the apiserver's audit log.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::Harness;

/// The namespace of the benchmarks' operator identities; `e2e/local/up`'s audit policy records
/// every request of its ServiceAccounts `operator` and `official`.
pub const BENCH_NS: &str = "tailnode-bench";

/// The apiserver's user name for the bench ServiceAccount `account`.
pub fn user(account: &str) -> String {
    format!("system:serviceaccount:{BENCH_NS}:{account}")
}

/// ServiceAccount `account` in [`BENCH_NS`] (cluster-admin) and a kubeconfig with a token for
/// it, written to the harness folder.
pub async fn identity(h: &Harness, client: &Client, account: &str) -> PathBuf {
    let pp = PatchParams::apply("tailnode-bench").force();
    let ns: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": BENCH_NS}}))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .patch(BENCH_NS, &pp, &Patch::Apply(&ns))
        .await
        .unwrap();
    let sa: ServiceAccount = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": account, "namespace": BENCH_NS}}))
    .unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), BENCH_NS);
    sas.patch(account, &pp, &Patch::Apply(&sa)).await.unwrap();
    let name = format!("tailnode-bench-{account}");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": BENCH_NS}]}))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(&name, &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 7200}})).unwrap();
    let token = sas
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .expect("a token for the bench's ServiceAccount");
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(h.ca_pem());
    let path = h.dir.join(format!("bench-{account}.kubeconfig"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: harness\n  cluster:\n    server: {}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {account}\n  user:\n    token: {token}\n\
         contexts:\n- name: bench\n  context: {{cluster: harness, user: {account}}}\ncurrent-context: bench\n",
        h.apiserver_url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// (VmRSS, VmHWM) of a pid in MiB (zeros once it is gone).
pub fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Every request of `user` received in `[since, until)` in the apiserver's audit log (with its
/// rotated backup): (count, "verb resource" groups, largest first).
pub fn audited(
    h: &Harness,
    user: &str,
    since: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
) -> (usize, Vec<(String, usize)>) {
    let mut ids = HashSet::new();
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for entry in std::fs::read_dir(h.dir.join("logs")).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("audit") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(user)) {
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if e["user"]["username"] != user {
                continue;
            }
            let at = e["requestReceivedTimestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            if at.is_none_or(|t| t < since || t >= until) {
                continue;
            }
            if ids.insert(e["auditID"].as_str().unwrap_or_default().to_string()) {
                let resource = e["objectRef"]["resource"].as_str().unwrap_or("-");
                let sub = e["objectRef"]["subresource"].as_str().map(|s| format!("/{s}"));
                let key = format!(
                    "{} {resource}{}",
                    e["verb"].as_str().unwrap_or("?"),
                    sub.unwrap_or_default()
                );
                *groups.entry(key).or_default() += 1;
            }
        }
    }
    let mut top: Vec<(String, usize)> = groups.into_iter().collect();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    (ids.len(), top)
}
