//! Proof tests for the tailnet side of the harness: Headscale's API mints tagged pre-auth keys,
//! and the tool cache holds the tailscale version the sidecar image is built from. (containerboot
//! itself boots and joins in real pods: tests/e2e.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::process::Command;

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
    let resp = h
        .headscale()
        .request(reqwest::Method::POST, "/api/v1/preauthkey")
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

#[test]
fn the_tool_cache_holds_the_pinned_tailscale() {
    let h = harness();
    let want = versions()["TAILSCALE_VERSION"].clone();
    for tool in ["tailscale", "tailscaled"] {
        let arg = if tool == "tailscale" { "version" } else { "--version" };
        let out = Command::new(h.tool(tool)).arg(arg).output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        // Built from the module proxy there is no VCS stamp, so the version reads "<v>-ERR-BuildInfo".
        assert!(printed.starts_with(&want), "{tool} version: {printed}");
    }
}
