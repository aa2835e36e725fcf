//! The cluster the scenarios run on: the local real node (`e2e/local/up`), or any cluster named
//! by the environment (`e2e/kind/run.sh`). Installs the operator with the chart as a user would,
//! and wraps the few things scenarios need: namespaces, kubectl, Headscale's API, a tailnet
//! member, and waiting for pods.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};

use crate::support;

/// How long a scenario waits for anything a real node does (start a pod, join, clean up).
pub const WAIT: Duration = Duration::from_secs(120);
/// Where the chart is installed.
pub const OPERATOR_NS: &str = "tailnode-system";
/// Namespaces of scenarios carry this label (the cleanup finds them by it).
pub const SCENARIO_LABEL: &str = "tailnode-e2e/scenario";

/// Everything a scenario needs to know about the cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// Headscale as the pods and the operator reach it (login server and API).
    pub headscale_in_cluster: String,
    /// Headscale as this process reaches it (API checks).
    pub headscale_url: String,
    pub headscale_api_key: String,
    pub headscale_user_id: String,
    pub app_image: String,
    pub sidecar_image: String,
    pub operator_image: String,
    /// The local real node's network discipline holds (`TAILNODE_E2E_ISOLATED`, default 1):
    /// pods have no default route and talk only to loopback and the harness bridge.
    pub isolated: bool,
    /// Prefixes every socket peer of an injected pod must fall in (besides loopback), when
    /// `isolated`.
    pub allowed_peers: Vec<String>,
    /// The cluster's pod and service CIDRs (`TAILNODE_E2E_CLUSTER_CIDRS`), for the chart's
    /// `clusterCIDRs`.
    pub cluster_cidrs: Vec<String>,
    /// The cluster DNS (`TAILNODE_E2E_CLUSTER_DNS`), for the chart's `clusterDNS`.
    pub cluster_dns: Vec<String>,
}

fn var(vars: &BTreeMap<String, String>, key: &str) -> String {
    std::env::var(key)
        .ok()
        .or_else(|| vars.get(key).cloned())
        .unwrap_or_else(|| panic!("{key} is not set (e2e/local/up exports it; e2e/kind/run.sh sets it)"))
}

impl Cluster {
    /// `TAILNODE_E2E_EXTERNAL=1`: the cluster in the environment; otherwise the local harness,
    /// started (or reused) by `e2e/local/up`.
    pub fn from_env() -> Cluster {
        let external = std::env::var("TAILNODE_E2E_EXTERNAL").is_ok_and(|v| v == "1");
        let (vars, tools) = if external {
            (BTreeMap::new(), None)
        } else {
            let h = support::harness();
            (h.vars.clone(), Some(h.tools_bin.clone()))
        };
        let tool = |name: &str| tools.as_ref().map_or_else(|| PathBuf::from(name), |t| t.join(name));
        Cluster {
            kubeconfig: PathBuf::from(var(&vars, "KUBECONFIG")),
            kubectl: tool("kubectl"),
            helm: tool("helm"),
            headscale_in_cluster: var(&vars, "TAILNODE_E2E_HEADSCALE_URL"),
            headscale_url: var(&vars, "TAILNODE_HEADSCALE_URL"),
            headscale_api_key: var(&vars, "TAILNODE_HEADSCALE_API_KEY"),
            headscale_user_id: var(&vars, "TAILNODE_HEADSCALE_USER_ID"),
            app_image: var(&vars, "TAILNODE_E2E_APP_IMAGE"),
            sidecar_image: var(&vars, "TAILNODE_E2E_SIDECAR_IMAGE"),
            operator_image: var(&vars, "TAILNODE_E2E_OPERATOR_IMAGE"),
            isolated: std::env::var("TAILNODE_E2E_ISOLATED").map_or(true, |v| v != "0"),
            allowed_peers: std::env::var("TAILNODE_E2E_ALLOWED_PEERS")
                .unwrap_or_else(|_| "198.18.0.".into())
                .split(',')
                .map(str::to_string)
                .collect(),
            cluster_cidrs: std::env::var("TAILNODE_E2E_CLUSTER_CIDRS")
                .ok()
                .or_else(|| vars.get("TAILNODE_E2E_CLUSTER_CIDRS").cloned())
                .unwrap_or_default()
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
            cluster_dns: std::env::var("TAILNODE_E2E_CLUSTER_DNS")
                .ok()
                .or_else(|| vars.get("TAILNODE_E2E_CLUSTER_DNS").cloned())
                .unwrap_or_default()
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }

    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig is valid");
        Client::try_from(cfg).expect("client")
    }

    /// Runs kubectl (or helm) with this cluster's kubeconfig: (success, stdout, stderr).
    pub fn run(&self, tool: &PathBuf, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(tool)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        self.run(&self.kubectl, args)
    }

    /// `kubectl exec -n NS POD -c CONTAINER -- CMD...`.
    pub fn exec(&self, ns: &str, pod: &str, container: &str, cmd: &[&str]) -> (bool, String, String) {
        let mut args = vec!["exec", "-n", ns, pod, "-c", container, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
    }

    /// Retries `exec` until it succeeds with stdout containing `want`, at most `WAIT`.
    pub async fn exec_until(&self, ns: &str, pod: &str, container: &str, cmd: &[&str], want: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let (ok, out, err) = self.exec(ns, pod, container, cmd);
            if ok && out.contains(want) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "{pod}/{container}: {cmd:?} never printed {want:?}: ok={ok}\n{out}\n{err}"
            );
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }

    /// Headscale's API as this process reaches it.
    pub fn headscale(&self) -> support::HeadscaleApi {
        support::HeadscaleApi {
            url: self.headscale_url.clone(),
            api_key: self.headscale_api_key.clone(),
            user_id: self.headscale_user_id.clone(),
        }
    }

    /// Headscale's nodes.
    pub async fn headscale_nodes(&self) -> Vec<Value> {
        self.headscale().nodes().await
    }

    /// Every pre-auth key Headscale issued (the key itself shown only by its public prefix).
    pub async fn headscale_preauth_keys(&self) -> Vec<Value> {
        self.headscale().preauth_keys().await
    }

    pub async fn headscale_node(&self, id: &str) -> Option<Value> {
        self.headscale_nodes()
            .await
            .into_iter()
            .find(|n| n["id"].as_str() == Some(id))
    }

    /// A single-use, ephemeral pre-auth key for a tailnet member, tagged `tag:test`.
    pub async fn member_key(&self) -> String {
        self.headscale().preauth_key(&["tag:test"], true).await
    }
}

/// A scenario's own namespace, labelled so that the cleanup finds it; derefs to the shared
/// [`support::TestNamespace`] (`api`, `create`, `node_condition`).
pub struct Ns {
    inner: support::TestNamespace,
    cluster: Cluster,
}

impl std::ops::Deref for Ns {
    type Target = support::TestNamespace;
    fn deref(&self) -> &support::TestNamespace {
        &self.inner
    }
}

impl Ns {
    pub async fn new(c: &Cluster, prefix: &str, mut labels: Value) -> Ns {
        labels[SCENARIO_LABEL] = json!("true");
        let inner = support::TestNamespace::new(&c.client().await, prefix, labels).await;
        Ns {
            inner,
            cluster: c.clone(),
        }
    }

    /// The one live pod labelled `app=APP`.
    pub async fn pod(&self, app: &str) -> Pod {
        let lp = ListParams::default().labels(&format!("app={app}"));
        support::eventually(WAIT, || async {
            self.api::<Pod>()
                .list(&lp)
                .await
                .ok()?
                .items
                .into_iter()
                .find(|p| p.metadata.deletion_timestamp.is_none())
        })
        .await
        .unwrap_or_else(|| panic!("no pod for app={app} in {}", self.name))
    }

    /// Waits until pod `name` satisfies `pred`; panics with its status otherwise.
    pub async fn pod_where(&self, name: &str, what: &str, pred: impl Fn(&Pod) -> bool) -> Pod {
        let api = self.api::<Pod>();
        let found = support::eventually(WAIT, || async { api.get_opt(name).await.ok()?.filter(|p| pred(p)) }).await;
        match found {
            Some(p) => p,
            None => {
                let now = api.get_opt(name).await.ok().flatten();
                let logs = |extra: &str| {
                    let args = ["logs", "-n", &self.name, name, "-c", "tailscale", "--tail=25", extra];
                    let (_, out, err) = self.cluster.kubectl(&args);
                    format!("{out}{err}")
                };
                panic!(
                    "pod {}/{name} never became {what}; status: {}\n--- sidecar log (previous):\n{}\n--- sidecar log:\n{}",
                    self.name,
                    serde_json::to_string(&now.and_then(|p| p.status)).unwrap_or_default(),
                    logs("--previous"),
                    logs("--timestamps"),
                )
            }
        }
    }

    pub async fn ready_pod(&self, app: &str) -> Pod {
        let name = self.pod(app).await.name_any();
        self.pod_where(&name, "Ready", is_ready).await
    }

    pub async fn secret_where(&self, name: &str, pred: impl Fn(&Secret) -> bool) -> Secret {
        let api = self.api::<Secret>();
        support::eventually(WAIT, || async {
            api.get_opt(name).await.ok().flatten().filter(|s| pred(s))
        })
        .await
        .unwrap_or_else(|| panic!("Secret {}/{name} never reached the expected state", self.name))
    }

    /// Deletes the namespace, unless `TAILNODE_E2E_KEEP=1` asks to keep everything for a look.
    pub async fn delete(self) {
        if keep() {
            return;
        }
        self.inner.cleanup().await;
    }
}

/// `TAILNODE_E2E_KEEP=1`: leave the scenarios' namespaces and the operator in place.
pub fn keep() -> bool {
    std::env::var("TAILNODE_E2E_KEEP").is_ok_and(|v| v == "1")
}

pub use support::{data, is_ready};

/// The tailnet IPs containerboot wrote into a state Secret.
pub fn ips(s: &Secret) -> Vec<String> {
    serde_json::from_str(&data(s, "device_ips").unwrap_or_default()).unwrap_or_default()
}

/// The restart count of the `tailscale` sidecar (native: an init container).
pub fn sidecar_restarts(p: &Pod) -> i32 {
    let st = p.status.as_ref();
    st.and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .chain(st.and_then(|s| s.container_statuses.as_ref()))
        .flatten()
        .find(|c| c.name == "tailscale")
        .map_or(0, |c| c.restart_count)
}
