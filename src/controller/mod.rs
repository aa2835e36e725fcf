//! The TailscaleNode controller: per-replica state Secrets and keys, RBAC, serve ConfigMap,
//! device cleanup and status. `desired` and `status` are pure; `reconcile` does the I/O.

pub mod applied;
pub mod cache;
mod cleanup;
pub mod credentials;
pub mod desired;
pub mod election;
pub mod fence;
pub mod fenced;
pub mod gate;
pub mod leader;
pub mod reconcile;
mod rendered;
pub mod reset;
mod reset_io;
mod secrets;
pub mod slots;
mod slots_io;
pub mod status;
pub mod synced;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{NODE_LABEL, TailscaleNode};
use crate::metrics::{Metrics, ReconcileLabels};
use credentials::{CredentialCache, DefaultCredentials};

/// The reconcile step a Kubernetes API call belonged to; its name is the bounded `reason` of
/// metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Reading StatefulSets, pods and state Secrets.
    Observe,
    /// Creating (or checking) a replica's state Secret.
    CreateSecret,
    /// Applying the Role and RoleBinding.
    Rbac,
    /// Applying or deleting the serve ConfigMap.
    ServeConfig,
    /// Removing a used key from a registered replica's Secret.
    StripKey,
    /// Writing the TailscaleNode's status.
    Status,
    /// Deleting the Role, RoleBinding and ConfigMap of a deleted node.
    Teardown,
}

impl Step {
    /// Bounded label.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Observe => "observe",
            Step::CreateSecret => "create_secret",
            Step::Rbac => "rbac",
            Step::ServeConfig => "serve_config",
            Step::StripKey => "strip_key",
            Step::Status => "status",
            Step::Teardown => "teardown",
        }
    }
}

/// Reconcile errors; `reason()` is the bounded label of metrics, logs and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call of one step failed.
    #[error("{}: kubernetes API: {source}", step.as_str())]
    Kube {
        /// The step.
        step: Step,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The finalizer helper failed (wraps the inner error).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Cleanup of replicas failed; the finalizer stays until it succeeds.
    #[error("cleanup: {0}")]
    Cleanup(String),
}

impl Error {
    /// A closure for `map_err` that tags an API error with its step.
    pub fn at(step: Step) -> impl Fn(kube::Error) -> Error {
        move |source| Error::Kube { step, source }
    }

    /// Bounded label for metrics: the failed step, seen through the finalizer wrapper.
    pub fn reason(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube { step, .. } => step.as_str(),
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.reason(),
                F::AddFinalizer(_) => "add_finalizer",
                F::RemoveFinalizer(_) => "remove_finalizer",
                _ => "finalizer",
            },
            Error::Cleanup(_) => "cleanup",
        }
    }
}

/// Controller settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a minted key stays valid unused (and how long before an unused one is replaced).
    pub key_ttl: Duration,
    /// How long a slot (`replicaIdentity: slots`) without a pod keeps its device.
    pub slot_grace: Duration,
    /// The cluster facts `status.injection` is rendered with (`--policy-injection`); `None`: no
    /// `status.injection`.
    pub policy_injection: Option<crate::inject::ClusterFacts>,
    /// Operator-wide default credentials.
    pub default_credentials: Option<DefaultCredentials>,
}

/// Per-object exponential backoff with a cap, reset on success.
#[derive(Default)]
pub struct Backoff {
    attempts: Mutex<HashMap<ObjectRef<TailscaleNode>, u32>>,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(500);
    const CAP: Duration = Duration::from_secs(60);

    /// The delay before the next attempt for `node` (doubling each time).
    pub fn next(&self, node: &TailscaleNode) -> Duration {
        let mut map = match self.attempts.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let n = map.entry(ObjectRef::from_obj(node)).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    /// Forget the failures of `node`.
    pub fn reset(&self, node: &TailscaleNode) {
        if let Ok(mut map) = self.attempts.lock() {
            map.remove(&ObjectRef::from_obj(node));
        }
    }
}

/// PURE: the delay after `attempt` consecutive failures: 0.5 s, 1 s, 2 s, ... capped at 60 s.
pub fn backoff_delay(attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    Backoff::BASE.saturating_mul(factor).min(Backoff::CAP)
}

/// The backoff of the watches (the controller's triggers, the webhook's caches) after a failed
/// list or watch: 250 ms doubling to at most 2 s, back to the start after any success. Short,
/// because the usual failure is an apiserver that restarted (its custom resources answer 404 for a
/// few seconds after the core ones are back), and kube-runtime's default (up to 30 s, one backoff
/// shared by every trigger) kept reconciles stalled for half a minute after such an outage.
#[derive(Debug, Default, Clone)]
pub struct WatchBackoff {
    failures: u32,
}

impl WatchBackoff {
    const BASE: Duration = Duration::from_millis(250);
    const CAP: Duration = Duration::from_secs(2);
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let factor = 2u32.saturating_pow(self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        Some(Self::BASE.saturating_mul(factor).min(Self::CAP))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Shared state of the reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Pods labelled `tailnode.dev/node`, from a reflector, stripped by `cache::strip_pod`.
    pub pods: Store<Pod>,
    /// Whether `pods` has synced; many reconciles may wait on it at once.
    pub pods_synced: synced::Synced,
    /// Namespaces' metadata (is one being deleted?), from a reflector.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Key APIs per credential.
    pub credentials: CredentialCache,
    /// Settings.
    pub config: Config,
    /// Per-object backoff.
    pub backoff: Backoff,
    /// Checked right before writes that must come from the leader only.
    pub fence: fence::Fence,
    /// What was last written (Role, RoleBinding, serve ConfigMap), to skip identical writes.
    pub applied: applied::Applied,
    /// Each node's `status.injection` (`--policy-injection`), rendered once per generation.
    pub rendered: rendered::Rendered,
}

fn error_policy(node: Arc<TailscaleNode>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(node = %node.name_any(), reason = err.reason(), error = %err, "reconcile failed");
    ctx.metrics
        .reconciles
        .get_or_create(&ReconcileLabels { result: err.reason() })
        .inc();
    Action::requeue(ctx.backoff.next(&node))
}

/// How many TailscaleNodes reconcile at once. Each holds its namespace's replicas and Secrets
/// while it runs, so this bounds the controller's transient memory; a reconcile mostly waits on
/// the apiserver, so 16 keep both cores busy at 500 nodes.
pub const RECONCILE_CONCURRENCY: u16 = 16;

/// Runs the controller until `shutdown` fires.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    credentials: CredentialCache,
    config: Config,
    fence: fence::Fence,
    shutdown: CancellationToken,
) {
    // Every apiserver write of the controller passes only while this replica leads.
    let client = fenced::fenced(client, fence.clone());
    let nodes: Api<TailscaleNode> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());
    let secrets: Api<PartialObjectMeta<Secret>> = Api::all(client.clone());
    let labelled = watcher::Config::default().labels(NODE_LABEL);
    let (pods, writer) = kube::runtime::reflector::store();
    let pods_synced = synced::Synced::of(pods.clone());
    let pod_stream = kube::runtime::reflector(writer, watcher(pods_api, labelled.clone()).modify(cache::strip_pod))
        // Deletions too: a deleted pod's device leaves the tailnet without waiting for a requeue.
        .touched_objects();
    let (namespaces, ns_writer) = kube::runtime::reflector::store();
    let ns_meta: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let ns_stream = kube::runtime::reflector(
        ns_writer,
        watcher(ns_meta, watcher::Config::default())
            .modify(|n| n.metadata.managed_fields = None)
            .backoff(WatchBackoff::default()),
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = ns_stream.for_each(|_| async {}) => {}
            _ = stop.cancelled() => {}
        }
    });
    let ctx = Arc::new(Context {
        namespaces,
        recorder: Recorder::new(client.clone(), Reporter::from("tailnode")),
        client,
        pods,
        pods_synced,
        metrics: metrics.clone(),
        credentials,
        config,
        backoff: Backoff::default(),
        fence,
        applied: applied::Applied::default(),
        rendered: rendered::Rendered::default(),
    });
    let to_node = |obj: &dyn Fn() -> (Option<String>, Option<String>)| {
        let (label, ns) = obj();
        Some(ObjectRef::<TailscaleNode>::new(&label?).within(&ns?))
    };
    info!("controller starting");
    // The nodes' cache without their managedFields (half of a node's size, never read).
    let (node_store, node_writer) = kube::runtime::reflector::store();
    let node_stream = kube::runtime::reflector(
        node_writer,
        watcher(nodes, watcher::Config::default())
            .modify(|n: &mut TailscaleNode| n.metadata.managed_fields = None)
            .backoff(WatchBackoff::default()),
    )
    .touched_objects();
    Controller::for_stream(node_stream, node_store)
        .trigger_backoff(WatchBackoff::default())
        .watches_stream(pod_stream, move |p: Pod| {
            to_node(&|| (p.labels().get(NODE_LABEL).cloned(), p.namespace()))
        })
        // Any change of a state Secret triggers its node; its metadata says which.
        .watches_stream(
            watcher(secrets, labelled).touched_objects(),
            move |s: PartialObjectMeta<Secret>| to_node(&|| (s.labels().get(NODE_LABEL).cloned(), s.namespace())),
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|res| {
            let metrics = metrics.clone();
            async move {
                if res.is_ok() {
                    metrics
                        .reconciles
                        .get_or_create(&ReconcileLabels { result: "ok" })
                        .inc();
                }
            }
        })
        .await;
    info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_names_the_failed_step_through_the_finalizer() {
        let api = || {
            kube::Error::Api(Box::new(
                kube::core::Status::failure("nope", "Forbidden").with_code(403),
            ))
        };
        let inner = Error::at(Step::Rbac)(api());
        assert_eq!(inner.reason(), "rbac");
        assert!(inner.to_string().starts_with("rbac: kubernetes API"));
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(inner)));
        assert_eq!(wrapped.reason(), "rbac");
        let cleanup = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::CleanupFailed(Error::at(
            Step::Teardown,
        )(
            api()
        ))));
        assert_eq!(cleanup.reason(), "teardown");
        let add = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::AddFinalizer(api())));
        assert_eq!(add.reason(), "add_finalizer");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let delays: Vec<_> = (1..=9).map(backoff_delay).collect();
        assert_eq!(delays[0], Duration::from_millis(500));
        assert_eq!(delays[1], Duration::from_secs(1));
        assert_eq!(delays[4], Duration::from_secs(8));
        assert_eq!(delays[8], Duration::from_secs(60));
        assert_eq!(backoff_delay(1000), Duration::from_secs(60));
    }

    #[test]
    fn watch_backoff_is_short_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let mut b = WatchBackoff::default();
        let ms: Vec<u128> = b.by_ref().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn backoff_is_per_object_and_resets() {
        let b = Backoff::default();
        let mut a: TailscaleNode = TailscaleNode::new("a", Default::default());
        a.metadata.namespace = Some("ns".into());
        let mut other = a.clone();
        other.metadata.name = Some("b".into());
        assert_eq!(b.next(&a), Duration::from_millis(500));
        assert_eq!(b.next(&a), Duration::from_secs(1));
        assert_eq!(b.next(&other), Duration::from_millis(500));
        b.reset(&a);
        assert_eq!(b.next(&a), Duration::from_millis(500));
    }
}
