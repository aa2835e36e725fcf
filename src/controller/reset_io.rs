//! The writes of a reset (see `reset` for the rules): Events, the eviction, the device delete and
//! the cleared state.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{EvictParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;
use tracing::info;

use super::Context;
use super::desired::{KEY_ID_ANNOTATION, MINTED_AT_ANNOTATION};
use super::reconcile::publish;
use super::reset::{RESET_PENDING_ANNOTATION, Reset, mark_annotations};
use super::status::Problem;
use crate::api::TailscaleNode;
use crate::tsapi::KeyApi;

pub(super) use super::status::Outcome;

fn problem(message: String) -> Problem {
    Problem {
        reason: "ResetFailed",
        message,
    }
}

async fn annotate(secrets: &Api<Secret>, secret: &str, annotations: serde_json::Value) -> Result<(), Problem> {
    let patch = json!({"metadata": {"annotations": annotations}});
    secrets
        .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| problem(format!("recording the reset on Secret {secret}: {e}")))
}

/// Carries out `steps` in namespace `ns`; `api` deletes devices (a wipe waits without it).
pub(super) async fn apply(
    ctx: &Context,
    node: &TailscaleNode,
    ns: &str,
    api: Option<&dyn KeyApi>,
    steps: Vec<Reset>,
) -> Outcome {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut out = Outcome::default();
    for step in steps {
        let result = match step {
            Reset::Refuse { pod, secret, marks } => {
                let note = format!(
                    "pod {pod} asked for a reset, but nothing would recreate it (it has no controller, e.g. a bare pod): delete and recreate it to get a new device"
                );
                publish(ctx, node, EventType::Warning, "ResetRefused", "Reset", &note).await;
                annotate(&secrets, &secret, json!(mark_annotations(&marks, None))).await
            }
            Reset::Evict {
                pod,
                secret,
                marks,
                pending_uid,
            } => {
                evict(
                    ctx,
                    node,
                    &secrets,
                    &pods,
                    &pod,
                    &secret,
                    &marks,
                    pending_uid.as_deref(),
                    &mut out,
                )
                .await
            }
            Reset::Wipe { pod, secret, device_id } => {
                let Some(api) = api else {
                    out.problems.push(problem(format!(
                        "resetting pod {pod}: the credentials to delete its device are unavailable"
                    )));
                    continue;
                };
                wipe(ctx, node, api, &secrets, &pod, &secret, device_id.as_deref(), &mut out).await
            }
        };
        if let Err(p) = result {
            out.problems.push(p);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn evict(
    ctx: &Context,
    node: &TailscaleNode,
    secrets: &Api<Secret>,
    pods: &Api<Pod>,
    pod: &str,
    secret: &str,
    marks: &super::reset::Marks,
    pending_uid: Option<&str>,
    out: &mut Outcome,
) -> Result<(), Problem> {
    // A StatefulSet's pod returns under the same name at once: the Secret must say "wipe me
    // first" before that, so it is written before the eviction.
    if pending_uid.is_some() {
        annotate(secrets, secret, json!(mark_annotations(marks, pending_uid))).await?;
    }
    match pods.evict(pod, &EvictParams::default()).await {
        Ok(_) => {
            out.changed = true;
            info!(pod, "evicted pod for a reset");
            let note = format!("reset of pod {pod}: evicted; it comes back as a new device under a new key");
            publish(ctx, node, EventType::Normal, "Reset", "Reset", &note).await;
            if pending_uid.is_none() {
                annotate(secrets, secret, json!(mark_annotations(marks, None))).await?;
            }
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 429 => {
            let note = format!(
                "reset of pod {pod} waits: a PodDisruptionBudget does not allow evicting it now; tailnode retries"
            );
            publish(ctx, node, EventType::Warning, "ResetBlocked", "Reset", &note).await;
            Ok(())
        }
        Err(e) => Err(problem(format!("evicting pod {pod} for its reset: {e}"))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn wipe(
    ctx: &Context,
    node: &TailscaleNode,
    api: &dyn KeyApi,
    secrets: &Api<Secret>,
    pod: &str,
    secret: &str,
    device_id: Option<&str>,
    out: &mut Outcome,
) -> Result<(), Problem> {
    if let Some(id) = device_id {
        ctx.fence.check()?;
        api.delete_device(id)
            .await
            .map_err(|e| problem(format!("deleting the device of pod {pod} for its reset: {e}")))?;
    }
    // All of tailscaled's state and the device's facts go; the key annotations too (a new key follows).
    let patch = json!({"metadata": {"annotations": {RESET_PENDING_ANNOTATION: null,
        KEY_ID_ANNOTATION: null, MINTED_AT_ANNOTATION: null}}, "data": null});
    secrets
        .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| problem(format!("clearing Secret {secret} for the reset of pod {pod}: {e}")))?;
    out.changed = true;
    info!(pod, "cleared replica state for a reset");
    let note = format!("reset of pod {pod}: its old device is deleted and its state cleared; a new key follows");
    publish(ctx, node, EventType::Normal, "Reset", "Reset", &note).await;
    Ok(())
}
