//! tailnode: a Kubernetes operator that puts pods on a Tailscale tailnet by injecting a
//! Tailscale sidecar (containerboot) into every pod that opts in.
//!
//! Layout: [`api`] holds the `TailscaleNode` types; [`inject`] is the pure injection engine and
//! serve-config renderer; [`manifest`] applies the engine to multi-document YAML (`tailnode inject`).

pub mod api;
pub mod app;
pub mod args;
pub mod crd;
pub mod inject;
pub mod manifest;
