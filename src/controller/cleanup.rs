//! Cleanup of a TailscaleNode being deleted: every replica's device and Secret, then the Role,
//! RoleBinding and serve ConfigMap; only then does its finalizer go.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::desired::{self, SecretAction};
use super::reconcile::{delete_ignoring_missing, namespace_terminating, observe};
use super::secrets::{abandon_device, retire};
use super::status::Problem;
use super::{Context, Error, Step};
use crate::api::{TailscaleNode, serve_config_map_name};
use crate::tsapi::KeyApi;

/// The id of the unused key in the observed Secret `name`, if any.
pub(super) fn unused_key(secrets: &[Secret], name: &str) -> Option<String> {
    secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .and_then(desired::unused_key_id)
}

pub(super) async fn cleanup(node: Arc<TailscaleNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = node.namespace().unwrap_or_default();
    let key = node.name_any();
    let obs = observe(&node, &ctx).await?;
    let (_, actions) = desired::plan(
        &obs.replicas,
        &obs.secrets,
        &obs.statefulsets,
        &BTreeSet::new(),
        chrono::Duration::zero(),
        Utc::now(),
        true,
    );
    let api = match ctx
        .credentials
        .for_node(&ctx.client, &node, ctx.config.default_credentials.as_ref())
        .await
    {
        Ok(api) => Some(api),
        Err(_) => ctx.credentials.last_known(&node),
    };
    // With the namespace going away and no way to reach the API, waiting would keep the
    // namespace stuck forever: let go, and say so.
    let abandon = api.is_none() && namespace_terminating(&ctx, &ns).await;
    let mut problems = Vec::new();
    for action in actions {
        let SecretAction::Retire { secret, device_id } = action else {
            continue;
        };
        let result = retire_one(
            &ctx,
            &node,
            api.as_deref(),
            &obs.secrets,
            &secret,
            device_id.as_deref(),
            abandon,
        )
        .await;
        if let Err(p) = result {
            problems.push(p.message);
        }
    }
    if !problems.is_empty() {
        return Err(Error::Cleanup(problems.join("; ")));
    }
    let rbac = desired::rbac_name(&node);
    ctx.applied.forget_prefix(&format!("{ns}/"));
    if let Some(uid) = node.metadata.uid.as_deref() {
        ctx.rendered.forget(uid);
    }
    let teardown = Step::Teardown;
    delete_ignoring_missing(&Api::<Role>::namespaced(ctx.client.clone(), &ns), &rbac, teardown).await?;
    delete_ignoring_missing(
        &Api::<RoleBinding>::namespaced(ctx.client.clone(), &ns),
        &rbac,
        teardown,
    )
    .await?;
    let cm = serve_config_map_name(&key);
    delete_ignoring_missing(&Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns), &cm, teardown).await?;
    ctx.backoff.reset(&node);
    Ok(Action::await_change())
}

/// Retires the state Secret `secret` (its device first, and its unused key, as observed in
/// `observed`), or, with `abandon`, lets it go without reaching the key API.
pub(super) async fn retire_one(
    ctx: &Context,
    node: &TailscaleNode,
    api: Option<&dyn KeyApi>,
    observed: &[Secret],
    secret: &str,
    device_id: Option<&str>,
    abandon: bool,
) -> Result<(), Problem> {
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &node.namespace().unwrap_or_default());
    if abandon {
        return abandon_device(&secrets_api, secret).await;
    }
    let unused = unused_key(observed, secret);
    retire(ctx, node, api, &secrets_api, secret, device_id, unused.as_deref()).await
}
