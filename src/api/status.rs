use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a TailscaleNode, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TailscaleNodeStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CredentialsValid` and `Degraded`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Replicas whose device is registered and has tailnet IPs.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas known to the controller.
    #[serde(default)]
    pub total_replicas: i32,
    /// One entry per replica (pod), sorted by pod name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
    /// The registered replicas' tailnet hostnames, the first few and a count (for
    /// `kubectl get tsn -o wide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostnames: Option<String>,
    /// The registered replicas' first tailnet IPs, the first few and a count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<String>,
    /// What the chart's MutatingAdmissionPolicy adds to this node's pods (`injector: policy`):
    /// the engine's output for every variant, written only when the operator runs with
    /// `--policy-injection`. Machine-readable; see `inject::policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub injection: Option<serde_json::Value>,
}

/// An object whose fields the apiserver keeps as written.
fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Status of one replica.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Pod name.
    pub pod: String,
    /// Name of the replica's state Secret.
    pub secret: String,
    /// Tailscale hostname (from the device's FQDN once registered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Stable device (node) id in the tailnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Tailnet IP addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// MagicDNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    /// Lifecycle state of the replica.
    pub state: ReplicaState,
    /// The last reset tailnode carried out for this replica: the value of the pod's
    /// `tailnode.dev/reset` annotation, or `node/<value>` for the TailscaleNode's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reset: Option<String>,
    /// The slot the pod holds (`replicaIdentity: slots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
}

/// Lifecycle state of a replica.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReplicaState {
    /// The state Secret exists but no key was minted yet.
    #[default]
    Pending,
    /// A key is waiting in the state Secret for the sidecar to log in.
    KeyIssued,
    /// The sidecar registered and reported its device.
    Registered,
    /// Minting failed; see the conditions and Events.
    Failed,
}
