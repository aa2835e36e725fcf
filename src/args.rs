//! The command line: one typed clap structure.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::inject::{DEFAULT_IMAGE, OperatorDefaults, PodSecurityLevel};
use crate::tls::ServerLimits;

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
    Crd {
        /// Print a Markdown field reference instead (docs/reference.md).
        #[arg(long)]
        reference: bool,
    },
    /// Inject the Tailscale sidecar into the pod templates of Kubernetes manifests (like
    /// `istioctl kube-inject`) and print the result.
    Inject(InjectArgs),
    /// Run the operator: admission webhook, controller, and admin server.
    Run(Box<RunArgs>),
}

/// `tailnode run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Namespace the operator runs in (its Lease, webhook Secret and default credentials live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tailnode-system")]
    pub namespace: String,
    /// This replica's identity for leader election.
    #[arg(long, env = "POD_NAME", default_value = "tailnode")]
    pub identity: String,
    /// The operator's ServiceAccount (in --namespace), whose tokens prove the operator to a
    /// Tailscale OAuth client with workload identity federation.
    #[arg(long, env = "POD_SERVICE_ACCOUNT", default_value = "tailnode")]
    pub service_account: String,
    /// Serve the admission webhook.
    #[arg(long, env = "TAILNODE_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook: bool,
    /// Run the controller (behind leader election).
    #[arg(long, env = "TAILNODE_CONTROLLER", default_value_t = true, action = clap::ArgAction::Set)]
    pub controller: bool,
    /// Serve /healthz, /readyz and /metrics.
    #[arg(long, env = "TAILNODE_ADMIN", default_value_t = true, action = clap::ArgAction::Set)]
    pub admin: bool,
    /// Webhook HTTPS listen address.
    #[arg(long, env = "TAILNODE_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: std::net::SocketAddr,
    /// Admin HTTP listen address.
    #[arg(long, env = "TAILNODE_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: std::net::SocketAddr,
    /// Webhook certificate and key files (e.g. from cert-manager), hot-reloaded. Without them the
    /// operator manages its own CA and certificate in a Secret.
    #[arg(long, env = "TAILNODE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Key file matching --tls-cert-file.
    #[arg(long, env = "TAILNODE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Secret for self-managed webhook certificates.
    #[arg(long, env = "TAILNODE_WEBHOOK_SECRET", default_value = "tailnode-webhook-tls")]
    pub webhook_secret: String,
    /// Service in front of the webhook (its DNS names go into the certificate).
    #[arg(long, env = "TAILNODE_WEBHOOK_SERVICE", default_value = "tailnode-webhook")]
    pub webhook_service: String,
    /// Extra names (DNS or IP) for the webhook certificate, comma-separated.
    #[arg(long, env = "TAILNODE_WEBHOOK_EXTRA_NAMES", value_delimiter = ',')]
    pub webhook_extra_names: Vec<String>,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps current (self-managed certs).
    #[arg(long, env = "TAILNODE_WEBHOOK_CONFIG", default_value = "tailnode")]
    pub webhook_config: String,
    /// Elect a leader with a Lease before running the controller.
    #[arg(long, env = "TAILNODE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "TAILNODE_LEASE", default_value = "tailnode-controller")]
    pub lease_name: String,
    /// How long followers wait, on their own clock, after the Lease last changed before they take
    /// it over (`15s`, `1500ms`, `1m`).
    #[arg(long, env = "TAILNODE_LEADER_ELECT_LEASE_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,
    /// The leader stops its controller when it has not renewed the Lease for this long; shorter
    /// than --leader-elect-lease-duration.
    #[arg(long, env = "TAILNODE_LEADER_ELECT_RENEW_DEADLINE", default_value = "7s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    /// Time between attempts to take or renew the Lease, and the timeout of each Lease request;
    /// shorter than --leader-elect-renew-deadline.
    #[arg(long, env = "TAILNODE_LEADER_ELECT_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
    /// Lifetime of a minted, unused auth key, in seconds.
    #[arg(long, env = "TAILNODE_KEY_TTL_SECONDS", default_value_t = 600)]
    pub key_ttl_seconds: u64,
    /// How long a slot (`replicaIdentity: slots`) without a pod keeps its state and device before
    /// both are deleted; a pod that comes back within it rejoins as the same device.
    #[arg(long, env = "TAILNODE_SLOT_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub slot_grace: Duration,
    /// Write into each TailscaleNode's `status.injection` what the chart's
    /// MutatingAdmissionPolicy copies into its pods (`injector: policy`).
    #[arg(long, env = "TAILNODE_POLICY_INJECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub policy_injection: bool,
    /// Kind of the operator-wide default credentials.
    #[arg(long, env = "TAILNODE_DEFAULT_CREDENTIALS", value_enum)]
    pub default_credentials: Option<CredentialKind>,
    /// Secret (in --namespace) with the default credentials.
    #[arg(
        long,
        env = "TAILNODE_DEFAULT_CREDENTIALS_SECRET",
        default_value = "tailnode-credentials"
    )]
    pub default_credentials_secret: String,
    /// Headscale URL of the default credentials.
    #[arg(long, env = "TAILNODE_DEFAULT_HEADSCALE_URL")]
    pub default_headscale_url: Option<String>,
    /// Headscale user (id or name) of the default credentials.
    #[arg(long, env = "TAILNODE_DEFAULT_HEADSCALE_USER", default_value = "tailnode")]
    pub default_headscale_user: String,
    /// Tailscale API base URL of the default OAuth credentials.
    #[arg(long, env = "TAILNODE_DEFAULT_API_URL")]
    pub default_api_url: Option<String>,
    /// Log format.
    #[arg(long, env = "TAILNODE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// The apiserver's service host as pods see it; the kubelet sets it in every pod. An IPv6
    /// literal makes injected sidecars get a bracketed `KUBERNETES_SERVICE_HOST`.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", hide_env_values = true)]
    pub api_server_host: Option<String>,
    /// Operator-wide defaults for the sidecar.
    #[command(flatten)]
    pub defaults: DefaultsArgs,
    /// Limits of the webhook and admin servers.
    #[command(flatten)]
    pub limits: ServerLimitsArgs,
}

impl RunArgs {
    /// The engine's defaults. With default Headscale credentials and no `--control-url`, the
    /// Headscale URL is also the login server (a sidecar must never fall back to Tailscale's).
    pub fn operator_defaults(&self) -> OperatorDefaults {
        let mut defaults = self.defaults.to_defaults();
        if defaults.control_url.is_none() && self.default_credentials == Some(CredentialKind::Headscale) {
            defaults.control_url = self.default_headscale_url.clone();
        }
        defaults
    }
}

/// Parses a duration: a whole number with a unit, `ms`, `s`, `m` or `h` (e.g. `15s`, `500ms`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 15s or 500ms"))?;
    let per_unit = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    u32::try_from(n)
        .ok()
        .and_then(|n| per_unit.checked_mul(n))
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// [`parse_duration`], but not zero: a zero timeout would close every connection.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("{text:?}: a timeout must be longer than zero")),
        d => Ok(d),
    }
}

/// Kinds of default credentials.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CredentialKind {
    /// Tailscale OAuth client (keys `client_id`, `client_secret`).
    Oauth,
    /// Headscale API key (key `api-key`).
    Headscale,
    /// Static auth key (key `authkey`).
    Authkey,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
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
    /// The target cluster's `KUBERNETES_SERVICE_HOST` (`kubectl get svc kubernetes -n default`);
    /// needed only on IPv6 clusters, where the sidecar gets a bracketed copy.
    #[arg(long)]
    pub api_server_host: Option<String>,
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
    /// The PodSecurity level of namespaces without a `pod-security.kubernetes.io/enforce` label:
    /// the cluster's default (`privileged` unless an AdmissionConfiguration sets another). `auto`
    /// picks TUN only in namespaces at `privileged`, so set this to `privileged` only when the
    /// cluster's default really is.
    #[arg(long, env = "TAILNODE_DEFAULT_POD_SECURITY", default_value = "baseline")]
    pub default_pod_security: PodSecurityLevel,
    /// The cluster's pod and service CIDRs, comma-separated (e.g. `10.244.0.0/16,10.96.0.0/12`):
    /// a TUN sidecar that uses an exit node routes them, and the apiserver, around it.
    #[arg(long, env = "TAILNODE_CLUSTER_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub cluster_cidrs: Vec<String>,
}

/// Checks a CIDR (`10.96.0.0/12`, `fd00::/108`).
fn parse_cidr(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR such as 10.96.0.0/12"))?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("{text:?}: {addr:?} is not an IP"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match len.parse::<u8>() {
        Ok(l) if l <= max => Ok(text.to_string()),
        _ => Err(format!("{text:?}: the prefix length must be 0-{max}")),
    }
}

impl DefaultsArgs {
    /// The engine's view of these flags.
    pub fn to_defaults(&self) -> OperatorDefaults {
        OperatorDefaults {
            image: self.sidecar_image.clone(),
            control_url: self.control_url.clone(),
            no_logs_no_support: !self.allow_logs,
            unlabelled_namespace_level: self.default_pod_security,
            cluster_cidrs: self.cluster_cidrs.clone(),
        }
    }
}

/// Limits that keep slow or hostile clients from holding the webhook and admin servers open.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerLimitsArgs {
    /// How long a client may take to complete the TLS handshake (e.g. 10s, 500ms).
    #[arg(long, env = "TAILNODE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub handshake_timeout: Duration,
    /// How long a client may take to send a request's headers (after the handshake, and between
    /// HTTP/1.1 requests on one connection).
    #[arg(long, env = "TAILNODE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub header_read_timeout: Duration,
    /// How long a connection may stay open without a request in flight.
    #[arg(long, env = "TAILNODE_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_timeout)]
    pub idle_timeout: Duration,
    /// How long a request may take from its headers to its response (answered 408 when over).
    #[arg(long, env = "TAILNODE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    pub request_timeout: Duration,
    /// Open connections per server; more are closed at once.
    #[arg(
        long,
        env = "TAILNODE_MAX_CONNECTIONS",
        default_value_t = ServerLimits::MAX_CONNECTIONS as u64,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    pub max_connections: u64,
    /// Open connections per server from one client IP; more are closed at once.
    #[arg(
        long,
        env = "TAILNODE_MAX_CONNECTIONS_PER_IP",
        default_value_t = ServerLimits::MAX_CONNECTIONS_PER_IP as u64,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    pub max_connections_per_ip: u64,
    /// Largest request body in bytes (answered 413 when over).
    #[arg(
        long,
        env = "TAILNODE_MAX_BODY_BYTES",
        default_value_t = ServerLimits::MAX_BODY_BYTES as u64,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    pub max_body_bytes: u64,
}

impl ServerLimitsArgs {
    /// The servers' view of these flags.
    pub fn to_limits(&self) -> ServerLimits {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        ServerLimits {
            handshake_timeout: self.handshake_timeout,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            max_connections: size(self.max_connections),
            max_connections_per_ip: size(self.max_connections_per_ip),
            max_body_bytes: size(self.max_body_bytes),
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["tailnode", "run"];
        argv.extend_from_slice(extra);
        match Args::parse_from(argv).command {
            Command::Run(r) => *r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn default_headscale_url_is_the_login_server() {
        let a = run_args(&[
            "--default-credentials=headscale",
            "--default-headscale-url=http://hs.local:8080",
        ]);
        assert_eq!(
            a.operator_defaults().control_url.as_deref(),
            Some("http://hs.local:8080")
        );
        let explicit = run_args(&[
            "--default-credentials=headscale",
            "--default-headscale-url=http://hs.local:8080",
            "--control-url=https://login.example",
        ]);
        assert_eq!(
            explicit.operator_defaults().control_url.as_deref(),
            Some("https://login.example")
        );
        assert_eq!(run_args(&[]).operator_defaults().control_url, None);
        assert!(run_args(&[]).operator_defaults().no_logs_no_support);
    }

    #[test]
    fn leader_election_timings() {
        let a = run_args(&[]);
        assert_eq!(a.leader_elect_lease_duration, Duration::from_secs(10));
        assert_eq!(a.leader_elect_renew_deadline, Duration::from_secs(7));
        assert_eq!(a.leader_elect_retry_period, Duration::from_secs(2));
        let a = run_args(&[
            "--leader-elect-lease-duration=1m",
            "--leader-elect-renew-deadline=45s",
            "--leader-elect-retry-period=500ms",
        ]);
        assert_eq!(a.leader_elect_lease_duration, Duration::from_secs(60));
        assert_eq!(a.leader_elect_renew_deadline, Duration::from_secs(45));
        assert_eq!(a.leader_elect_retry_period, Duration::from_millis(500));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "15", "s", "-1s", "1.5s", "15 s", "10d", "99999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cluster_cidrs_are_checked_and_reach_the_engine() {
        assert!(run_args(&[]).operator_defaults().cluster_cidrs.is_empty());
        let set = run_args(&["--cluster-cidrs=10.244.0.0/16, 10.96.0.0/12,fd00::/108"]);
        assert_eq!(
            set.operator_defaults().cluster_cidrs,
            ["10.244.0.0/16", "10.96.0.0/12", "fd00::/108"]
        );
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "example.com/8", "10.0.0.0/x"] {
            let flag = format!("--cluster-cidrs={bad}");
            assert!(Args::try_parse_from(["tailnode", "run", &flag]).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_limit_flags_default_to_the_server_defaults() {
        assert_eq!(run_args(&[]).limits.to_limits(), ServerLimits::default());
        let set = run_args(&[
            "--handshake-timeout=3s",
            "--header-read-timeout=4s",
            "--idle-timeout=5m",
            "--request-timeout=600ms",
            "--max-connections=7",
            "--max-connections-per-ip=8",
            "--max-body-bytes=9",
        ]);
        let want = ServerLimits {
            handshake_timeout: Duration::from_secs(3),
            header_read_timeout: Duration::from_secs(4),
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_millis(600),
            max_connections: 7,
            max_connections_per_ip: 8,
            max_body_bytes: 9,
        };
        assert_eq!(set.limits.to_limits(), want);
        for zero in [
            "--max-connections=0",
            "--max-body-bytes=0",
            "--handshake-timeout=0s",
            "--idle-timeout=0ms",
        ] {
            assert!(Args::try_parse_from(["tailnode", "run", zero]).is_err(), "{zero}");
        }
    }
}
