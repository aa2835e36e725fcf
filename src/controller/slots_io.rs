//! The writes of slot identity (see `slots` for the rules): claims on slot Secrets, the pods'
//! slot annotations, and the released-at marks.

use chrono::Utc;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::Context;
use super::desired::{POD_ANNOTATION, POD_UID_ANNOTATION};
use super::reconcile::publish;
use super::slots::{self, RELEASED_AT_ANNOTATION, SlotAction};
use super::status::Problem;
use crate::api::{SLOT_ANNOTATION, TailscaleNode, slot_secret_name};

use super::status::Outcome;

fn problem(message: String) -> Problem {
    Problem {
        reason: "SlotFailed",
        message,
    }
}

/// Why a write did not go through.
enum Miss {
    /// Someone else got there first (a conflict, or the object is gone): look again.
    Raced,
    /// Anything else: report it.
    Failed(String),
}

fn miss(what: String) -> impl FnOnce(kube::Error) -> Miss {
    move |e| match &e {
        kube::Error::Api(a) if a.code == 409 || a.code == 404 => Miss::Raced,
        _ => Miss::Failed(format!("{what}: {e}")),
    }
}

/// Carries out `actions` for `node` in namespace `ns`.
pub(super) async fn apply(ctx: &Context, node: &TailscaleNode, ns: &str, actions: Vec<SlotAction>) -> Outcome {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let name = node.metadata.name.as_deref().unwrap_or_default();
    let mut out = Outcome::default();
    let mut claimed = Vec::new();
    for action in actions {
        let result = match action {
            SlotAction::Claim {
                pod,
                uid,
                slot,
                resource_version,
            } => {
                let secret = slot_secret_name(name, slot);
                let taken = match resource_version {
                    None => {
                        let s = slots::slot_state_secret(node, &pod, &uid, slot);
                        secrets
                            .create(&PostParams::default(), &s)
                            .await
                            .map(|_| ())
                            .map_err(miss(format!("creating slot Secret {secret}")))
                    }
                    Some(rv) => {
                        // At the version read: a claim made meanwhile wins, this one looks again.
                        let patch = json!({"metadata": {"resourceVersion": rv, "annotations": {
                            POD_ANNOTATION: pod, POD_UID_ANNOTATION: uid, RELEASED_AT_ANNOTATION: null}}});
                        secrets
                            .patch(&secret, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                            .map(|_| ())
                            .map_err(miss(format!("claiming slot Secret {secret}")))
                    }
                };
                match taken {
                    Ok(()) => {
                        out.changed = true;
                        claimed.push(format!("{pod} took slot {slot}"));
                        annotate_pod(&pods, &pod, slot).await
                    }
                    Err(e) => Err(e),
                }
            }
            SlotAction::Annotate { pod, slot } => {
                out.changed = true;
                annotate_pod(&pods, &pod, slot).await
            }
            SlotAction::Release { secret } => {
                mark(&secrets, &secret, json!(Utc::now().to_rfc3339()), "releasing").await
            }
            SlotAction::Hold { secret } => mark(&secrets, &secret, json!(null), "holding").await,
        };
        match result {
            Ok(()) => {}
            Err(Miss::Raced) => out.changed = true,
            Err(Miss::Failed(m)) => out.problems.push(problem(m)),
        }
    }
    if !claimed.is_empty() {
        let note = claimed.join(", ");
        publish(ctx, node, EventType::Normal, "SlotClaimed", "Slot", &note).await;
    }
    out
}

/// Sets the pod's slot annotation, which its sidecar reads when it starts.
async fn annotate_pod(pods: &Api<Pod>, pod: &str, slot: u32) -> Result<(), Miss> {
    let patch = json!({"metadata": {"annotations": {SLOT_ANNOTATION: slot.to_string()}}});
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(miss(format!("annotating pod {pod} with its slot")))
}

async fn mark(secrets: &Api<Secret>, secret: &str, value: serde_json::Value, what: &str) -> Result<(), Miss> {
    let patch = json!({"metadata": {"annotations": {RELEASED_AT_ANNOTATION: value}}});
    secrets
        .patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(miss(format!("{what} slot Secret {secret}")))
}
