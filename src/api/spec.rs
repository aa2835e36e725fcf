use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::TailscaleNodeStatus;

/// Puts the pods labelled `tailnode.dev/node: <name>` in this namespace on a Tailscale tailnet by
/// injecting a Tailscale sidecar (containerboot) into each of them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tailnode.dev",
    version = "v1alpha1",
    kind = "TailscaleNode",
    namespaced,
    shortname = "tsn",
    status = "TailscaleNodeStatus",
    derive = "PartialEq",
    derive = "Default",
    cel,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.totalReplicas"}"#,
    printcolumn = r#"{"name":"Hostnames","type":"string","priority":1,"jsonPath":".status.hostnames"}"#,
    printcolumn = r#"{"name":"Addresses","type":"string","priority":1,"jsonPath":".status.addresses"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.exitNode) || !has(self.exitNode.use) || !has(self.routes) || !has(self.routes.advertise) || size(self.routes.advertise) == 0"
).message("a node that uses an exit node cannot advertise routes at the same time"))]
pub struct TailscaleNodeSpec {
    /// How the sidecar reaches the tailnet. `userspace` (default) needs no privileges and fits
    /// PodSecurity `restricted`: inbound tailnet traffic lands on 127.0.0.1, outbound goes through
    /// the SOCKS5/HTTP proxies. `tun` creates a real `tailscale0` interface (needs NET_ADMIN and
    /// /dev/net/tun). `auto` picks `tun` when the namespace's PodSecurity `enforce` level allows
    /// NET_ADMIN and `userspace` otherwise; the choice is recorded on the pod.
    #[serde(default)]
    pub mode: Mode,

    /// Tailscale hostname prefix. StatefulSet replicas become `<hostname>-<ordinal>`; other pods
    /// `<hostname>-<pod name>`. Defaults to the TailscaleNode's name for StatefulSets and to the
    /// pod name otherwise. The pod annotation `tailnode.dev/hostname` overrides it for one pod.
    /// A DNS label of at most 52 characters. Hostnames are kept within 63 characters: a longer
    /// one keeps its head and ends in a 6-character hash; with a generated pod name the prefix is
    /// shortened to leave room for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 52))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message(
        "hostname must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"
    ))]
    pub hostname: Option<String>,

    /// ACL tags the devices join with, e.g. `tag:k8s`. They are set on the auth key minted for
    /// each replica (an OAuth client must own them); with a static `authKey`, the key's own tags apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^tag:[a-zA-Z0-9][-a-zA-Z0-9_]*$'))").message(
        "every tag must look like 'tag:<name>' (letters, digits, '-' or '_')"
    ))]
    pub tags: Vec<String>,

    /// Ephemeral devices are removed by the control server soon after they go offline.
    #[serde(default)]
    pub ephemeral: bool,

    /// How replicas that are not StatefulSet pods keep their tailnet identity. `pod` (default):
    /// each pod is its own device, and a replacement pod joins as a new one. `slots`: the pods
    /// take numbered slots, the lowest free one first; slot `n` is the device `<hostname>-<n>`
    /// with its own state Secret `ts-<node>-slot-<n>`, so a Deployment's replacement pod rejoins
    /// as the same device (same name, same tailnet IPs, no new key). A replacement waits behind
    /// its scheduling gate until the pod that held the slot is gone. A slot without a pod for the
    /// operator's `--slot-grace` is retired and its device deleted. StatefulSet pods keep their
    /// ordinal identity either way; pods created with `spec.nodeName` (which cannot be gated)
    /// keep per-pod identity.
    #[serde(default, skip_serializing_if = "ReplicaIdentity::is_pod")]
    pub replica_identity: ReplicaIdentity,

    /// Where auth keys come from. Exactly one of `oauth`, `headscale` or `authKey`. When omitted,
    /// the operator's cluster-wide default credentials are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,

    /// Control server (login server) URL, e.g. `https://headscale.example.com`. Defaults to the
    /// Headscale URL of the credentials, else the operator default, else Tailscale's own.
    #[serde(default, rename = "controlURL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^\\\\s/]+(/.*)?$')").message(
        "controlURL must be an http:// or https:// URL"
    ))]
    pub control_url: Option<String>,

    /// Endpoints exposed with `tailscale serve` (and optionally Funnel). One entry per port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(e, self.exists_one(f, f.port == e.port))").message(
        "serve ports must be unique: each port can be listed once"
    ))]
    pub serve: Vec<ServeEndpoint>,

    /// Outbound proxies for userspace mode, optionally exported to the app containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<Outbound>,

    /// Subnet routes to advertise, and whether to accept routes other nodes advertise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Routes>,

    /// Offer this node as an exit node, or send its internet traffic through one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_node: Option<ExitNode>,

    /// Settings of the injected sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,

    /// DNS of the app containers: MagicDNS names of the tailnet next to the cluster's own names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsSpec>,
}

/// DNS of the app containers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsSpec {
    /// Resolve the tailnet's MagicDNS names (`<host>.<tailnet domain>`, and short `<host>`) in
    /// the app containers, in both modes, while cluster names keep resolving. The pod gets
    /// `dnsPolicy: None` and a `dnsConfig` whose first nameserver is a small resolver on
    /// 127.0.0.1:53 (the `tailscale-dns` container, from the operator's image): it answers names
    /// under the tailnet's domain from tailscaled and forwards everything else to the cluster DNS
    /// (the operator's `--cluster-dns`), with the cluster's search domains and `ndots:5` (a
    /// `dnsConfig` of the pod is merged in). The pod also gets the safe sysctl
    /// `net.ipv4.ip_unprivileged_port_start=53` so the resolver binds port 53 without
    /// privileges. Pods that set `dnsPolicy: None` or `Default` themselves are refused. In
    /// userspace mode the names resolve, but tailnet addresses are reached only through the
    /// outbound proxies (`outbound`), as before. Off by default; limits in the README.
    #[serde(default, rename = "magicDNS")]
    pub magic_dns: bool,
}

/// Networking mode of the sidecar.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No privileges; inbound on 127.0.0.1, outbound through proxies.
    #[default]
    Userspace,
    /// A kernel `tailscale0` interface; needs NET_ADMIN and /dev/net/tun.
    Tun,
    /// `tun` where the namespace's PodSecurity level allows it, else `userspace`.
    Auto,
}

/// Where a replica's tailnet identity lives (see `replicaIdentity`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaIdentity {
    /// One device per pod.
    #[default]
    Pod,
    /// Numbered slots that replacement pods take over.
    Slots,
}

impl ReplicaIdentity {
    /// True for the default, which the spec leaves out (existing spec hashes stay the same).
    pub fn is_pod(&self) -> bool {
        *self == ReplicaIdentity::Pod
    }
}

/// Credential source. Set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.oauth) ? 1 : 0) + (has(self.headscale) ? 1 : 0) + (has(self.authKey) ? 1 : 0) == 1"
).message("credentials: set exactly one of oauth, headscale or authKey"))]
pub struct Credentials {
    /// A Tailscale OAuth client (scopes `auth_keys` and `devices:core`) that mints one
    /// single-use key per replica and deletes devices that are gone for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthCredentials>,
    /// A Headscale server and an API key for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headscale: Option<HeadscaleCredentials>,
    /// A static auth key (no minting, no device cleanup). Must be reusable for more than one replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_key: Option<AuthKeyCredentials>,
}

/// A Tailscale OAuth client: its secret stored in a Secret of this namespace, or, with workload
/// identity federation, no secret at all: the operator proves itself with a short-lived token of
/// its own ServiceAccount for `audience`, which the OAuth client trusts (see the README).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretName) != has(self.clientID)").message(
    "oauth: set secretName (a stored client secret) or clientID with audience (workload identity federation), not both"
))]
#[x_kube(validation = Rule::new("has(self.clientID) == has(self.audience)").message(
    "oauth: clientID and audience go together (workload identity federation)"
))]
pub struct OAuthCredentials {
    /// Secret holding the client id and secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Key of the client id in the Secret (default `client_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id_key: Option<String>,
    /// Key of the client secret in the Secret (default `client_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_key: Option<String>,
    /// Workload identity federation: the id of the OAuth client that trusts the cluster's
    /// ServiceAccount token issuer (no client secret is stored).
    #[serde(default, rename = "clientID", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub client_id: Option<String>,
    /// Workload identity federation: the audience of the operator's ServiceAccount token, as
    /// configured on the OAuth client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub audience: Option<String>,
    /// Base URL of the Tailscale API (default `https://api.tailscale.com`).
    #[serde(default, rename = "apiURL", skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    /// Tailnet name (default `-`, the client's own tailnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tailnet: Option<String>,
}

/// A Headscale control server and an API key for it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeadscaleCredentials {
    /// Headscale's URL; also used as the login server unless `controlURL` is set.
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^\\\\s/]+(/.*)?$')").message(
        "headscale.url must be an http:// or https:// URL"
    ))]
    pub url: String,
    /// Secret holding the API key.
    #[schemars(length(min = 1, max = 253))]
    pub api_key_secret_name: String,
    /// Key of the API key in the Secret (default `api-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_key: Option<String>,
    /// Headscale user that owns the keys: its numeric id or its name.
    #[schemars(length(min = 1, max = 128))]
    pub user: String,
}

/// A static auth key stored in a Secret of this namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthKeyCredentials {
    /// Secret holding the auth key.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key of the auth key in the Secret (default `authkey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// One `tailscale serve` endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.funnel) || !self.funnel || (self.protocol == 'https' && self.port in [443, 8443, 10000])"
).message("funnel works only with protocol https on port 443, 8443 or 10000"))]
#[x_kube(validation = Rule::new(
    "self.protocol == 'tcp' ? self.target.matches('^tcp://[^/]+:[0-9]+$') : self.target.matches('^https?(\\\\+insecure)?://')"
).message("target must be tcp://host:port for protocol tcp, and an http://, https:// or https+insecure:// URL otherwise"))]
#[x_kube(validation = Rule::new("self.protocol != 'tcp' || !has(self.path)").message(
    "path applies only to http and https endpoints"
))]
pub struct ServeEndpoint {
    /// Tailnet port to listen on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `https` (TLS terminated by Tailscale), `http`, or `tcp` (raw TCP forward).
    pub protocol: ServeProtocol,
    /// Where traffic goes, inside the pod: `http://127.0.0.1:8080` or `tcp://127.0.0.1:5432`.
    #[schemars(length(max = 256))]
    pub target: String,
    /// URL path this handler serves (http and https only; default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("path must start with '/'"))]
    pub path: Option<String>,
    /// Expose this endpoint to the public internet with Funnel (https on 443, 8443 or 10000 only;
    /// the tailnet policy must grant the node's tag the `funnel` attribute).
    #[serde(default)]
    pub funnel: bool,
}

/// Protocol of a serve endpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServeProtocol {
    /// TLS terminated by Tailscale with the node's certificate.
    #[default]
    Https,
    /// Plain HTTP.
    Http,
    /// Raw TCP forwarding.
    Tcp,
}

/// Outbound proxies that tailscaled offers inside the pod (userspace mode reaches the tailnet only
/// through them; they also resolve MagicDNS names).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.socks5Port) || has(self.httpProxyPort)").message(
    "outbound: set socks5Port, httpProxyPort, or both"
))]
pub struct Outbound {
    /// Port of a SOCKS5 proxy on localhost (e.g. 1055).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub socks5_port: Option<i32>,
    /// Port of an HTTP CONNECT proxy on localhost (e.g. 1056).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub http_proxy_port: Option<i32>,
    /// Set `ALL_PROXY`, `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` (and their lower-case forms)
    /// in the app containers. A variable the container already sets is left as it is.
    #[serde(default)]
    pub export_env: bool,
    /// Extra `NO_PROXY` entries (localhost and cluster-internal names are always included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub no_proxy: Vec<String>,
}

/// Subnet routing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Routes {
    /// CIDRs to advertise as subnet routes, e.g. `10.0.0.0/24`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(r, isCIDR(r))").message(
        "routes.advertise entries must be CIDRs such as 10.0.0.0/24 or fd00::/64"
    ))]
    pub advertise: Vec<String>,
    /// Accept subnet routes advertised by other nodes.
    #[serde(default)]
    pub accept: bool,
}

/// Exit node settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.advertise) && self.advertise && has(self.use))").message(
    "exitNode: a node cannot advertise itself as an exit node and use another one"
))]
pub struct ExitNode {
    /// Offer this node as an exit node.
    #[serde(default)]
    pub advertise: bool,
    /// Send internet traffic through this exit node, named by its tailnet IP (`100.x.y.z` or
    /// `fd7a:115c:a1e0::...`). Not a name: `tailscale up --exit-node=<name>` fails until the
    /// netmap is known, so a sidecar's first start would fail. In TUN mode, traffic to the
    /// cluster's ranges (the operator's `--cluster-cidrs`) and to the apiserver stays off the exit
    /// node; in userspace mode, what goes through the sidecar's proxies uses the exit node.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message(
        "exitNode.use must be the exit node's tailnet IP (such as 100.64.0.5): tailscale resolves a name only once it has the netmap, so the sidecar's first start would fail"
    ))]
    pub use_node: Option<String>,
}

/// Sidecar container settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Image of the sidecar (default: the operator's, a `tailscale/tailscale` release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy of the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Resource requests and limits of the sidecar, used exactly as given. Default: requests cpu
    /// 10m and memory 32Mi, limit memory 256Mi, no CPU limit (so namespaces whose LimitRange or
    /// quota demands limits admit the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// `auto` (default): a native sidecar (an init container with `restartPolicy: Always`) where
    /// the cluster supports it, so Jobs complete and the tunnel is up before the app starts;
    /// `always`; or `never` (a regular container).
    #[serde(default)]
    pub native_sidecar: NativeSidecar,
    /// Extra environment variables for the sidecar (added after tailnode's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Port of the sidecar's health endpoint (`/healthz`) used by its startup, readiness and
    /// liveness probes (default 9002). It reports whether tailscaled has a tailnet IP and never
    /// calls the apiserver; liveness restarts the sidecar after a minute without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub health_port: Option<i32>,
    /// TUN mode only: run the sidecar `privileged` (some clusters need it for kernel networking).
    #[serde(default)]
    pub privileged: bool,
    /// Only the sidecar gets a ServiceAccount token (a projected volume of its own); the app
    /// containers get none (`automountServiceAccountToken: false` on the pod), so a compromised
    /// app cannot read or write the replica's tailnet state. Off by default: an app that calls
    /// the Kubernetes API needs the pod's token, and a pod has one ServiceAccount, so such an app
    /// cannot be isolated this way. Pods with `shareProcessNamespace` are refused when this is on
    /// (the app could read the sidecar's files through `/proc/<pid>/root`).
    #[serde(default)]
    pub isolate_credentials: bool,
}

/// Image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when the image is not on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Whether the sidecar is a native sidecar.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NativeSidecar {
    /// Native where the cluster supports it.
    #[default]
    Auto,
    /// Always native.
    Always,
    /// Always a regular container.
    Never,
}
