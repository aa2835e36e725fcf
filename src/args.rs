//! The command line: one typed clap structure.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::inject::{DEFAULT_IMAGE, OperatorDefaults, PodSecurityLevel};

/// tailnode: put Kubernetes pods on a Tailscale tailnet.
#[derive(Debug, Parser)]
#[command(name = "tailnode", version, about)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the TailscaleNode CustomResourceDefinition as YAML.
    Crd,
    /// Inject the Tailscale sidecar into the pod templates of Kubernetes manifests (like
    /// `istioctl kube-inject`) and print the result.
    Inject(InjectArgs),
}

/// `tailnode inject`.
#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// Manifest file with one or more YAML documents; `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// File with the TailscaleNode(s) the pods name; they may also be documents in the input.
    #[arg(long = "node")]
    pub node: Option<PathBuf>,
    /// PodSecurity `enforce` level of the target namespace (decides `mode: auto`).
    #[arg(long, value_enum, default_value_t = LevelArg::Privileged)]
    pub pod_security: LevelArg,
    /// The target cluster cannot run native sidecars (Kubernetes older than 1.29).
    #[arg(long)]
    pub no_native_sidecars: bool,
    /// Operator-wide defaults.
    #[command(flatten)]
    pub defaults: DefaultsArgs,
}

/// Defaults that TailscaleNodes may override; shared by `inject` and the operator.
#[derive(Debug, Clone, clap::Args)]
pub struct DefaultsArgs {
    /// Sidecar image.
    #[arg(long, env = "TAILNODE_SIDECAR_IMAGE", default_value = DEFAULT_IMAGE)]
    pub sidecar_image: String,
    /// Default login server for TailscaleNodes whose spec and credentials name none.
    #[arg(long, env = "TAILNODE_CONTROL_URL")]
    pub control_url: Option<String>,
    /// Let tailscaled upload logs to Tailscale (off by default: `--no-logs-no-support`).
    #[arg(long, env = "TAILNODE_ALLOW_LOGS")]
    pub allow_logs: bool,
}

impl DefaultsArgs {
    /// The engine's view of these flags.
    pub fn to_defaults(&self) -> OperatorDefaults {
        OperatorDefaults {
            image: self.sidecar_image.clone(),
            control_url: self.control_url.clone(),
            no_logs_no_support: !self.allow_logs,
        }
    }
}

/// PodSecurity level as a flag value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LevelArg {
    /// privileged
    Privileged,
    /// baseline
    Baseline,
    /// restricted
    Restricted,
}

impl From<LevelArg> for PodSecurityLevel {
    fn from(l: LevelArg) -> Self {
        match l {
            LevelArg::Privileged => PodSecurityLevel::Privileged,
            LevelArg::Baseline => PodSecurityLevel::Baseline,
            LevelArg::Restricted => PodSecurityLevel::Restricted,
        }
    }
}
