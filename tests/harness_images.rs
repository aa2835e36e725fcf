//! The images the local real node runs (e2e/local/images, imported by e2e/local/up): the
//! operator image agrees with the Dockerfile (binary path, user, entrypoint, command), the
//! sidecar image starts containerboot and carries the official image's userland, and the app
//! image has the uid the examples run as.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::*;

fn images_dir(h: &Harness) -> PathBuf {
    h.tools_bin.parent().expect("tools dir").join("images")
}

fn untar(tarball: &Path, member: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(tarball)
        .arg(member)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar {member}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn blob(tarball: &Path, digest: &str) -> Vec<u8> {
    untar(
        tarball,
        &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
    )
}

fn manifest(tarball: &Path) -> Value {
    let index: Value = serde_json::from_slice(&untar(tarball, "index.json")).unwrap();
    serde_json::from_slice(&blob(tarball, index["manifests"][0]["digest"].as_str().unwrap())).unwrap()
}

/// Runs `tar ARGS` over the image's single layer.
fn layer_tar(tarball: &Path, args: &[&str]) -> Vec<u8> {
    let layer = blob(tarball, manifest(tarball)["layers"][0]["digest"].as_str().unwrap());
    let mut tar = Command::new("tar")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        tar.stdin.take().unwrap().write_all(&layer).unwrap();
    }
    tar.wait_with_output().unwrap().stdout
}

/// (image config, paths in its single layer)
fn image(tarball: &Path) -> (Value, Vec<String>) {
    let config: Value =
        serde_json::from_slice(&blob(tarball, manifest(tarball)["config"]["digest"].as_str().unwrap())).unwrap();
    let paths = String::from_utf8_lossy(&layer_tar(tarball, &["-tz"]))
        .lines()
        .map(|l| format!("/{}", l.trim_start_matches("./").trim_end_matches('/')))
        .collect();
    (config["config"].clone(), paths)
}

/// The last `INSTRUCTION args` of the Dockerfile's final stage.
fn dockerfile(instruction: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let last_from = text.rfind("\nFROM ").unwrap();
    text[last_from..]
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{instruction} ")))
        .next_back()
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile's final stage"))
        .trim()
        .to_string()
}

#[test]
fn the_operator_image_agrees_with_the_dockerfile() {
    let h = harness();
    let (config, paths) = image(&images_dir(h).join("tailnode.tar"));
    let entrypoint: Value = serde_json::from_str(&dockerfile("ENTRYPOINT")).unwrap();
    let cmd: Value = serde_json::from_str(&dockerfile("CMD")).unwrap();
    assert_eq!(config["Entrypoint"], entrypoint);
    assert_eq!(config["Cmd"], cmd);
    assert_eq!(config["User"].as_str(), Some(dockerfile("USER").as_str()));
    let copy = dockerfile("COPY");
    let dest = copy.split_whitespace().last().unwrap();
    assert!(copy.starts_with("--from=build"), "{copy}");
    assert!(paths.iter().any(|p| p == dest), "the binary is at {dest}: {paths:?}");
    assert_eq!(
        entrypoint[0].as_str(),
        Some(dest),
        "the entrypoint runs the copied binary"
    );
    // The chart runs the image as the Dockerfile's user, numerically (runAsNonRoot is verifiable).
    let values = std::fs::read_to_string(repo_root().join("charts/tailnode/values.yaml")).unwrap();
    let uid = dockerfile("USER");
    let uid = uid.split(':').next().unwrap();
    assert!(
        values.contains(&format!("runAsUser: {uid}")),
        "chart runAsUser is the image's {uid}"
    );
}

#[test]
fn the_sidecar_image_starts_containerboot_with_the_official_userland() {
    let h = harness();
    let (config, paths) = image(&images_dir(h).join("tailscale.tar"));
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/containerboot"])
    );
    for want in [
        "/usr/local/bin/containerboot",
        "/usr/local/bin/tailscaled",
        "/usr/local/bin/tailscale",
        "/usr/sbin/iptables",
        "/usr/sbin/ip6tables",
        "/usr/bin/ip",
        "/etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(paths.iter().any(|p| p == want), "{want} missing from the sidecar image");
    }
    // Test-only settings live in this image, never in what the operator injects.
    let env = config["Env"].to_string();
    assert!(
        env.contains("TS_DEBUG_USE_DERP_HTTP=1") && env.contains("TS_DISABLE_PORTMAPPER=1"),
        "{env}"
    );
}

#[test]
fn the_app_image_has_user_1000() {
    let h = harness();
    let tarball = images_dir(h).join("busybox.tar");
    let (_, paths) = image(&tarball);
    for want in ["/usr/bin/busybox", "/usr/sbin/httpd", "/usr/bin/wget", "/etc/passwd"] {
        assert!(paths.iter().any(|p| p == want), "{want} missing: {paths:?}");
    }
    let passwd = String::from_utf8(layer_tar(&tarball, &["-xzO", "etc/passwd"])).unwrap();
    assert!(passwd.lines().any(|l| l.split(':').nth(2) == Some("1000")), "{passwd}");
}
