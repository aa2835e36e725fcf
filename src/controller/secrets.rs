//! Writes to state Secrets: create them (refusing Secrets tailnode does not own), mint a key into
//! one, retire one (device first), release one. Each returns a `Problem` the status shows.

use std::collections::BTreeSet;

use futures::StreamExt;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::desired::{self, DEVICE_FINALIZER, KEY_ID_ANNOTATION, MINTED_AT_ANNOTATION, Replica};
use super::reconcile::publish;
use super::status::Problem;
use super::{Context, Error, Step};
use crate::api::TailscaleNode;
use crate::metrics::ApiLabels;
use crate::tsapi::{KeyApi, MintRequest};

/// Creates the missing state Secrets. Returns the names that already exist but are not
/// tailnode's for this node and pod (a 409 on a Secret someone else made): those are never used.
pub(super) async fn create_state_secrets(
    node: &TailscaleNode,
    to_create: &[Replica],
    secrets: &Api<Secret>,
) -> Result<BTreeSet<String>, Error> {
    let mut foreign = BTreeSet::new();
    for r in to_create {
        match secrets
            .create(&PostParams::default(), &desired::state_secret(node, r))
            .await
        {
            Ok(_) => info!(secret = %r.secret, "created state secret"),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = secrets
                    .get_opt(&r.secret)
                    .await
                    .map_err(Error::at(Step::CreateSecret))?;
                if !existing.as_ref().is_some_and(|s| desired::owned_by(s, node, &r.pod)) {
                    foreign.insert(r.secret.clone());
                }
            }
            Err(e) => return Err(Error::at(Step::CreateSecret)(e)),
        }
    }
    Ok(foreign)
}

/// The Problem (and Event) for a replica whose Secret name is taken by a Secret not tailnode's.
pub(super) async fn refuse_foreign(ctx: &Context, node: &TailscaleNode, secret: &str) -> Problem {
    let message = format!(
        "Secret {secret} already exists and is not tailnode's state Secret for this replica (it lacks the label {}={} and annotation {}); tailnode will not use or grant it: delete or rename it",
        crate::api::NODE_LABEL,
        node.name_any(),
        desired::POD_ANNOTATION,
    );
    warn!(secret, "state secret name taken by a foreign secret");
    publish(
        ctx,
        node,
        EventType::Warning,
        "SecretConflict",
        "CreateSecret",
        &message,
    )
    .await;
    Problem {
        reason: "SecretConflict",
        message,
    }
}

fn describe(node: &TailscaleNode, pod: &str) -> String {
    format!("tailnode {} {}", node.name_any(), pod)
}

/// Keys minted at once by one reconcile. One: a crash (SIGKILL, OOM, node loss) between the API's
/// answer and the Secret write loses the keys in flight, and the API completes a request whose
/// client died; with one in flight a crash costs at most one unused key (the crash-chaos test
/// holds extra mints to at most the number of crashes). The Secret write follows each mint at
/// once, so the window is one API round trip.
const MINT_CONCURRENCY: usize = 1;

/// A failed mint: the problem to report, and how long the API asked us to wait, if it did.
pub(super) struct MintFailed {
    pub problem: Problem,
    pub retry_after: Option<std::time::Duration>,
}

impl From<Problem> for MintFailed {
    fn from(problem: Problem) -> Self {
        MintFailed {
            problem,
            retry_after: None,
        }
    }
}

/// What [`mint_all`] did.
#[derive(Default)]
pub(super) struct Minted {
    /// The Secrets whose mint failed, and why.
    pub failed: Vec<(String, MintFailed)>,
    /// The Secrets whose pod's gate was opened right after its key was written.
    pub opened: BTreeSet<String>,
    /// Opening a gate failed.
    pub problems: Vec<Problem>,
}

/// Mints a key for each `(secret, pod)`, [`MINT_CONCURRENCY`] at a time. The gate of a pod in
/// `ready_once_keyed` (gated, grant confirmed) opens as soon as its key is written, so the node
/// starts the first pods while later keys are being minted. One Event tells of every key minted
/// (one per key would be an apiserver write per pod).
pub(super) async fn mint_all(
    ctx: &Context,
    node: &TailscaleNode,
    api: &dyn KeyApi,
    secrets: &Api<Secret>,
    wanted: impl Iterator<Item = (String, String)>,
    ready_once_keyed: &[&Replica],
) -> Minted {
    let ns = node.namespace().unwrap_or_default();
    let results: Vec<_> = futures::stream::iter(wanted)
        .map(|(secret, pod)| {
            let ns = ns.as_str();
            async move {
                let result = mint(ctx, node, api, secrets, &secret, &pod).await;
                let opened = match ready_once_keyed.iter().find(|r| r.secret == secret) {
                    Some(r) if result.is_ok() => Some(super::gate::open(&ctx.client, ns, &[*r]).await),
                    _ => None,
                };
                (secret, pod, result, opened)
            }
        })
        .buffer_unordered(MINT_CONCURRENCY)
        .collect()
        .await;
    let mut minted = Vec::new();
    let mut out = Minted::default();
    for (secret, pod, result, opened) in results {
        match opened {
            Some(Ok(1)) => {
                out.opened.insert(secret.clone());
            }
            Some(Err(p)) => out.problems.push(p),
            _ => {}
        }
        match result {
            Ok(()) => minted.push(pod),
            Err(f) => out.failed.push((secret, f)),
        }
    }
    if let Some(note) = minted_note(minted) {
        publish(ctx, node, EventType::Normal, "KeyMinted", "Mint", &note).await;
    }
    out
}

/// PURE: the Event note for keys minted in one pass, naming the first pods; None for none.
pub fn minted_note(mut pods: Vec<String>) -> Option<String> {
    const NAMED: usize = 5;
    pods.sort();
    let (first, rest) = pods.split_at(pods.len().min(NAMED));
    let names = first.join(", ");
    match (first.len(), rest.len()) {
        (0, _) => None,
        (1, _) => Some(format!(
            "minted a single-use auth key for pod {names} into its state Secret"
        )),
        (n, 0) => Some(format!("minted single-use auth keys for {n} pods: {names}")),
        (n, more) => Some(format!(
            "minted single-use auth keys for {} pods: {names} and {more} more",
            n + more
        )),
    }
}

pub(super) async fn mint(
    ctx: &Context,
    node: &TailscaleNode,
    api: &dyn KeyApi,
    secrets: &Api<Secret>,
    secret: &str,
    pod: &str,
) -> Result<(), MintFailed> {
    let req = MintRequest {
        description: describe(node, pod),
        tags: node.spec.tags.clone(),
        ephemeral: node.spec.ephemeral,
        expiry: ctx.config.key_ttl,
    };
    let labels = |outcome| ApiLabels {
        api: api.kind(),
        outcome,
    };
    ctx.fence.check()?;
    match api.mint(&req).await {
        Ok(minted) => {
            ctx.metrics.key_mints.get_or_create(&labels("ok")).inc();
            // The key's id (not the key) is kept to revoke it if it is never used.
            let patch = json!({
                "metadata": {"annotations": {
                    MINTED_AT_ANNOTATION: Utc::now().to_rfc3339(),
                    KEY_ID_ANNOTATION: minted.id,
                }},
                "stringData": {"authkey": minted.key},
            });
            secrets
                .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| Problem {
                    reason: "SecretWriteFailed",
                    message: format!("writing the key into Secret {secret}: {e}"),
                })?;
            info!(secret, api = api.kind(), "minted auth key");
            Ok(())
        }
        Err(e) => {
            ctx.metrics.key_mints.get_or_create(&labels(e.reason())).inc();
            warn!(secret, api = api.kind(), reason = e.reason(), "minting auth key failed");
            let reason = match e.reason() {
                "unauthorized" => "ApiUnauthorized",
                "bad_request" => "ApiRejected",
                "rate_limited" => "ApiRateLimited",
                _ => "ApiUnavailable",
            };
            let message = format!("minting a key for pod {pod}: {e}");
            publish(ctx, node, EventType::Warning, "MintFailed", "Mint", &message).await;
            let retry_after = match e {
                crate::tsapi::ApiError::RateLimited { retry_after } => retry_after,
                _ => None,
            };
            Err(MintFailed {
                problem: Problem { reason, message },
                retry_after,
            })
        }
    }
}

/// Revokes a key that was never used (replaced, or its replica gone), where the API can. Best
/// effort: the key expires by itself anyway, so a failure is logged and reported as an Event.
pub(super) async fn revoke(ctx: &Context, node: &TailscaleNode, api: &dyn KeyApi, secret: &str, key_id: &str) {
    if ctx.fence.check().is_err() {
        return;
    }
    match api.revoke_key(key_id).await {
        Ok(true) => info!(secret, api = api.kind(), "revoked unused auth key"),
        Ok(false) => {}
        Err(e) => {
            warn!(
                secret,
                api = api.kind(),
                reason = e.reason(),
                "revoking unused auth key failed"
            );
            let note = format!("revoking the unused key {key_id} of Secret {secret}: {e}");
            publish(ctx, node, EventType::Warning, "RevokeFailed", "Revoke", &note).await;
        }
    }
}

/// Deletes the replica's device (if it has one and the API can) or revokes its unused key, then
/// its Secret.
pub(super) async fn retire(
    ctx: &Context,
    node: &TailscaleNode,
    api: Option<&dyn KeyApi>,
    secrets: &Api<Secret>,
    secret: &str,
    device_id: Option<&str>,
    unused_key: Option<&str>,
) -> Result<(), Problem> {
    if let (Some(api), Some(key_id)) = (api, unused_key) {
        revoke(ctx, node, api, secret, key_id).await;
    }
    if let Some(id) = device_id {
        let Some(api) = api else {
            return Err(Problem {
                reason: "CleanupBlocked",
                message: format!("cannot delete device of Secret {secret}: credentials unusable"),
            });
        };
        let labels = |outcome| ApiLabels {
            api: api.kind(),
            outcome,
        };
        ctx.fence.check()?;
        match api.delete_device(id).await {
            Ok(deleted) => {
                ctx.metrics.device_deletions.get_or_create(&labels("ok")).inc();
                info!(secret, api = api.kind(), "deleted device");
                let note = if deleted {
                    format!("deleted the device of Secret {secret}")
                } else {
                    format!("static auth key: the device of Secret {secret} must be removed by hand")
                };
                publish(ctx, node, EventType::Normal, "DeviceDeleted", "Cleanup", &note).await;
            }
            Err(e) => {
                ctx.metrics.device_deletions.get_or_create(&labels(e.reason())).inc();
                let message = format!("deleting the device of Secret {secret}: {e}");
                publish(ctx, node, EventType::Warning, "CleanupFailed", "Cleanup", &message).await;
                return Err(Problem {
                    reason: "CleanupFailed",
                    message,
                });
            }
        }
    }
    ctx.fence.check()?;
    release_secret(secrets, secret, Some(device_id)).await
}

/// Removes the device finalizer from a state Secret and deletes it. With `deleted_device`, the
/// Secret must not have registered any other device than that one (already deleted) meanwhile: a
/// sidecar that logged in between the reconcile's read and now would otherwise leave its device
/// behind. Every write is guarded by the resourceVersion it was decided on.
async fn release_secret(
    secrets: &Api<Secret>,
    secret: &str,
    deleted_device: Option<Option<&str>>,
) -> Result<(), Problem> {
    let write_err = |e: kube::Error| Problem {
        reason: "SecretWriteFailed",
        message: format!("removing Secret {secret}: {e}"),
    };
    let current = secrets.get_opt(secret).await.map_err(write_err)?;
    if let Some(mut s) = current {
        if let Some(deleted) = deleted_device {
            let now = desired::secret_value(&s, "device_id");
            if now.is_some() && now.as_deref() != deleted {
                return Err(Problem {
                    reason: "DeviceRegistered",
                    message: format!(
                        "Secret {secret} registered a device while being released; deleting that device first"
                    ),
                });
            }
        }
        let rest: Vec<String> = s
            .finalizers()
            .iter()
            .filter(|f| f.as_str() != DEVICE_FINALIZER)
            .cloned()
            .collect();
        if rest.len() != s.finalizers().len() {
            let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": s.resource_version()}});
            s = secrets
                .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(write_err)?;
        }
        if s.metadata.deletion_timestamp.is_none() {
            let dp = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    resource_version: s.resource_version(),
                    uid: s.uid(),
                }),
                ..Default::default()
            };
            match secrets.delete(secret, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(write_err(e)),
            }
        }
    }
    Ok(())
}

/// Releases a state Secret whose device cannot be deleted (no usable credentials while the
/// namespace is being deleted). The device stays in the tailnet until removed by hand.
pub(super) async fn abandon_device(secrets: &Api<Secret>, secret: &str) -> Result<(), Problem> {
    warn!(
        secret,
        "namespace is terminating and credentials are unusable; leaving the device in the tailnet"
    );
    release_secret(secrets, secret, None).await
}

#[cfg(test)]
mod tests {
    use super::minted_note;

    #[test]
    fn one_event_names_the_first_pods_of_a_pass() {
        let pods = |n: usize| (0..n).map(|i| format!("p{i}")).collect::<Vec<_>>();
        assert_eq!(minted_note(vec![]), None);
        assert_eq!(
            minted_note(pods(1)).as_deref(),
            Some("minted a single-use auth key for pod p0 into its state Secret")
        );
        assert_eq!(
            minted_note(vec!["b".into(), "a".into()]).as_deref(),
            Some("minted single-use auth keys for 2 pods: a, b")
        );
        assert_eq!(
            minted_note(pods(8)).as_deref(),
            Some("minted single-use auth keys for 8 pods: p0, p1, p2, p3, p4 and 3 more")
        );
    }
}
