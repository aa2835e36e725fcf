//! tailnode: a Kubernetes operator that puts pods on a Tailscale tailnet by injecting a
//! Tailscale sidecar (containerboot) into every pod that opts in.
//!
//! Layout: [`api`] holds the `TailscaleNode` types; [`inject`] is the pure injection engine and
//! serve-config renderer; [`manifest`] applies the engine to multi-document YAML (`tailnode
//! inject`); [`webhook`] and [`controller`] are the operator's two halves, [`tsapi`] the key APIs,
//! [`tls`]/[`certs`]/[`admin`] the serving plumbing, [`dnsproxy`] the MagicDNS resolver of pods
//! (`tailnode dns-proxy`), and [`app`] wires them for `tailnode run`.

pub mod admin;
pub mod api;
pub mod app;
pub mod args;
pub mod certs;
pub mod controller;
pub mod crd;
pub mod dnsproxy;
pub mod inject;
pub mod manifest;
pub mod metrics;
pub mod telemetry;
pub mod tls;
pub mod tsapi;
pub mod webhook;

/// Installs the process-wide TLS crypto provider (ring). Call once before any TLS client or
/// server is built; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
