//! The test "kubelet": drives `e2e/local/podrunner`, which runs an injected pod's `tailscale` sidecar
//! (the real containerboot) in a network namespace of its own against the harness, plus plain
//! tailnet members to reach it from. Needs root (namespaces, mounts). Everything here blocks
//! (std::process); from an async test that must keep its runtime serving (the in-process operator
//! answers the sidecar's API calls) call it through `tokio::task::spawn_blocking`.
//!
//! Every process and netns lives under `$TAILNODE_HARNESS_DIR/pods/` and is removed by
//! [`cleanup_all`] (which `e2e/local/down` also runs); tests should still [`RunningPod::stop`] and
//! [`Member::stop`] what they started.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use super::{Harness, repo_root};

/// How long [`start_pod`] and [`RunningPod::restart`] wait for containerboot's "Startup complete".
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

pub fn script() -> PathBuf {
    repo_root().join("e2e/local/podrunner")
}

/// `podrunner ARGS...` with the harness environment; the raw output, whatever the exit status.
pub fn podrunner_output(h: &Harness, args: &[&str]) -> Output {
    let path = format!(
        "{}:{}",
        h.tools_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(script())
        .args(args)
        .env("TAILNODE_HARNESS_DIR", &h.dir)
        .env("KUBECONFIG", &h.kubeconfig)
        .env("TAILNODE_HEADSCALE_URL", &h.headscale_url)
        .env("PATH", path)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script().display()))
}

/// `podrunner ARGS...`: the JSON of its last stdout line, or why it failed.
pub fn podrunner(h: &Harness, args: &[&str]) -> Result<Value, String> {
    let out = podrunner_output(h, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "podrunner {} failed ({}): {stderr}{stdout}",
            args.join(" "),
            out.status
        ));
    }
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("null");
    serde_json::from_str(last).map_err(|e| format!("podrunner {}: bad JSON ({e}): {stdout}", args.join(" ")))
}

/// The last `n` lines of a file (for failure messages).
pub fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

/// A pod whose sidecar podrunner runs.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub h: Harness,
    pub namespace: String,
    pub name: String,
    /// `pod-NS.NAME`, the state dir's name.
    pub id: String,
    pub netns: String,
    /// The pod IP (on the netns's `eth0`; reported to the container as status.podIP).
    pub ip: String,
    pub dir: PathBuf,
    /// The sidecar's stdout+stderr (podrunner's own lines start with `[podrunner`).
    pub log: PathBuf,
    /// Seconds from the command to "Startup complete", when it waited.
    pub ready_after: Option<f64>,
    /// podrunner's whole answer (pids, logs, status, sa_token, ...).
    pub json: Value,
}

/// Options for [`start_pod_with`].
#[derive(Debug, Clone, Default)]
pub struct PodOptions {
    /// A fake app in the pod's netns: answers every GET on 127.0.0.1:PORT with BODY.
    pub app: Option<(u16, String)>,
    /// Wait this long for "Startup complete" (`None`: return once started).
    pub wait: Option<Duration>,
    /// Container to run (default `tailscale`).
    pub container: Option<String>,
    /// More podrunner arguments (`--forward PORT`, `--grace S`, `--restart never`, ...).
    pub extra_args: Vec<String>,
}

impl RunningPod {
    fn from_json(h: &Harness, json: Value) -> Self {
        let dir = PathBuf::from(s(&json, "dir"));
        RunningPod {
            h: h.clone(),
            namespace: s(&json, "namespace"),
            name: s(&json, "pod"),
            id: s(&json, "id"),
            netns: s(&json, "netns"),
            ip: s(&json, "ip"),
            log: dir.join("logs").join(format!("{}.log", s(&json, "container"))),
            dir,
            ready_after: json["ready_after_s"].as_f64(),
            json,
        }
    }

    fn args<'a>(&'a self, op: &'a str) -> Vec<&'a str> {
        vec![op, "-n", &self.namespace, "-p", &self.name]
    }

    /// The sidecar's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// podrunner's status: `running`, `restarts`, `last_exit`, `last_error`, `container_pid`.
    pub fn status(&self) -> Value {
        podrunner(&self.h, &self.args("status")).unwrap_or_else(|e| panic!("{e}"))["status"].clone()
    }

    /// Stops the pod like a kubelet (SIGTERM, the pod's grace period, SIGKILL) and tears down its
    /// netns; the log stays readable at [`RunningPod::log`].
    pub fn stop(&self) {
        podrunner(&self.h, &self.args("stop")).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Restarts the sidecar container (same netns, volumes and app) and waits for "Startup complete".
    pub fn restart(&self) -> RunningPod {
        let wait = READY_TIMEOUT.as_secs().to_string();
        let mut args = self.args("restart");
        args.extend(["--wait", &wait]);
        match podrunner(&self.h, &args) {
            Ok(json) => RunningPod::from_json(&self.h, json),
            Err(e) => panic!(
                "{e}\n--- last lines of {}:\n{}",
                self.log.display(),
                tail(&self.log, 40)
            ),
        }
    }

    /// Rewrites the ConfigMap/Secret/projected volumes from the API now (the kubelet's resync).
    pub fn sync_volumes(&self) {
        podrunner(&self.h, &self.args("sync")).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs a command in the pod's network namespace (as root, host filesystem).
    pub fn exec(&self, cmd: &[&str]) -> Output {
        exec(&self.h, &format!("{}/{}", self.namespace, self.name), cmd)
    }

    /// Runs a command inside the sidecar container (its mount/UTS/PID/net namespaces), like `kubectl exec`.
    pub fn exec_in_container(&self, cmd: &[&str]) -> Output {
        let target = format!("{}/{}", self.namespace, self.name);
        let mut args = vec!["exec", "--netns-of", &target, "--in-container", "--"];
        args.extend_from_slice(cmd);
        podrunner_output(&self.h, &args)
    }
}

/// Starts pod `ns/pod` (already created through the webhook) with an optional app on
/// 127.0.0.1:PORT answering BODY, and waits for containerboot's "Startup complete"; panics with the
/// sidecar's log when it does not come.
pub fn start_pod(h: &Harness, ns: &str, pod: &str, app: Option<(u16, &str)>) -> RunningPod {
    let opts = PodOptions {
        app: app.map(|(p, b)| (p, b.to_string())),
        wait: Some(READY_TIMEOUT),
        ..PodOptions::default()
    };
    start_pod_with(h, ns, pod, &opts).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts pod `ns/pod`; on failure the error carries the sidecar's last log lines.
pub fn start_pod_with(h: &Harness, ns: &str, pod: &str, opts: &PodOptions) -> Result<RunningPod, String> {
    let mut args: Vec<String> = ["start", "-n", ns, "-p", pod].map(String::from).to_vec();
    if let Some((port, body)) = &opts.app {
        args.extend(["--app-port".into(), port.to_string(), "--app-body".into(), body.clone()]);
    }
    if let Some(wait) = opts.wait {
        args.extend(["--wait".into(), wait.as_secs_f64().to_string()]);
    }
    if let Some(c) = &opts.container {
        args.extend(["-c".into(), c.clone()]);
    }
    args.extend(opts.extra_args.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    podrunner(h, &refs)
        .map(|json| RunningPod::from_json(h, json))
        .map_err(|e| {
            let log = h
                .dir
                .join("pods")
                .join(format!("pod-{ns}.{pod}"))
                .join("logs/tailscale.log");
            format!("{e}\n--- last lines of {}:\n{}", log.display(), tail(&log, 40))
        })
}

/// Stops pod `ns/pod` (see [`RunningPod::stop`]).
pub fn stop(h: &Harness, ns: &str, pod: &str) {
    podrunner(h, &["stop", "-n", ns, "-p", pod]).unwrap_or_else(|e| panic!("{e}"));
}

/// Restarts the sidecar of pod `ns/pod` (see [`RunningPod::restart`]).
pub fn restart(h: &Harness, ns: &str, pod: &str) -> RunningPod {
    let wait = READY_TIMEOUT.as_secs().to_string();
    podrunner(h, &["restart", "-n", ns, "-p", pod, "--wait", &wait])
        .map(|json| RunningPod::from_json(h, json))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A second tailnet member: userspace tailscaled in a netns of its own, logged in to Headscale.
#[derive(Debug, Clone)]
pub struct Member {
    pub h: Harness,
    pub name: String,
    pub netns: String,
    /// Its tailnet addresses.
    pub ip4: String,
    pub ip6: String,
    /// tailscaled's LocalAPI socket (usable from the root netns: `tailscale --socket=...`).
    pub socket: PathBuf,
    /// `127.0.0.1:1080` inside its netns.
    pub socks5: String,
    /// `127.0.0.1:3128` inside its netns.
    pub http_proxy: String,
    pub dir: PathBuf,
    pub json: Value,
}

/// Starts member `name` (also its tailnet hostname) and logs it in with `authkey`.
pub fn member_start(h: &Harness, name: &str, authkey: &str) -> Member {
    let json = podrunner(h, &["member-start", "--name", name, "--authkey", authkey]).unwrap_or_else(|e| {
        let log = h
            .dir
            .join("pods")
            .join(format!("member-{name}"))
            .join("logs/tailscaled.log");
        panic!("{e}\n--- last lines of {}:\n{}", log.display(), tail(&log, 40))
    });
    Member {
        h: h.clone(),
        name: name.to_string(),
        netns: s(&json, "netns"),
        ip4: s(&json, "ip4"),
        ip6: s(&json, "ip6"),
        socket: PathBuf::from(s(&json, "socket")),
        socks5: s(&json, "socks5"),
        http_proxy: s(&json, "http_proxy"),
        dir: PathBuf::from(s(&json, "dir")),
        json,
    }
}

impl Member {
    /// Runs a command in the member's network namespace.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        exec(&self.h, &format!("member:{}", self.name), cmd)
    }

    /// GETs `url` through the member's SOCKS5 proxy (so tailnet IPs and MagicDNS names work):
    /// the body, or curl's complaint.
    pub fn curl(&self, url: &str) -> Result<String, String> {
        let out = self.exec(&[
            "curl",
            "-sS",
            "--fail",
            "-m",
            "20",
            "--socks5-hostname",
            &self.socks5,
            url,
        ]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("curl {url}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// `tailscale --socket=<its socket> ARGS...`.
    pub fn tailscale(&self, args: &[&str]) -> Output {
        let socket = format!("--socket={}", self.socket.display());
        let tool = self.h.tool("tailscale");
        let mut cmd = vec![tool.to_str().unwrap_or("tailscale"), socket.as_str()];
        cmd.extend_from_slice(args);
        self.exec(&cmd)
    }

    pub fn stop(&self) {
        podrunner(&self.h, &["member-stop", "--name", &self.name]).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Runs `cmd` in the netns of `target` (`NS/POD` or `member:NAME`); the command's own output and status.
pub fn exec(h: &Harness, target: &str, cmd: &[&str]) -> Output {
    let mut args = vec!["exec", "--netns-of", target, "--"];
    args.extend_from_slice(cmd);
    podrunner_output(h, &args)
}

/// Stops every pod and member of this harness and removes their state.
pub fn cleanup_all(h: &Harness) {
    podrunner(h, &["cleanup-all"]).unwrap_or_else(|e| panic!("{e}"));
}
