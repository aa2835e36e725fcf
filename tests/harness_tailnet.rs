//! Proof tests for the tailnet side of the harness: Headscale's API mints tagged pre-auth keys,
//! and containerboot from the tool cache boots tailscaled and joins Headscale with such a key.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

fn versions() -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_root().join("e2e/local/versions.env")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn preauth_key(h: &Harness, tags: &[&str]) -> Value {
    let expiration = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let body = json!({"user": h.headscale_user_id, "reusable": false, "ephemeral": true,
        "expiration": expiration, "aclTags": tags});
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/api/v1/preauthkey", h.headscale_url))
        .bearer_auth(&h.headscale_api_key)
        .json(&body)
        .send()
        .await
        .expect("headscale answers");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "POST /api/v1/preauthkey: {status} {text}");
    serde_json::from_str::<Value>(&text).unwrap()["preAuthKey"].clone()
}

#[tokio::test]
async fn headscale_mints_a_tagged_preauth_key() {
    let h = harness();
    let key = preauth_key(h, &["tag:k8s"]).await;
    assert!(key["key"].as_str().is_some_and(|k| !k.is_empty()), "{key}");
    assert_eq!(key["aclTags"], json!(["tag:k8s"]), "{key}");
    assert_eq!(key["reusable"], json!(false));
}

#[tokio::test]
async fn containerboot_from_the_cache_boots_and_joins_headscale() {
    let h = harness();
    let want = versions()["TAILSCALE_VERSION"].clone();
    let out = Command::new(h.tool("tailscale")).arg("version").output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    // Built from the module proxy there is no VCS stamp, so the version reads "<v>-ERR-BuildInfo".
    assert!(printed.starts_with(&want), "tailscale version: {printed}");
    let out = Command::new(h.tool("tailscaled")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&want));

    let key = preauth_key(h, &["tag:k8s"]).await["key"].as_str().unwrap().to_string();
    let dir = std::env::temp_dir().join(unique("containerboot"));
    std::fs::create_dir_all(&dir).unwrap();
    let hostname = unique("boot");
    let mut child = Command::new(h.tool("containerboot"))
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", h.tools_bin.display()))
        .env("HOME", &dir)
        .env("TS_USERSPACE", "true")
        .env("TS_STATE_DIR", &dir)
        .env("TS_SOCKET", dir.join("tailscaled.sock"))
        .env("TS_AUTHKEY", key)
        .env("TS_HOSTNAME", &hostname)
        .env("TS_EXTRA_ARGS", format!("--login-server={}", h.headscale_url))
        .env("TS_TAILSCALED_EXTRA_ARGS", "--no-logs-no-support")
        .env("TS_NO_LOGS_NO_SUPPORT", "true")
        .env("TS_DISABLE_PORTMAPPER", "1")
        .env("TS_DEBUG_DERP_WS_CLIENT", "true")
        .env("TS_DEBUG_USE_DERP_HTTP", "true")
        .env("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
        .env(
            "TS_NETCHECK_GENERATE_204_URL",
            format!("{}/generate_204", h.headscale_url),
        )
        .env("TS_ENABLE_HEALTH_CHECK", "true")
        .env("TS_LOCAL_ADDR_PORT", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("containerboot starts");
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    let mut complete = false;
    while Instant::now() < deadline && !complete {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            complete = line.contains("Startup complete, waiting for shutdown signal");
            log.push(line);
        }
    }
    // SIGTERM, as a kubelet would; containerboot must exit cleanly.
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    let text = log.join("\n");
    assert!(complete, "containerboot never completed start-up:\n{text}");
    assert!(text.contains("Starting tailscaled"), "{text}");
    assert!(status.success(), "containerboot exit {status} after SIGTERM:\n{text}");

    // Headscale lists the node, with its tag.
    let nodes = h.headscale_get("/api/v1/node").await;
    let node = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["givenName"] == json!(hostname) || n["name"] == json!(hostname))
        .unwrap_or_else(|| panic!("headscale does not list {hostname}: {nodes}"));
    let tags = [&node["tags"], &node["forcedTags"], &node["validTags"]];
    assert!(tags.iter().any(|t| t.to_string().contains("tag:k8s")), "{node}");
    let _ = std::fs::remove_dir_all(&dir);
}
