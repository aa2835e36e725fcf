//! Leader election with a coordination.k8s.io Lease: only the holder runs the controller; every
//! replica serves the webhook.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's).
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews, and how often others retry.
    pub renew_every: Duration,
}

/// PURE: may `me` take or keep the lease at `now`?
pub fn may_hold(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == me {
        return true;
    }
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        None => true,
        Some(MicroTime(t)) => t.as_second().saturating_add(secs) < now.as_second(),
    }
}

fn desired(cfg: &LeaseConfig, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let same_holder = previous.and_then(|p| p.holder_identity.as_deref()) == Some(cfg.identity.as_str());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(cfg.duration.as_secs()).unwrap_or(15)),
        acquire_time: if same_holder {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if same_holder { transitions } else { transitions + 1 }),
        ..Default::default()
    }
}

/// One attempt to take or renew the lease; `Ok(true)` when we hold it afterwards.
async fn try_hold(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(desired(cfg, None, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !may_hold(lease.spec.as_ref(), &cfg.identity, now) {
                return Ok(false);
            }
            lease.spec = Some(desired(cfg, lease.spec.as_ref(), now));
            // resourceVersion makes this a compare-and-swap: a racing replica gets 409.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits to become leader, then runs `work` with a token that fires when leadership is lost or
/// `shutdown` fires. Returns when `work` returns.
pub async fn run_as_leader<F, Fut>(client: Client, cfg: LeaseConfig, shutdown: CancellationToken, work: F)
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match try_hold(&api, &cfg).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "lease acquisition failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.renew_every) => {}
        }
    }
    info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
    let lost = shutdown.child_token();
    let renew = {
        let (api, cfg, lost) = (api.clone(), cfg.clone(), lost.clone());
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = tokio::time::sleep(cfg.renew_every) => {}
                }
                match try_hold(&api, &cfg).await {
                    Ok(true) => last_ok = tokio::time::Instant::now(),
                    Ok(false) => {
                        warn!("lease taken by another replica");
                        lost.cancel();
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "lease renewal failed");
                        if last_ok.elapsed() > cfg.duration {
                            lost.cancel();
                            return;
                        }
                    }
                }
            }
        })
    };
    work(lost.clone()).await;
    lost.cancel();
    renew.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }
    }

    #[test]
    fn lease_rules() {
        let now = Timestamp::now();
        assert!(may_hold(None, "a", now));
        assert!(may_hold(Some(&spec("a", now)), "a", now));
        assert!(!may_hold(Some(&spec("b", now)), "a", now));
        let stale = now - k8s_openapi::jiff::SignedDuration::from_secs(16);
        assert!(may_hold(Some(&spec("b", stale)), "a", now));
        assert!(may_hold(Some(&spec("", now)), "a", now));
    }
}
