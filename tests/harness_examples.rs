//! The shipped examples (examples/) and the kind end-to-end files (e2e/kind/) against the real
//! kube-apiserver of the local harness: every manifest applies with a server-side dry run (CRD
//! schema and CEL rules, built-in validation, PodSecurity warnings), `tailnode inject` turns every
//! example workload into an injected one that the apiserver accepts too, and the kind run's Helm
//! values render the chart into objects the apiserver accepts.
//!
//! Each file runs in namespaces of its own: the files' namespaces are renamed to unique ones (in
//! the parsed documents, never by text), created for real, and deleted at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use serde_yaml::Value;
use support::*;

/// Every example directory; each must have a README.md and at least one manifest.
const EXAMPLES: [&str; 7] = [
    "deployment-stable-slots",
    "job-native-sidecar",
    "magicdns",
    "statefulset-stable-hostnames",
    "tun-exit-node",
    "tun-subnet-router",
    "web-serve",
];

/// YAML files under e2e/kind that are not Kubernetes manifests, and how they are checked instead.
const KIND_NOT_MANIFESTS: [(&str, &str); 2] = [
    (
        "kind-config.yaml",
        "kind's own cluster config (kind.x-k8s.io/v1alpha4 Cluster), read by `kind create cluster`; checked for shape",
    ),
    (
        "values.yaml",
        "Helm values for charts/tailnode; the chart is rendered with them (helm template) and the result dry-run",
    ),
];

const WORKLOAD_KINDS: [&str; 6] = ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"];

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn documents(text: &str, what: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn read_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    documents(&text, &path.display().to_string())
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

fn kind_of(doc: &Value) -> &str {
    str_at(doc, &["kind"]).unwrap_or_default()
}

fn describe(doc: &Value) -> String {
    format!(
        "{} {}",
        kind_of(doc),
        str_at(doc, &["metadata", "name"]).unwrap_or_default()
    )
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo_root()).unwrap_or(p).display().to_string()
}

/// Namespaces created for real for one set of files, renamed to unique names; deleted on drop.
struct Namespaces {
    h: &'static Harness,
    map: BTreeMap<String, String>,
}

impl Namespaces {
    /// Creates every namespace the documents define (Namespace documents, applied for real after
    /// renaming) or use (`metadata.namespace`, created with `kubectl create namespace`), each
    /// with its `default` ServiceAccount.
    async fn create(h: &'static Harness, docs: &[Value]) -> Self {
        let defined: BTreeSet<String> = docs
            .iter()
            .filter(|d| kind_of(d) == "Namespace")
            .filter_map(|d| str_at(d, &["metadata", "name"]).map(str::to_string))
            .collect();
        let used: BTreeSet<String> = docs
            .iter()
            .filter_map(|d| str_at(d, &["metadata", "namespace"]).map(str::to_string))
            .collect();
        let map = defined
            .union(&used)
            .map(|ns| (ns.clone(), unique("ex")))
            .collect::<BTreeMap<_, _>>();
        let ns = Namespaces { h, map };
        let namespace_docs: Vec<Value> = docs.iter().filter(|d| kind_of(d) == "Namespace").cloned().collect();
        if !namespace_docs.is_empty() {
            let text = ns.rename(&namespace_docs);
            let (ok, _, stderr) = h.run("kubectl", &["apply", "-f", "-"], Some(&text));
            assert!(ok, "creating the Namespaces for real failed:\n{stderr}\n{text}");
        }
        for original in used.difference(&defined) {
            let (ok, _, stderr) = h.run("kubectl", &["create", "namespace", &ns.map[original]], None);
            assert!(ok, "kubectl create namespace failed: {stderr}");
        }
        // A Pod is refused until its ServiceAccount exists; a controller-manager may be faster.
        let client = h.client().await;
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        for name in ns.map.values() {
            match Api::<ServiceAccount>::namespaced(client.clone(), name)
                .create(&PostParams::default(), &sa)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => panic!("create the default ServiceAccount in {name}: {e}"),
            }
        }
        ns
    }

    /// The documents as one YAML stream, with every namespace renamed.
    fn rename(&self, docs: &[Value]) -> String {
        docs.iter()
            .map(|d| {
                let mut d = d.clone();
                let key = if kind_of(&d) == "Namespace" {
                    "name"
                } else {
                    "namespace"
                };
                if let Some(meta) = d.get_mut("metadata").and_then(Value::as_mapping_mut) {
                    let renamed = meta
                        .get(key)
                        .and_then(Value::as_str)
                        .and_then(|old| self.map.get(old))
                        .cloned();
                    if let Some(new) = renamed {
                        meta.insert(key.into(), new.into());
                    }
                }
                serde_yaml::to_string(&d).unwrap()
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let mut args = vec!["delete", "namespace", "--wait=false", "--ignore-not-found"];
        args.extend(self.map.values().map(String::as_str));
        let _ = self.h.run("kubectl", &args, None);
    }
}

/// `kubectl apply --dry-run=server` of `docs` (namespaces renamed): every object is accepted, and
/// no pod template would violate the PodSecurity level its namespace warns about.
fn dry_run(h: &Harness, ns: &Namespaces, docs: &[Value], what: &str) {
    let text = ns.rename(docs);
    let (ok, stdout, stderr) = h.run("kubectl", &["apply", "--dry-run=server", "-f", "-"], Some(&text));
    assert!(
        ok,
        "{what}: the apiserver refused it (server-side dry run):\n{stderr}\n--- as sent:\n{text}"
    );
    let accepted = stdout.lines().filter(|l| l.ends_with("(server dry run)")).count();
    assert_eq!(
        accepted,
        docs.len(),
        "{what}: expected one accepted object per document:\n{stdout}"
    );
    assert!(
        !stderr.contains("would violate PodSecurity"),
        "{what}: PodSecurity warnings:\n{stderr}"
    );
    if !stderr.trim().is_empty() {
        eprintln!("{what}: kubectl said:\n{stderr}");
    }
}

fn example_dirs() -> Vec<PathBuf> {
    let root = repo_root().join("examples");
    let mut found: Vec<String> = std::fs::read_dir(&root)
        .expect("examples/")
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, EXAMPLES, "examples/ holds exactly the listed examples");
    EXAMPLES.iter().map(|e| root.join(e)).collect()
}

#[tokio::test]
async fn every_example_applies_with_a_server_side_dry_run() {
    let h = harness();
    install_crd(&h.client().await).await;
    let mut seen_namespaces: BTreeMap<String, String> = BTreeMap::new();
    for dir in example_dirs() {
        let example = dir.file_name().unwrap().to_string_lossy().into_owned();
        let readme = std::fs::read_to_string(dir.join("README.md"))
            .unwrap_or_else(|_| panic!("examples/{example} has no README.md"));
        let lines = readme.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(
            (2..=6).contains(&lines),
            "examples/{example}/README.md: 2-6 lines, has {lines}"
        );
        let files = yaml_files(&dir);
        assert!(!files.is_empty(), "examples/{example} has no manifests");
        let docs: Vec<Value> = files.iter().flat_map(|f| read_docs(f)).collect();

        // Self-contained: every object names its namespace, the example creates it, and no
        // other example uses it.
        let defined: BTreeSet<&str> = docs
            .iter()
            .filter(|d| kind_of(d) == "Namespace")
            .filter_map(|d| str_at(d, &["metadata", "name"]))
            .collect();
        assert!(!defined.is_empty(), "examples/{example} creates no Namespace");
        for d in docs.iter().filter(|d| kind_of(d) != "Namespace") {
            let ns = str_at(d, &["metadata", "namespace"])
                .unwrap_or_else(|| panic!("examples/{example}: {} names no namespace", describe(d)));
            assert!(
                defined.contains(ns),
                "examples/{example}: {} uses namespace {ns}, which the example does not create",
                describe(d)
            );
        }
        for ns in &defined {
            if let Some(other) = seen_namespaces.insert(ns.to_string(), example.clone()) {
                panic!("namespace {ns} is used by both examples/{other} and examples/{example}");
            }
        }

        let ns = Namespaces::create(h, &docs).await;
        for file in &files {
            dry_run(h, &ns, &read_docs(file), &rel(file));
        }
    }
}

fn inject(file: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tailnode"))
        // MagicDNS (examples/magicdns) needs the cluster DNS and the resolver's image.
        .args([
            "inject",
            "--cluster-dns=10.96.0.10",
            "--dns-proxy-image=tailnode/tailnode:0.1.0",
            "-f",
            path_str(file),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tailnode inject -f {} failed:\n{}",
        rel(file),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pod_spec(workload: &Value) -> &Value {
    let template = if kind_of(workload) == "CronJob" {
        &workload["spec"]["jobTemplate"]["spec"]["template"]
    } else {
        &workload["spec"]["template"]
    };
    &template["spec"]
}

fn containers<'a>(spec: &'a Value, field: &str) -> impl Iterator<Item = &'a Value> {
    spec.get(field).and_then(Value::as_sequence).into_iter().flatten()
}

/// The sidecar's environment as name -> value (valueFrom entries as "").
fn env_of(container: &Value) -> BTreeMap<String, String> {
    containers(container, "env")
        .map(|e| {
            (
                str_at(e, &["name"]).unwrap().to_string(),
                str_at(e, &["value"]).unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// What each example's injected pod must show.
fn check_example(file: &str, workload: &Value, sidecar: &Value, native: bool) {
    let env = env_of(sidecar);
    let spec = pod_spec(workload);
    let what = format!("{file}: {}", describe(workload));
    match file {
        "examples/web-serve/web.yaml" => {
            assert_eq!(env["TS_USERSPACE"], "true", "{what}");
            assert!(env.contains_key("TS_SERVE_CONFIG"), "{what}: no serve config");
            let volumes = serde_yaml::to_string(&spec["volumes"]).unwrap();
            assert!(volumes.contains("tsn-web-serve"), "{what}: serve ConfigMap not mounted");
        }
        "examples/tun-subnet-router/router.yaml" => {
            assert_eq!(env["TS_USERSPACE"], "false", "{what}");
            assert_eq!(env["TS_ROUTES"], "10.96.0.0/12,10.244.0.0/16", "{what}");
            assert!(
                !env.get("TS_EXTRA_ARGS").is_some_and(|a| a.contains("--accept-routes")),
                "{what}"
            );
            // Forwarding comes from a privileged init container that runs first; the sidecar
            // itself is not privileged.
            assert!(sidecar["securityContext"]["privileged"].is_null(), "{what}");
            let first = containers(spec, "initContainers").next().unwrap();
            assert_eq!(str_at(first, &["name"]), Some("tailscale-forwarding"), "{what}");
            assert_eq!(first["securityContext"]["privileged"], Value::Bool(true), "{what}");
            let volumes = serde_yaml::to_string(&spec["volumes"]).unwrap();
            assert!(volumes.contains("/dev/net/tun"), "{what}: no /dev/net/tun");
        }
        "examples/job-native-sidecar/job.yaml" => {
            assert!(native, "{what}: the sidecar must be a native sidecar");
            let first = containers(spec, "initContainers").next().unwrap();
            assert_eq!(str_at(first, &["name"]), Some("tailscale"), "{what}: sidecar first");
            assert_eq!(str_at(first, &["restartPolicy"]), Some("Always"), "{what}");
            assert_eq!(env["TS_SOCKS5_SERVER"], "localhost:1055", "{what}");
            let app = containers(spec, "containers").next().unwrap();
            assert_eq!(env_of(app)["ALL_PROXY"], "socks5h://127.0.0.1:1055", "{what}");
        }
        "examples/deployment-stable-slots/web.yaml" => {
            // Slots are handed out at admission (the webhook gates the pod, the controller
            // claims the slot): a template injected ahead of admission keeps per-pod identity.
            assert_eq!(env["TS_HOSTNAME"], "web-$(POD_NAME)", "{what}");
            assert_eq!(env["TS_KUBE_SECRET"], "ts-$(POD_NAME)", "{what}");
            assert!(!env.contains_key("TS_SLOT"), "{what}: {env:?}");
        }
        "examples/statefulset-stable-hostnames/db.yaml" => {
            assert_eq!(env["TS_HOSTNAME"], "db-$(TS_POD_INDEX)", "{what}");
            assert!(
                env["TS_EXTRA_ARGS"].contains("--login-server=https://headscale.example.com"),
                "{what}: {env:?}"
            );
        }
        "examples/tun-exit-node/egress.yaml" => {
            assert_eq!(env["TS_USERSPACE"], "false", "{what}");
            assert!(
                env["TS_EXTRA_ARGS"].contains("--exit-node=100.64.0.5"),
                "{what}: {env:?}"
            );
            // Cluster traffic stays off the exit node: NET_ADMIN rules, no privilege, first.
            let first = containers(spec, "initContainers").next().unwrap();
            assert_eq!(str_at(first, &["name"]), Some("tailscale-local-routes"), "{what}");
            assert!(first["securityContext"]["privileged"].is_null(), "{what}");
            assert_eq!(
                first["securityContext"]["capabilities"]["add"][0], "NET_ADMIN",
                "{what}"
            );
        }
        "examples/magicdns/app.yaml" => {
            assert_eq!(env["TS_USERSPACE"], "true", "{what}");
            assert_eq!(str_at(spec, &["dnsPolicy"]), Some("None"), "{what}");
            assert_eq!(spec["dnsConfig"]["nameservers"][0], "127.0.0.1", "{what}");
            assert_eq!(
                spec["dnsConfig"]["searches"][0], "tailnode-example-magicdns.svc.cluster.local",
                "{what}"
            );
            // The resolver first (tailscaled resolves through it), from tailnode's image, as
            // non-root as the userspace sidecar.
            let first = containers(spec, "initContainers").next().unwrap();
            assert_eq!(str_at(first, &["name"]), Some("tailscale-dns"), "{what}");
            assert_eq!(str_at(first, &["image"]), Some("tailnode/tailnode:0.1.0"), "{what}");
            assert_eq!(first["securityContext"]["runAsNonRoot"], Value::Bool(true), "{what}");
            assert_eq!(
                spec["securityContext"]["sysctls"][0]["name"], "net.ipv4.ip_unprivileged_port_start",
                "{what}"
            );
            let app = containers(spec, "containers").next().unwrap();
            assert_eq!(env_of(app)["HTTP_PROXY"], "http://127.0.0.1:1056", "{what}");
        }
        other => panic!("{other}: no expectations written for this example; add them here"),
    }
}

#[tokio::test]
async fn tailnode_inject_output_of_every_example_is_accepted() {
    let h = harness();
    install_crd(&h.client().await).await;
    let mut checked = BTreeSet::new();
    for dir in example_dirs() {
        for file in yaml_files(&dir) {
            let name = rel(&file);
            // Every file goes through inject: it also checks the TailscaleNodes' CEL rules.
            let out = inject(&file);
            let docs = documents(&out, &format!("tailnode inject -f {name}"));
            assert_eq!(
                docs.len(),
                read_docs(&file).len(),
                "{name}: inject keeps every document"
            );
            let workloads: Vec<&Value> = docs.iter().filter(|d| WORKLOAD_KINDS.contains(&kind_of(d))).collect();
            if workloads.is_empty() {
                assert_eq!(docs, read_docs(&file), "{name}: no workload, so inject changes nothing");
            }
            for w in &workloads {
                let spec = pod_spec(w);
                let in_init = containers(spec, "initContainers").find(|c| str_at(c, &["name"]) == Some("tailscale"));
                let in_main = containers(spec, "containers").find(|c| str_at(c, &["name"]) == Some("tailscale"));
                let sidecar = in_init
                    .or(in_main)
                    .unwrap_or_else(|| panic!("{name}: {} has no injected sidecar:\n{out}", describe(w)));
                assert!(
                    str_at(sidecar, &["image"]).is_some_and(|i| i.starts_with("tailscale/tailscale:")),
                    "{name}: sidecar image"
                );
                let template_meta = if kind_of(w) == "CronJob" {
                    &w["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
                } else {
                    &w["spec"]["template"]["metadata"]
                };
                assert!(
                    str_at(template_meta, &["annotations", "tailnode.dev/injected"]).is_some(),
                    "{name}: {} lacks the injected annotation",
                    describe(w)
                );
                check_example(&name, w, sidecar, in_init.is_some());
                checked.insert(name.clone());
            }
            let ns = Namespaces::create(h, &docs).await;
            dry_run(h, &ns, &docs, &format!("tailnode inject -f {name}"));
        }
    }
    assert_eq!(
        checked.len(),
        EXAMPLES.len(),
        "one workload file per example: {checked:?}"
    );
}

#[tokio::test]
async fn every_e2e_kind_manifest_applies_with_a_server_side_dry_run() {
    let h = harness();
    install_crd(&h.client().await).await;
    let dir = repo_root().join("e2e/kind");
    let run_sh = std::fs::read_to_string(dir.join("run.sh")).expect("e2e/kind/run.sh");
    let skipped: BTreeMap<&str, &str> = KIND_NOT_MANIFESTS.into_iter().collect();
    let mut manifests = Vec::new();
    for file in yaml_files(&dir) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(run_sh.contains(&name), "e2e/kind/run.sh never uses {name}");
        match skipped.get(name.as_str()) {
            Some(why) => eprintln!("e2e/kind/{name}: not a Kubernetes manifest, skipped: {why}"),
            None => manifests.push(file),
        }
    }
    assert!(!manifests.is_empty(), "e2e/kind manifests: {manifests:?}");

    let kind_config = &read_docs(&dir.join("kind-config.yaml"))[0];
    assert_eq!(str_at(kind_config, &["apiVersion"]), Some("kind.x-k8s.io/v1alpha4"));
    assert_eq!(kind_of(kind_config), "Cluster");
    assert!(kind_config["nodes"].as_sequence().is_some_and(|n| !n.is_empty()));

    let all: Vec<Value> = manifests.iter().flat_map(|f| read_docs(f)).collect();
    let ns = Namespaces::create(h, &all).await;
    for file in &manifests {
        dry_run(h, &ns, &read_docs(file), &rel(file));
    }
}

/// kind runs the very scenarios the local real node runs: `e2e/kind/run.sh` only makes the
/// cluster and calls the same test target (tests/e2e) that `e2e/local/test` runs.
#[test]
fn kind_and_the_local_node_run_the_same_scenario_entry_point() {
    let run_sh = std::fs::read_to_string(repo_root().join("e2e/kind/run.sh")).unwrap();
    let local = std::fs::read_to_string(repo_root().join("e2e/local/test")).unwrap();
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let manifest: toml_like::Tests = toml_like::tests(&cargo);
    assert_eq!(
        manifest.get("e2e").map(String::as_str),
        Some("tests/e2e/main.rs"),
        "Cargo.toml declares the e2e scenarios target"
    );
    let commands = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.contains("cargo test"))
            .map(str::to_string)
            .collect()
    };
    let kind_runs = commands(&run_sh);
    assert!(
        kind_runs.iter().any(|l| l.contains("--test e2e")),
        "e2e/kind/run.sh must run `cargo test --test e2e`: {kind_runs:?}"
    );
    let local_runs = commands(&local);
    assert!(
        local_runs
            .iter()
            .any(|l| l.contains("--test e2e") || l.contains("--all-targets")),
        "e2e/local/test must run the e2e target: {local_runs:?}"
    );
    // No scenario logic left in shell: the script never execs into pods or checks the tailnet.
    for forbidden in ["kubectl exec", "kubectl -n e2e", "tailscale nc", "curl "] {
        assert!(
            !run_sh.contains(forbidden),
            "e2e/kind/run.sh still has scenario logic: {forbidden}"
        );
    }
}

/// Reads `[[test]]` tables (name, path) from Cargo.toml without a TOML dependency.
mod toml_like {
    pub type Tests = std::collections::BTreeMap<String, String>;
    pub fn tests(cargo: &str) -> Tests {
        let mut out = Tests::new();
        for table in cargo.split("[[test]]").skip(1) {
            let body = table.split("\n[").next().unwrap_or_default();
            let field = |k: &str| {
                body.lines().find_map(|l| {
                    l.trim()
                        .strip_prefix(k)?
                        .trim()
                        .strip_prefix('=')
                        .map(|v| v.trim().trim_matches('"').to_string())
                })
            };
            if let (Some(n), Some(p)) = (field("name"), field("path")) {
                out.insert(n, p);
            }
        }
        out
    }
}

#[test]
fn kind_run_sh_check_mode_prints_the_plan() {
    let script = repo_root().join("e2e/kind/run.sh");
    let syntax = std::process::Command::new("bash")
        .args(["-n", path_str(&script)])
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{}", String::from_utf8_lossy(&syntax.stderr));
    // --check never creates anything; it fails (1) only when a prerequisite is missing.
    let out = std::process::Command::new("bash")
        .args([path_str(&script), "--check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in ["Plan", "kind create cluster", "--test e2e", "prerequisites:"] {
        assert!(
            stdout.contains(expected),
            "--check output lacks {expected:?}:\n{stdout}"
        );
    }
    if std::process::Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_ok()
    {
        let sc = std::process::Command::new("shellcheck")
            .args(["-x", "-P", "SCRIPTDIR", path_str(&script)])
            .output()
            .unwrap();
        assert!(
            sc.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&sc.stdout)
        );
    } else {
        eprintln!("shellcheck not installed: e2e/kind/run.sh not linted");
    }
}
