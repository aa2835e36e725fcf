use serde::{Deserialize, Serialize};

/// What the engine needs to know about the cluster and the operator; gathered by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterFacts {
    /// The apiserver runs native sidecars (init containers with `restartPolicy: Always`): 1.29+.
    pub native_sidecars: bool,
    /// The `pod-security.kubernetes.io/enforce` level of the pod's namespace.
    pub pod_security: PodSecurityLevel,
    /// What kind of workload the pod template belongs to, when the caller knows it (the CLI does;
    /// the webhook learns StatefulSets from the pod's owner reference).
    pub workload: WorkloadKind,
    /// Operator-wide defaults.
    pub defaults: OperatorDefaults,
    /// The apiserver's service host as pods see it (`KUBERNETES_SERVICE_HOST`, the same in every
    /// namespace). The webhook reads its own at start-up; `None` when unknown (the CLI, or an
    /// operator running outside the cluster). An IPv6 literal makes the sidecar get a bracketed
    /// copy (see `sidecar::api_server_env`).
    pub api_server_host: Option<String>,
    /// The pod's namespace, when known (the webhook's request; a manifest's `metadata.namespace`):
    /// MagicDNS pods get `<namespace>.svc.<cluster domain>` as their first search domain.
    pub namespace: Option<String>,
}

impl Default for ClusterFacts {
    fn default() -> Self {
        ClusterFacts {
            native_sidecars: true,
            pod_security: PodSecurityLevel::Privileged,
            workload: WorkloadKind::Other,
            defaults: OperatorDefaults::default(),
            api_server_host: None,
            namespace: None,
        }
    }
}

/// Operator-wide defaults that a TailscaleNode may override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorDefaults {
    /// Sidecar image.
    pub image: String,
    /// Login server used when neither the spec nor its credentials name one.
    pub control_url: Option<String>,
    /// Pass `--no-logs-no-support` to tailscaled (no log upload to Tailscale).
    pub no_logs_no_support: bool,
    /// The PodSecurity level assumed for a namespace without an `enforce` label: the cluster's
    /// default level (an AdmissionConfiguration may set one). `auto` picks TUN only where the
    /// level is `privileged`, so an unlabelled namespace gets TUN only when this says so.
    #[serde(skip)]
    pub unlabelled_namespace_level: PodSecurityLevel,
    /// The cluster's pod and service ranges: a TUN sidecar that uses an exit node keeps them
    /// (and the apiserver) off it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_cidrs: Vec<String>,
    /// What pods with `dns.magicDNS` need: the cluster DNS, the cluster domain, the resolver's
    /// image. Left out of the injection hash unless a pod uses it (see `spec_hash`).
    #[serde(skip)]
    pub dns: DnsDefaults,
}

/// The cluster's DNS, for pods whose TailscaleNode turns `dns.magicDNS` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsDefaults {
    /// The cluster DNS server(s) the pod's resolver forwards non-tailnet names to (the kubelet's
    /// `clusterDNS`, the `kube-dns` Service's ClusterIP), as `IP` or `IP:port`.
    pub cluster_dns: Vec<String>,
    /// The cluster domain (the kubelet's `clusterDomain`).
    pub cluster_domain: String,
    /// Image of the resolver container (the operator's own image: it runs `tailnode dns-proxy`).
    pub proxy_image: Option<String>,
}

/// The cluster domain most clusters use.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

impl Default for DnsDefaults {
    fn default() -> Self {
        DnsDefaults {
            cluster_dns: Vec::new(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_string(),
            proxy_image: None,
        }
    }
}

/// Default sidecar image: the tailscale release the project tests against.
pub const DEFAULT_IMAGE: &str = "tailscale/tailscale:v1.102.5";

impl Default for OperatorDefaults {
    fn default() -> Self {
        OperatorDefaults {
            image: DEFAULT_IMAGE.to_string(),
            control_url: None,
            no_logs_no_support: true,
            unlabelled_namespace_level: PodSecurityLevel::Baseline,
            cluster_cidrs: Vec::new(),
            dns: DnsDefaults::default(),
        }
    }
}

/// A PodSecurity admission level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodSecurityLevel {
    /// No restrictions (also the default when a namespace has no label).
    #[default]
    Privileged,
    /// Baseline: no NET_ADMIN, no hostPath.
    Baseline,
    /// Restricted: baseline plus non-root, drop ALL, RuntimeDefault seccomp.
    Restricted,
}

impl std::str::FromStr for PodSecurityLevel {
    type Err = String;

    /// Parses a level as the `enforce` label spells it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "privileged" => Ok(PodSecurityLevel::Privileged),
            "baseline" => Ok(PodSecurityLevel::Baseline),
            "restricted" => Ok(PodSecurityLevel::Restricted),
            other => Err(format!(
                "unknown PodSecurity level {other:?} (privileged, baseline or restricted)"
            )),
        }
    }
}

impl PodSecurityLevel {
    /// The level named by a namespace's `pod-security.kubernetes.io/enforce` label value. No label
    /// means privileged (the apiserver's built-in default; the webhook uses the operator's
    /// `--default-pod-security` instead); an unknown value is treated as restricted.
    pub fn from_label(value: Option<&str>) -> Self {
        match value {
            None | Some("privileged") => PodSecurityLevel::Privileged,
            Some("baseline") => PodSecurityLevel::Baseline,
            Some(_) => PodSecurityLevel::Restricted,
        }
    }

    /// The label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PodSecurityLevel::Privileged => "privileged",
            PodSecurityLevel::Baseline => "baseline",
            PodSecurityLevel::Restricted => "restricted",
        }
    }

    /// Only `privileged` admits NET_ADMIN and a hostPath /dev/net/tun.
    pub fn allows_net_admin(self) -> bool {
        self == PodSecurityLevel::Privileged
    }
}

/// The workload a pod template belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkloadKind {
    /// A StatefulSet: replicas have stable ordinals.
    StatefulSet,
    /// Anything else.
    #[default]
    Other,
}
