//! Test support for the local harness (real etcd + kube-apiserver + Headscale). Starts it with
//! `e2e/local/up` (or reuses the one named by `TAILNODE_HARNESS_DIR`), gives each test its own
//! namespace, and fails loudly, with the reason, when the harness cannot start.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use tailnode::api::TailscaleNode;

/// What `e2e/local/up` exported.
#[derive(Debug, Clone)]
pub struct Harness {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub tools_bin: PathBuf,
    pub headscale_url: String,
    pub headscale_api_key: String,
    pub headscale_user_id: String,
    pub vars: BTreeMap<String, String>,
}

static HARNESS: OnceLock<Result<Harness, String>> = OnceLock::new();

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Parses `export KEY=VALUE` lines (values optionally single- or double-quoted).
pub fn parse_exports(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("export ") else {
            continue;
        };
        let Some((k, v)) = rest.split_once('=') else { continue };
        let v = v.trim();
        let v = v
            .strip_prefix('\'')
            .and_then(|x| x.strip_suffix('\''))
            .or_else(|| v.strip_prefix('"').and_then(|x| x.strip_suffix('"')))
            .unwrap_or(v);
        vars.insert(k.to_string(), v.to_string());
    }
    vars
}

fn start() -> Result<Harness, String> {
    let env_file = std::env::var_os("TAILNODE_HARNESS_DIR").map(|d| PathBuf::from(d).join("env"));
    let text = match env_file.filter(|f| f.exists()) {
        Some(f) => std::fs::read_to_string(&f).map_err(|e| format!("reading {}: {e}", f.display()))?,
        None => {
            let out = Command::new("bash")
                .arg(repo_root().join("e2e/local/up"))
                .output()
                .map_err(|e| format!("running e2e/local/up: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "e2e/local/up failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let vars = parse_exports(&text);
    let get = |k: &str| {
        vars.get(k)
            .cloned()
            .ok_or_else(|| format!("e2e/local/up did not export {k}"))
    };
    let path = get("PATH")?;
    let tools_bin = PathBuf::from(path.split(':').next().unwrap_or_default());
    Ok(Harness {
        dir: PathBuf::from(get("TAILNODE_HARNESS_DIR")?),
        kubeconfig: PathBuf::from(get("KUBECONFIG")?),
        tools_bin,
        headscale_url: get("TAILNODE_HEADSCALE_URL")?,
        headscale_api_key: get("TAILNODE_HEADSCALE_API_KEY")?,
        headscale_user_id: get("TAILNODE_HEADSCALE_USER_ID")?,
        vars,
    })
}

/// The running harness; panics with the reason when it cannot start.
pub fn harness() -> &'static Harness {
    tailnode::install_crypto_provider();
    match HARNESS.get_or_init(start) {
        Ok(h) => h,
        Err(reason) => panic!("the local harness is required for this test and could not start: {reason}"),
    }
}

impl Harness {
    /// A client for this test's runtime (clients must not outlive the runtime they were made in).
    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("harness kubeconfig");
        let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("harness kubeconfig is valid");
        Client::try_from(cfg).expect("client")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("pki/ca.crt")).expect("harness CA")
    }

    pub fn apiserver_url(&self) -> String {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("harness kubeconfig");
        kc.clusters[0]
            .cluster
            .as_ref()
            .and_then(|c| c.server.clone())
            .expect("server url")
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        self.tools_bin.join(name)
    }

    /// Runs a tool from the harness with the harness environment; returns (status ok, stdout, stderr).
    pub fn run(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use std::io::Write;
        let mut cmd = Command::new(self.tool(tool));
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {tool}: {e}"));
        if let Some(mut s) = child.stdin.take() {
            s.write_all(stdin.unwrap_or_default().as_bytes()).expect("stdin");
        }
        let out = child.wait_with_output().expect("wait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Harness {
    /// Headscale's API as this process reaches it.
    pub fn headscale(&self) -> HeadscaleApi {
        HeadscaleApi {
            url: self.headscale_url.clone(),
            api_key: self.headscale_api_key.clone(),
            user_id: self.headscale_user_id.clone(),
        }
    }

    /// `GET` on Headscale's API (e.g. `/api/v1/node`), as JSON.
    pub async fn headscale_get(&self, path: &str) -> Value {
        self.headscale().get(path).await
    }
}

/// Headscale's HTTP API (the harness's, or the one an e2e cluster names), for checks.
#[derive(Debug, Clone)]
pub struct HeadscaleApi {
    pub url: String,
    pub api_key: String,
    pub user_id: String,
}

impl HeadscaleApi {
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client")
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.api_key)
    }

    async fn json(req: reqwest::RequestBuilder) -> Value {
        req.send()
            .await
            .expect("headscale answers")
            .json()
            .await
            .expect("headscale JSON")
    }

    /// `GET` on the API (e.g. `/api/v1/node`), as JSON.
    pub async fn get(&self, path: &str) -> Value {
        Self::json(self.request(reqwest::Method::GET, path)).await
    }

    /// The list `field` of a `GET` on the API.
    pub async fn list(&self, path: &str, field: &str) -> Vec<Value> {
        self.get(path).await[field].as_array().cloned().unwrap_or_default()
    }

    /// Headscale's nodes.
    pub async fn nodes(&self) -> Vec<Value> {
        self.list("/api/v1/node", "nodes").await
    }

    /// Every pre-auth key Headscale issued (the key itself shown only by its public prefix).
    pub async fn preauth_keys(&self) -> Vec<Value> {
        self.list("/api/v1/preauthkey", "preAuthKeys").await
    }

    /// A single-use pre-auth key for the user, tagged `tags`, valid 30 minutes.
    pub async fn preauth_key(&self, tags: &[&str], ephemeral: bool) -> String {
        let expiration = (chrono::Utc::now() + chrono::Duration::minutes(30)).to_rfc3339();
        let body = json!({"user": self.user_id, "reusable": false, "ephemeral": ephemeral,
            "expiration": expiration, "aclTags": tags});
        let v = Self::json(self.request(reqwest::Method::POST, "/api/v1/preauthkey").json(&body)).await;
        v["preAuthKey"]["key"].as_str().expect("a key").to_string()
    }
}

/// A unique, DNS-safe name with a prefix.
pub fn unique(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
        % 1_000_000;
    format!("{prefix}-{}-{t}-{n}", std::process::id() % 10_000)
}

/// A namespace of a test's own, with the `default` ServiceAccount that a controller-manager would
/// have made. Call [`TestNamespace::cleanup`] at the end of the test.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str, labels: serde_json::Value) -> Self {
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels}
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa");
        // A controller-manager may have made it already.
        match Api::<ServiceAccount>::namespaced(client.clone(), &name)
            .create(&PostParams::default(), &sa)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create default service account: {e}"),
        }
        TestNamespace {
            name,
            client: client.clone(),
        }
    }

    /// A handle on a namespace that exists already (another task's).
    pub fn existing(client: &Client, name: &str) -> Self {
        TestNamespace {
            name: name.to_string(),
            client: client.clone(),
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Creates any namespaced object from JSON.
    pub async fn create<K>(&self, value: Value) -> K
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let obj: K = serde_json::from_value(value).expect("object");
        self.api::<K>()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create in {}: {e}", self.name))
    }

    /// The condition `type_` of TailscaleNode `node`, as JSON.
    pub async fn node_condition(&self, node: &str, type_: &str) -> Option<Value> {
        let n = self.api::<TailscaleNode>().get(node).await.ok()?;
        let st = serde_json::to_value(n.status?).ok()?;
        st["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    /// Deletes TailscaleNode `name` and waits (up to a minute) until its finalizer let it go;
    /// false if it is still there.
    pub async fn delete_node(&self, name: &str) -> bool {
        let api = self.api::<TailscaleNode>();
        let _ = api.delete(name, &DeleteParams::default()).await;
        let gone = eventually(Duration::from_secs(60), || async {
            api.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
        gone.is_some()
    }

    /// Deletes the namespace (without a controller-manager it stays Terminating; `down` wipes it).
    pub async fn cleanup(self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// Polls `f` until it returns `Some`, at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies the committed CRD and waits until it is Established.
pub async fn install_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let text = std::fs::read_to_string(repo_root().join("crds/tailscalenode.yaml")).expect("crd file");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("crd yaml");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let name = crd.metadata.name.clone().expect("crd name");
    api.patch(
        &name,
        &PatchParams::apply("tailnode-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    let established = eventually(Duration::from_secs(30), || async {
        let c = api.get(&name).await.ok()?;
        let ok = c
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        ok.then_some(())
    })
    .await;
    assert!(established.is_some(), "CRD {name} never became Established");
    // Discovery catches up shortly after Established.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// A value of a Secret's data, as text.
pub fn data(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

/// The pod carries the `tailscale` sidecar (native or not).
pub fn has_sidecar(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|spec| {
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .any(|c| c.name == "tailscale")
    })
}

/// The pod's Ready condition is True.
pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
pub mod bench;
pub mod operator;
