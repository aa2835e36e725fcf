//! The I/O shell of the controller: read, call the pure functions in `desired`/`status`, write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::applied;
use super::desired::{self, NODE_FINALIZER, SecretAction};
use super::gate;
use super::secrets::{self, mint, mint_all, revoke};
use super::status::{self, Findings};
use super::{Context, Error, Step};
use crate::api::{NODE_LABEL, TailscaleNode, serve_config_map_name};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "tailnode";

/// Reconciles one TailscaleNode behind its finalizer.
pub async fn reconcile(node: Arc<TailscaleNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = node.namespace().unwrap_or_default();
    let api: Api<TailscaleNode> = Api::namespaced(ctx.client.clone(), &ns);
    let started = std::time::Instant::now();
    let result = finalizer(&api, NODE_FINALIZER, node, |event| async {
        match event {
            Finalizer::Apply(n) => apply(n, ctx.clone()).await,
            Finalizer::Cleanup(n) => super::cleanup::cleanup(n, ctx.clone()).await,
        }
    })
    .await;
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    match result {
        // A queued reconcile of a node whose finalizer was already removed: it is gone, done.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(e))) if e.code == 404 => {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

pub(super) struct Observed {
    pub replicas: Vec<desired::Replica>,
    pub secrets: Vec<Secret>,
    pub statefulsets: BTreeMap<String, i32>,
    pub slots: super::slots::SlotPlan,
}

pub(super) async fn observe(node: &TailscaleNode, ctx: &Context) -> Result<Observed, Error> {
    let ns = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let pods = ctx.pods.state();
    let in_namespace = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        .map(|p| p.as_ref());
    let replicas = desired::replicas(node, in_namespace.clone());
    let secrets = list_secrets(ctx, &ns, &name).await?;
    let grace = chrono::Duration::from_std(ctx.config.slot_grace).unwrap_or_else(|_| chrono::Duration::minutes(10));
    let slots = super::slots::plan(node, in_namespace, &secrets, grace, Utc::now());
    let mut statefulsets = BTreeMap::new();
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let named: BTreeSet<String> = secrets
        .iter()
        .filter_map(|s| s.annotations().get(desired::STATEFULSET_ANNOTATION).cloned())
        .collect();
    for sts in named {
        if let Some(s) = sts_api.get_opt(&sts).await.map_err(Error::at(Step::Observe))? {
            statefulsets.insert(sts, s.spec.replicas.unwrap_or(1));
        }
    }
    Ok(Observed {
        replicas,
        secrets,
        statefulsets,
        slots,
    })
}

async fn list_secrets(ctx: &Context, ns: &str, node: &str) -> Result<Vec<Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{NODE_LABEL}={node}"));
    Ok(api.list(&lp).await.map_err(Error::at(Step::Observe))?.items)
}

async fn apply(node: Arc<TailscaleNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = node.namespace().unwrap_or_default();
    let key = node.name_any();
    // Until the pod cache has synced, every existing replica would look gone.
    if !pods_synced(&ctx).await {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    // Nothing can be created in a namespace that is going away; its deletion reaches the node.
    if namespace_terminating(&ctx, &ns).await {
        return Ok(Action::await_change());
    }
    let obs = observe(&node, &ctx).await?;
    // Slots change hands first: a pod that took one is a replica from the next look on.
    if !obs.slots.actions.is_empty() {
        let done = super::slots_io::apply(&ctx, &node, &ns, obs.slots.actions.clone()).await;
        if done.changed || !done.problems.is_empty() {
            for p in &done.problems {
                publish(&ctx, &node, EventType::Warning, p.reason, "Slot", &p.message).await;
            }
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    let ttl = chrono::Duration::from_std(ctx.config.key_ttl).unwrap_or_else(|_| chrono::Duration::minutes(10));
    let (to_create, actions) = desired::plan(
        &obs.replicas,
        &obs.secrets,
        &obs.statefulsets,
        &obs.slots.kept,
        ttl,
        Utc::now(),
        false,
    );
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // With nothing to create, mint, replace, strip or retire, the Secrets read above are still
    // the Secrets as they are (most reconciles: a Secret's own update woke the node up).
    let writes_secrets = !to_create.is_empty() || !actions.is_empty();

    // Secrets first (empty), then the Role naming them, so the sidecar can read its Secret. A
    // Secret of that name that is not tailnode's is never used nor granted.
    let foreign = secrets::create_state_secrets(&node, &to_create, &secrets_api).await?;
    let retiring: BTreeSet<&str> = actions
        .iter()
        .filter_map(|a| match a {
            SecretAction::Retire { secret, .. } => Some(secret.as_str()),
            _ => None,
        })
        .collect();
    let mut names: BTreeSet<String> = obs
        .replicas
        .iter()
        .map(|r| r.secret.clone())
        .filter(|n| !foreign.contains(n))
        .collect();
    names.extend(
        obs.secrets
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .filter(|n| !retiring.contains(n.as_str())),
    );
    let accounts: BTreeSet<String> = obs.replicas.iter().map(|r| r.service_account.clone()).collect();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let rbac = desired::rbac_name(&node);
    let role = desired::role(&node, &names);
    apply_once(
        &ctx,
        &Api::<Role>::namespaced(ctx.client.clone(), &ns),
        &rbac,
        &role,
        Step::Rbac,
    )
    .await?;
    let binding = desired::role_binding(&node, &accounts);
    let bindings = Api::<RoleBinding>::namespaced(ctx.client.clone(), &ns);
    apply_once(&ctx, &bindings, &rbac, &binding, Step::Rbac).await?;
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let cm_name = serve_config_map_name(&key);
    match desired::serve_config_map(&node) {
        Some(cm) => apply_once(&ctx, &cm_api, &cm_name, &cm, Step::ServeConfig).await?,
        None => {
            // Remembered as "absent" like a write, so a node without serve does not delete on
            // every reconcile.
            let seen = applied_key(&ns, "ConfigMap", &cm_name);
            let absent = applied::digest(&());
            if !ctx.applied.is_current(&seen, &absent, std::time::Instant::now()) {
                delete_ignoring_missing(&cm_api, &cm_name, Step::ServeConfig).await?;
                ctx.applied.record(&seen, absent, std::time::Instant::now());
            }
        }
    }

    let mut findings = Findings {
        restart_needed: desired::restart_needed(&node, &obs.replicas),
        ..Default::default()
    };
    let mut failed = BTreeSet::new();
    // A gated pod whose key expired unused gets a new one only once the apiserver confirms its
    // grant, right before its gate opens: a pod that cannot start does not burn a key per key
    // lifetime. Its first key is minted at once (the gate opens moments later, when the RBAC
    // cache has the grant), which keeps pod-to-key fast.
    let gated: BTreeSet<&str> = obs
        .replicas
        .iter()
        .filter(|r| r.gate.is_some())
        .map(|r| r.secret.as_str())
        .collect();
    let granted = match gate::confirm(&ctx.client, &ns, &gate::grantable(&obs.replicas, &names, &accounts)).await {
        Ok(granted) => granted,
        Err(p) => {
            findings.failures.push(p);
            BTreeSet::new()
        }
    };
    let may_replace = |secret: &str| !gated.contains(secret) || granted.contains(secret);
    for secret in &foreign {
        failed.insert(secret.clone());
        findings
            .failures
            .push(secrets::refuse_foreign(&ctx, &node, secret).await);
    }
    let api = match ctx
        .credentials
        .for_node(&ctx.client, &node, ctx.config.default_credentials.as_ref())
        .await
    {
        Ok(api) => Some(api),
        Err(p) => {
            if actions
                .iter()
                .any(|a| matches!(a, SecretAction::Mint { .. } | SecretAction::Replace { .. }))
            {
                publish(&ctx, &node, EventType::Warning, p.reason, "Credentials", &p.message).await;
            }
            findings.credentials = Some(p);
            None
        }
    };
    // Resets on demand: evict; once the old pod is gone, wipe its state. Then look again.
    let node_reset = node
        .annotations()
        .get(super::reset::RESET_ANNOTATION)
        .map(String::as_str);
    let resets = super::reset::plan(node_reset, &obs.replicas, &obs.secrets);
    if !resets.is_empty() {
        let done = super::reset_io::apply(&ctx, &node, &ns, api.as_deref(), resets).await;
        findings.failures.extend(done.problems);
        if done.changed {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    // First keys (see `secrets::MINT_CONCURRENCY`), then the rest in order.
    let (mints, actions): (Vec<_>, Vec<_>) = actions
        .into_iter()
        .partition(|a| matches!(a, SecretAction::Mint { .. }));
    let ready_once_keyed: Vec<&desired::Replica> = obs
        .replicas
        .iter()
        .filter(|r| r.gate.is_some() && granted.contains(&r.secret))
        .collect();
    let mut opened_early = BTreeSet::new();
    if let Some(api) = &api {
        let wanted = mints.into_iter().filter_map(|a| match a {
            SecretAction::Mint { secret, pod } if !foreign.contains(&secret) => Some((secret, pod)),
            _ => None,
        });
        let minted = mint_all(&ctx, &node, api.as_ref(), &secrets_api, wanted, &ready_once_keyed).await;
        for (secret, f) in minted.failed {
            failed.insert(secret);
            findings.mint_failed(f.problem, f.retry_after);
        }
        findings.failures.extend(minted.problems);
        opened_early = minted.opened;
    }
    for action in actions {
        match action {
            SecretAction::Mint { .. } => {}
            SecretAction::Replace {
                secret,
                pod,
                old_key_id,
            } => {
                // A static key has no lifetime tailnode knows of: nothing to replace.
                let Some(api) = api.as_ref().filter(|a| a.kind() != "static") else {
                    continue;
                };
                if !may_replace(&secret) {
                    continue;
                }
                match mint(&ctx, &node, api.as_ref(), &secrets_api, &secret, &pod).await {
                    Ok(()) => {
                        if let Some(id) = &old_key_id {
                            revoke(&ctx, &node, api.as_ref(), &secret, id).await;
                        }
                        let note = format!("the key of pod {pod} expired unused; replaced it in Secret {secret}");
                        publish(&ctx, &node, EventType::Normal, "KeyReplaced", "Mint", &note).await;
                    }
                    Err(f) => {
                        failed.insert(secret);
                        findings.mint_failed(f.problem, f.retry_after);
                    }
                }
            }
            SecretAction::StripKey { secret } => {
                let patch = json!({"data": {"authkey": null}});
                secrets_api
                    .patch(&secret, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(Error::at(Step::StripKey))?;
            }
            SecretAction::Retire { secret, device_id } => {
                // Never retire on the cache's word alone: ask the apiserver whether the pod is gone.
                if pod_still_exists(&ctx, &ns, &obs.secrets, &secret).await? {
                    continue;
                }
                let api = api.clone().or_else(|| ctx.credentials.last_known(&node));
                let abandon = api.is_none() && namespace_terminating(&ctx, &ns).await;
                let (observed, device) = (&obs.secrets, device_id.as_deref());
                let result =
                    super::cleanup::retire_one(&ctx, &node, api.as_deref(), observed, &secret, device, abandon).await;
                if let Err(p) = result {
                    findings.failures.push(p);
                }
            }
        }
    }

    // Status from the Secrets as they are now; sidecars whose credentials are in place may start.
    let secrets = if writes_secrets {
        list_secrets(&ctx, &ns, &key).await?
    } else {
        obs.secrets
    };
    let now = Utc::now();
    let mut ready = gate::to_open(&obs.replicas, &secrets, &granted, ttl, now);
    ready.retain(|r| !opened_early.contains(&r.secret));
    let still_gated = match gate::open(&ctx.client, &ns, &ready).await {
        Ok(opened) => gated.len().saturating_sub(opened + opened_early.len()),
        Err(p) => {
            findings.failures.push(p);
            0
        }
    };
    let replicas = desired::replica_statuses(&obs.replicas, &secrets, &failed);
    // Each registered pod shows its tailnet name and IPs in its own annotations.
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for (pod, annotations) in desired::tailnet_annotations(&obs.replicas, &replicas) {
        let patch = json!({"metadata": {"annotations": annotations}});
        match pods_api
            .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Gone meanwhile: nothing to show.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => warn!(pod, error = %e, "annotating pod with its tailnet address failed"),
        }
    }
    let mut st = status::status(
        node.status.as_ref(),
        node.metadata.generation,
        replicas,
        &findings,
        Utc::now(),
    );
    st.injection = ctx.config.policy_injection.as_ref().and_then(|facts| {
        ctx.rendered
            .get_or_render(node.metadata.uid.as_deref(), node.metadata.generation, || {
                serde_json::to_value(crate::inject::policy::render(&node, facts)).ok()
            })
    });
    if node.status.as_ref() != Some(&st) {
        // Server-side apply with the operator's one field manager: the status is tailnode's.
        let patch = json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode", "status": st});
        Api::<TailscaleNode>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&key, &pp, &Patch::Apply(&patch))
            .await
            .map_err(Error::at(Step::Status))?;
    }
    if findings.credentials.is_some() || !findings.failures.is_empty() {
        return Ok(Action::requeue(status::retry_delay(ctx.backoff.next(&node), &findings)));
    }
    ctx.backoff.reset(&node);
    if still_gated > 0 {
        // The grant is written; the apiserver's RBAC cache catches up within moments.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    // Look again when the first unused key runs out, so it is replaced on time.
    let idle = Duration::from_secs(300);
    let next = [desired::next_key_expiry(&secrets, ttl), obs.slots.next_expiry]
        .into_iter()
        .flatten()
        .min()
        .and_then(|at| (at - now).to_std().ok())
        .map_or(idle, |d| (d + Duration::from_secs(1)).min(idle));
    Ok(Action::requeue(next))
}

fn applied_key(ns: &str, kind: &str, name: &str) -> String {
    format!("{ns}/{kind}/{name}")
}

/// Server-side applies `obj` unless the same content was applied moments ago (see `applied`).
async fn apply_once<K>(ctx: &Context, api: &Api<K>, name: &str, obj: &K, step: Step) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let key = applied_key(obj.meta().namespace.as_deref().unwrap_or_default(), &K::kind(&()), name);
    let hash = applied::digest(obj);
    if ctx.applied.is_current(&key, &hash, std::time::Instant::now()) {
        return Ok(());
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(name, &pp, &Patch::Apply(obj)).await {
        Ok(_) => {
            ctx.applied.record(&key, hash, std::time::Instant::now());
            Ok(())
        }
        Err(e) => {
            ctx.applied.forget(&key);
            Err(Error::at(step)(e))
        }
    }
}

async fn pods_synced(ctx: &Context) -> bool {
    // Not `ctx.pods.wait_until_ready()`: with several reconciles waiting, it wakes one (`synced`).
    tokio::time::timeout(Duration::from_secs(30), ctx.pods_synced.wait())
        .await
        .unwrap_or(false)
}

/// True when the pod a state Secret belongs to still runs: it exists, is not being deleted, and
/// (unless a StatefulSet will restart it under the same name) has not finished.
async fn pod_still_exists(ctx: &Context, ns: &str, secrets: &[Secret], secret: &str) -> Result<bool, Error> {
    let Some(s) = secrets.iter().find(|s| s.metadata.name.as_deref() == Some(secret)) else {
        return Ok(false);
    };
    if s.metadata.deletion_timestamp.is_some() {
        return Ok(false);
    }
    let Some(pod) = s.annotations().get(desired::POD_ANNOTATION) else {
        return Ok(false);
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let found = api.get_opt(pod).await.map_err(Error::at(Step::Observe))?;
    let statefulset = s.annotations().contains_key(desired::STATEFULSET_ANNOTATION);
    Ok(found.is_some_and(|p| p.metadata.deletion_timestamp.is_none() && (statefulset || !desired::finished(&p))))
}

/// True when namespace `ns` is being deleted: from the namespace cache, or from the apiserver
/// when the cache does not (yet) have it.
pub(super) async fn namespace_terminating(ctx: &Context, ns: &str) -> bool {
    use k8s_openapi::api::core::v1::Namespace;
    if let Some(cached) = ctx.namespaces.get(&kube::runtime::reflector::ObjectRef::new(ns)) {
        return cached.metadata.deletion_timestamp.is_some();
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    matches!(api.get_opt(ns).await, Ok(Some(n)) if n.metadata.deletion_timestamp.is_some())
}

pub(super) async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str, step: Step) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::at(step)(e)),
    }
}

/// Publishes an Event about the node; failures to publish are logged, never fatal.
pub(super) async fn publish(
    ctx: &Context,
    node: &TailscaleNode,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &node.object_ref(&())).await {
        warn!(error = %e, "publishing event failed");
    }
}
