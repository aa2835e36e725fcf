//! The command line: one typed clap structure.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::inject::{DEFAULT_CLUSTER_DOMAIN, DEFAULT_IMAGE, DnsDefaults, OperatorDefaults, PodSecurityLevel};
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
    /// The resolver of `dns.magicDNS` pods (the injected `tailscale-dns` container): answers
    /// tailnet names from tailscaled's LocalAPI and forwards the rest to the cluster DNS.
    DnsProxy(DnsProxyArgs),
}

/// `tailnode dns-proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct DnsProxyArgs {
    /// UDP and TCP address to answer on.
    #[arg(long, default_value = "127.0.0.1:53")]
    pub listen: std::net::SocketAddr,
    /// DNS server(s) for every name outside the tailnet, tried in order (`IP` or `IP:port`).
    #[arg(long, required = true, value_delimiter = ',', value_parser = parse_dns_server_addr)]
    pub upstream: Vec<std::net::SocketAddr>,
    /// tailscaled's LocalAPI socket.
    #[arg(long, default_value = "/tmp/tailscaled.sock")]
    pub socket: PathBuf,
    /// How long to wait for the upstream server or tailscaled, per query (e.g. `2s`).
    #[arg(long, default_value = "2s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

fn parse_dns_server_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    crate::dnsproxy::parse_server(text.trim())
        .ok_or_else(|| format!("{text:?} is not a DNS server address such as 10.96.0.10 or 10.96.0.10:53"))
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
    /// The cluster DNS server(s), comma-separated `IP` or `IP:port` (the kubelet's `clusterDNS`;
    /// `kubectl -n kube-system get svc kube-dns`): the resolver of `dns.magicDNS` pods forwards
    /// every name outside the tailnet there. Pods with `dns.magicDNS` are refused without it.
    #[arg(long, env = "TAILNODE_CLUSTER_DNS", value_delimiter = ',', value_parser = parse_dns_server)]
    pub cluster_dns: Vec<String>,
    /// The cluster domain (the kubelet's `clusterDomain`): `dns.magicDNS` pods search
    /// `<namespace>.svc.<domain>`, `svc.<domain>` and `<domain>`.
    #[arg(long, env = "TAILNODE_CLUSTER_DOMAIN", default_value = DEFAULT_CLUSTER_DOMAIN, value_parser = parse_domain)]
    pub cluster_domain: String,
    /// Image of the `tailscale-dns` resolver container of `dns.magicDNS` pods: tailnode's own
    /// image (it runs `tailnode dns-proxy`). The chart sets it to the operator's image.
    #[arg(long, env = "TAILNODE_DNS_PROXY_IMAGE")]
    pub dns_proxy_image: Option<String>,
}

/// Checks a DNS server address: `IP` (port 53) or `IP:port`, IPv6 as `[addr]:port`.
fn parse_dns_server(text: &str) -> Result<String, String> {
    parse_dns_server_addr(text).map(|a| a.to_string())
}

/// Checks a cluster domain: DNS labels separated by dots, no trailing dot.
fn parse_domain(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(text)
    } else {
        Err(format!("{text:?} is not a domain such as cluster.local"))
    }
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
            dns: DnsDefaults {
                cluster_dns: self.cluster_dns.clone(),
                cluster_domain: self.cluster_domain.clone(),
                proxy_image: self.dns_proxy_image.clone(),
            },
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
mod tests;
