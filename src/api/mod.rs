//! The `TailscaleNode` custom resource (`tailnode.dev/v1alpha1`) and the well-known names that
//! tie pods to it. Types only: no I/O.

mod spec;
mod status;

pub use spec::*;
pub use status::*;

/// API group of every tailnode resource.
pub const GROUP: &str = "tailnode.dev";

/// Pod (template) label that opts a pod in; its value names a TailscaleNode in the pod's namespace.
pub const NODE_LABEL: &str = "tailnode.dev/node";
/// Pod annotation that records the injected spec hash; its presence makes injection a no-op.
pub const INJECTED_ANNOTATION: &str = "tailnode.dev/injected";
/// Pod annotation that records the networking mode the engine chose (`userspace` or `tun`).
pub const MODE_ANNOTATION: &str = "tailnode.dev/mode";
/// Pod annotation set by the controller once the replica registered: its tailnet name (FQDN).
pub const TAILNET_NAME_ANNOTATION: &str = "tailnode.dev/tailnet-name";
/// Pod annotation set by the controller once the replica registered: its tailnet IPs, comma-separated.
pub const TAILNET_IPS_ANNOTATION: &str = "tailnode.dev/tailnet-ips";
/// Pod annotation: a hash of the TailscaleNode spec the pod was injected from. The sidecar sees
/// a spec change only in a new pod; the controller names the pods whose hash is out of date.
pub const SPEC_ANNOTATION: &str = "tailnode.dev/spec";
/// Pod annotation that overrides the Tailscale hostname of this one pod.
pub const HOSTNAME_ANNOTATION: &str = "tailnode.dev/hostname";
/// Name of the injected sidecar container.
pub const SIDECAR_NAME: &str = "tailscale";
/// Scheduling gate the webhook puts on every injected pod; the controller removes it once the
/// pod's state Secret holds a key (or registered state) and its ServiceAccount may use it, so no
/// sidecar ever starts without its credentials.
pub const CREDENTIALS_GATE: &str = "tailnode.dev/credentials";
/// The label a StatefulSet controller puts on each pod with its ordinal.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// Pod annotation the webhook sets on pods that take a slot (`replicaIdentity: slots`): `slots`.
/// A value the user sets at CREATE is stripped; a ValidatingAdmissionPolicy refuses changes.
pub const IDENTITY_ANNOTATION: &str = "tailnode.dev/identity";
/// The value of [`IDENTITY_ANNOTATION`] on slot pods.
pub const SLOTS_IDENTITY: &str = "slots";
/// Pod annotation the controller sets once on a slot pod: its slot number. The sidecar reads it
/// through the downward API (`TS_SLOT`) when it starts, which the credentials gate holds back
/// until the slot is claimed. Set once, never changed (a ValidatingAdmissionPolicy holds that).
/// Also on slot state Secrets: the slot they hold.
pub const SLOT_ANNOTATION: &str = "tailnode.dev/slot";

/// Name of the state Secret of slot `slot` of node `node`. The injected sidecar derives the
/// same name from `$(TS_SLOT)`.
pub fn slot_secret_name(node: &str, slot: u32) -> String {
    format!("{}{slot}", slot_secret_prefix(node))
}

/// What the state Secrets of node `node`'s slots are named before the slot number.
pub fn slot_secret_prefix(node: &str) -> String {
    format!("ts-{node}-slot-")
}

/// Name of the per-replica state Secret for the pod called `pod_name`. The injected sidecar
/// derives the same name from `$(POD_NAME)`; the controller uses this to pre-create it.
pub fn state_secret_name(pod_name: &str) -> String {
    format!("ts-{pod_name}")
}

/// Name of the ConfigMap holding a TailscaleNode's rendered serve config.
pub fn serve_config_map_name(node: &str) -> String {
    format!("tsn-{node}-serve")
}

#[cfg(test)]
mod tests;
