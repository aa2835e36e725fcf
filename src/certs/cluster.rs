//! The I/O shell of self-managed certificates: read the Secret, write new material with an
//! optimistic-concurrency guard (replicas race; the loser adopts the winner's material), patch
//! the webhook's `caBundle`, and keep the serving certificate fresh.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::objects::{SECRET_TYPE, ca_bundle_patch, secret_for, stored_from_secret};
use super::{CertError, Plan, ServingMaterial, plan};
use crate::tls::ReloadingCert;

/// How many times a write that lost a race is re-planned before giving up.
const MAX_ATTEMPTS: usize = 5;
/// First retry delay of [`run_rotation`] after a failure; doubles up to the interval.
const RETRY_MIN: Duration = Duration::from_secs(5);

/// Where self-managed certificates live and who they are for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfManagedConfig {
    /// Namespace of the Secret (the operator's own).
    pub namespace: String,
    /// Name of the `kubernetes.io/tls` Secret.
    pub secret_name: String,
    /// Names the serving certificate is for, e.g. `tailnode-webhook.tailnode-system.svc`.
    pub dns_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose webhooks get the CA as `caBundle`, if any.
    pub webhook_config_name: Option<String>,
    /// Field manager of every write.
    pub field_manager: String,
}

fn lost_race(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists() || s.is_not_found())
}

/// Makes sure the Secret holds valid serving material for `cfg.dns_names` that is not due for
/// rotation at `now`, writing new material when it does not, and that every webhook of
/// `cfg.webhook_config_name` trusts its CA. Returns what to serve. Safe to call from several
/// replicas at once: all end up with the same material.
pub async fn ensure_self_managed(
    client: Client,
    cfg: &SelfManagedConfig,
    now: chrono::DateTime<Utc>,
) -> Result<ServingMaterial, CertError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), &cfg.namespace);
    let material = ensure_secret(&secrets, cfg, now).await?;
    if let Some(name) = &cfg.webhook_config_name {
        let configs = Api::<MutatingWebhookConfiguration>::all(client);
        ensure_ca_bundle(&configs, name, &material.ca_pem, &cfg.field_manager).await?;
    }
    Ok(material)
}

async fn ensure_secret(
    api: &Api<Secret>,
    cfg: &SelfManagedConfig,
    now: chrono::DateTime<Utc>,
) -> Result<ServingMaterial, CertError> {
    let read_error = |source| CertError::ReadSecret {
        namespace: cfg.namespace.clone(),
        name: cfg.secret_name.clone(),
        source,
    };
    let write_error = |source| CertError::WriteSecret {
        namespace: cfg.namespace.clone(),
        name: cfg.secret_name.clone(),
        source,
    };
    let post = PostParams {
        dry_run: false,
        field_manager: Some(cfg.field_manager.clone()),
    };
    for _ in 0..MAX_ATTEMPTS {
        let current = api.get_opt(&cfg.secret_name).await.map_err(read_error)?;
        let stored = current.as_ref().map(stored_from_secret).unwrap_or_default();
        let issued = match plan(&stored, &cfg.dns_names, now)? {
            Plan::Keep(material) => return Ok(material),
            Plan::Issue(issued) => issued,
        };
        info!(
            namespace = %cfg.namespace,
            secret = %cfg.secret_name,
            reason = issued.reason.as_str(),
            new_ca = issued.new_ca,
            not_after = %issued.material.not_after,
            "writing a new webhook serving certificate"
        );
        let written = match &current {
            None => {
                api.create(&post, &secret_for(None, &cfg.namespace, &cfg.secret_name, &issued))
                    .await
            }
            // The type of a Secret is immutable: replace a foreign-typed one by delete + create,
            // the delete guarded by the resourceVersion that was read.
            Some(existing) if existing.type_.as_deref() != Some(SECRET_TYPE) => {
                let delete = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: existing.metadata.resource_version.clone(),
                        uid: existing.metadata.uid.clone(),
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&cfg.secret_name, &delete).await {
                    Ok(_) => {
                        api.create(&post, &secret_for(None, &cfg.namespace, &cfg.secret_name, &issued))
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            Some(existing) => {
                let desired = secret_for(Some(existing), &cfg.namespace, &cfg.secret_name, &issued);
                api.replace(&cfg.secret_name, &post, &desired).await
            }
        };
        match written {
            Ok(_) => return Ok(issued.material),
            Err(e) if lost_race(&e) => {
                debug!(secret = %cfg.secret_name, "another writer changed the certificate Secret; re-reading");
            }
            Err(e) => return Err(write_error(e)),
        }
    }
    Err(CertError::Contended {
        what: "Secret",
        attempts: MAX_ATTEMPTS,
    })
}

async fn ensure_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
    field_manager: &str,
) -> Result<(), CertError> {
    let params = PatchParams {
        field_manager: Some(field_manager.to_string()),
        ..PatchParams::default()
    };
    for _ in 0..MAX_ATTEMPTS {
        let current = api.get(name).await.map_err(|source| CertError::ReadWebhookConfig {
            name: name.to_string(),
            source,
        })?;
        let Some(patch) = ca_bundle_patch(&current, ca_pem)? else {
            return Ok(());
        };
        match api.patch(name, &params, &Patch::Json::<()>(patch)).await {
            Ok(_) => {
                info!(webhook_config = %name, "webhook caBundle updated");
                return Ok(());
            }
            // A failed `test` op (the webhooks changed since the read) is 422; re-read.
            Err(kube::Error::Api(s)) if s.is_invalid() || s.is_conflict() => {
                debug!(webhook_config = %name, "the webhook configuration changed during the caBundle patch; re-reading");
            }
            Err(source) => {
                return Err(CertError::PatchWebhookConfig {
                    name: name.to_string(),
                    source,
                });
            }
        }
    }
    Err(CertError::Contended {
        what: "MutatingWebhookConfiguration",
        attempts: MAX_ATTEMPTS,
    })
}

/// Every `interval` until `shutdown`, re-runs [`ensure_self_managed`] and, when the serving
/// certificate changed (rotated here or by another replica), hands it to `reloading`. After a
/// failure it retries sooner, from 5 s doubling up to `interval`.
pub async fn run_rotation(
    client: Client,
    cfg: SelfManagedConfig,
    reloading: Arc<ReloadingCert>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut served: Option<String> = None;
    let mut delay = interval;
    let mut failures = 0_u32;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        match ensure_self_managed(client.clone(), &cfg, Utc::now()).await {
            Ok(material) => {
                failures = 0;
                delay = interval;
                if served.as_deref() == Some(material.cert_pem.as_str()) {
                    continue;
                }
                match reloading.set(&material.cert_pem, &material.key_pem) {
                    Ok(()) => {
                        info!(not_after = %material.not_after, "serving the current webhook certificate");
                        served = Some(material.cert_pem);
                    }
                    Err(error) => warn!(%error, "the webhook certificate from the Secret does not load"),
                }
            }
            Err(error) => {
                delay = retry_delay(failures, interval);
                failures = failures.saturating_add(1);
                warn!(%error, reason = error.reason(), retry_in = ?delay, "ensuring the webhook certificate failed");
            }
        }
    }
}

/// The pause after the `failures`+1-th failure in a row: [`RETRY_MIN`] doubled per earlier
/// failure, at most `interval`.
fn retry_delay(failures: u32, interval: Duration) -> Duration {
    RETRY_MIN
        .saturating_mul(2_u32.saturating_pow(failures.min(16)))
        .min(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_the_interval() {
        let hour = Duration::from_secs(3600);
        let delays: Vec<u64> = (0..12).map(|f| retry_delay(f, hour).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]);
        assert_eq!(retry_delay(u32::MAX, hour), hour);
        assert_eq!(retry_delay(0, Duration::from_secs(1)), Duration::from_secs(1));
    }
}
