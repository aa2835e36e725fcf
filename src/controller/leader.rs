//! Leader election with a coordination.k8s.io Lease: only the holder runs the controller; every
//! replica serves the webhook. The rules are in `election` (pure); this is the I/O around them.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::election::{Observer, Timings, desired_spec, released_spec};
use super::fence::Fence;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's).
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Lease duration, renew deadline and retry period.
    pub timings: Timings,
}

/// A failed Lease request; the attempt is retried after the retry period.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The request did not answer within its timeout.
    #[error("lease {step}: no answer within {limit:?}")]
    Timeout {
        /// `get`, `create` or `replace`.
        step: &'static str,
        /// The timeout.
        limit: Duration,
    },
    /// The apiserver answered with an error.
    #[error("lease {step}: {source}")]
    Kube {
        /// `get`, `create` or `replace`.
        step: &'static str,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

impl LeaseError {
    /// Someone else wrote the Lease between our read and our write (409).
    fn is_conflict(&self) -> bool {
        matches!(self, LeaseError::Kube { source: kube::Error::Api(e), .. } if e.code == 409)
    }
}

/// Runs one Lease request with its own timeout.
pub async fn bounded<T>(
    step: &'static str,
    limit: Duration,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, LeaseError> {
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(LeaseError::Kube { step, source }),
        Err(_) => Err(LeaseError::Timeout { step, limit }),
    }
}

/// One attempt to take or renew the lease; `Ok(true)` when we hold it afterwards.
pub trait Holder: Send {
    /// Reads the Lease and writes ourselves into it when the rules allow.
    fn try_hold(&mut self) -> impl Future<Output = Result<bool, LeaseError>> + Send;
    /// Empties the Lease if this replica still holds it (a graceful stop hands it over at once).
    fn release(&mut self) -> impl Future<Output = Result<(), LeaseError>> + Send;
}

/// The real holder: an `Api<Lease>` and what this replica has seen of the Lease.
struct LeaseHolder {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observer: Observer,
}

impl Holder for LeaseHolder {
    async fn try_hold(&mut self) -> Result<bool, LeaseError> {
        let (cfg, limit) = (&self.cfg, self.cfg.timings.retry_period());
        let current = bounded("get", limit, self.api.get_opt(&cfg.name)).await?;
        let seen_at = Instant::now();
        self.observer
            .observe(current.as_ref().and_then(|l| l.spec.as_ref()), &cfg.timings, seen_at);
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(cfg.name.clone()),
                        namespace: Some(cfg.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(desired_spec(&cfg.identity, &cfg.timings, None, Timestamp::now())),
                };
                bounded("create", limit, self.api.create(&PostParams::default(), &lease)).await
            }
            Some(mut lease) => {
                if !self.observer.may_acquire(&cfg.identity, seen_at) {
                    return Ok(false);
                }
                let spec = desired_spec(&cfg.identity, &cfg.timings, lease.spec.as_ref(), Timestamp::now());
                lease.spec = Some(spec);
                // resourceVersion makes this a compare-and-swap: a racing replica gets 409.
                bounded(
                    "replace",
                    limit,
                    self.api.replace(&cfg.name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        match written {
            Ok(lease) => {
                self.observer.observe(lease.spec.as_ref(), &cfg.timings, Instant::now());
                Ok(true)
            }
            Err(e) if e.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn release(&mut self) -> Result<(), LeaseError> {
        let (cfg, limit) = (&self.cfg, self.cfg.timings.retry_period());
        // A conflict means the Lease changed since our read: a replica that took over wins, but
        // our own renewal may also have landed late, so read again and retry once.
        for _ in 0..2 {
            let Some(mut lease) = bounded("get", limit, self.api.get_opt(&cfg.name)).await? else {
                return Ok(());
            };
            let Some(spec) = lease
                .spec
                .as_ref()
                .filter(|s| s.holder_identity.as_deref() == Some(&cfg.identity))
            else {
                return Ok(());
            };
            lease.spec = Some(released_spec(spec, Timestamp::now()));
            // resourceVersion makes this a compare-and-swap.
            match bounded(
                "release",
                limit,
                self.api.replace(&cfg.name, &PostParams::default(), &lease),
            )
            .await
            {
                Err(e) if e.is_conflict() => continue,
                other => return other.map(|_| ()),
            }
        }
        Ok(())
    }
}

/// Waits to become leader, then runs `work` with a token that fires when leadership is lost or
/// `shutdown` fires. `fence` is current exactly while this replica may act as the leader.
/// Returns when `work` returns.
pub async fn run_as_leader<F, Fut>(client: Client, cfg: LeaseConfig, fence: Fence, shutdown: CancellationToken, work: F)
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let timings = cfg.timings;
    let (name, identity) = (cfg.name.clone(), cfg.identity.clone());
    let holder = LeaseHolder {
        api: Api::namespaced(client, &cfg.namespace),
        cfg,
        observer: Observer::default(),
    };
    lead(holder, timings, fence, shutdown, |lost| async move {
        info!(lease = %name, identity = %identity, "became leader");
        work(lost).await;
    })
    .await;
}

/// `run_as_leader` over any [`Holder`].
pub async fn lead<H, F, Fut>(mut holder: H, timings: Timings, fence: Fence, shutdown: CancellationToken, work: F)
where
    H: Holder + 'static,
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let acquired = loop {
        if shutdown.is_cancelled() {
            return;
        }
        let started = Instant::now();
        match holder.try_hold().await {
            Ok(true) => break started,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "lease acquisition failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(timings.retry_period()) => {}
        }
    };
    fence.acquired(acquired);
    let lost = shutdown.child_token();
    let renew = tokio::spawn(keep_renewing(holder, timings, fence.clone(), acquired, lost.clone()));
    work(lost.clone()).await;
    lost.cancel();
    fence.revoke();
    // keep_renewing returns its holder as soon as `lost` fires (an attempt in flight is dropped).
    let Ok((mut holder, still_held)) = renew.await else {
        return;
    };
    // Stopped on purpose while still the leader, with the controller stopped: hand the Lease over.
    if shutdown.is_cancelled() && still_held {
        match holder.release().await {
            Ok(()) => info!("lease released"),
            Err(e) => warn!(error = %e, "lease release failed; followers take it when it expires"),
        }
    }
}

/// Renews every retry period; steps down (revokes the fence, cancels `lost`) when the lease is
/// taken, or on a timer when the last successful renewal is older than the renew deadline, even
/// while a request hangs.
///
/// Returns the holder, and whether this replica still held the lease when it stopped (false after
/// a step-down or a takeover).
async fn keep_renewing<H: Holder>(
    mut holder: H,
    timings: Timings,
    fence: Fence,
    mut last_renewal: Instant,
    lost: CancellationToken,
) -> (H, bool) {
    let mut still_held = true;
    loop {
        let deadline = timings.step_down_at(last_renewal);
        let attempt = async {
            tokio::time::sleep(timings.retry_period()).await;
            let started = Instant::now();
            (started, holder.try_hold().await)
        };
        tokio::select! {
            // The deadline wins a tie: a resumed (frozen) process steps down before renewing.
            biased;
            _ = lost.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {
                warn!(renew_deadline = ?timings.renew_deadline(), "lease not renewed in time; stepping down");
                still_held = false;
                break;
            }
            (started, result) = attempt => match result {
                Ok(true) => {
                    last_renewal = started;
                    fence.renewed(started);
                }
                Ok(false) => {
                    warn!("lease taken by another replica");
                    still_held = false;
                    break;
                }
                Err(e) => warn!(error = %e, "lease renewal failed"),
            }
        }
    }
    fence.revoke();
    lost.cancel();
    (holder, still_held)
}

#[cfg(test)]
#[path = "leader_tests.rs"]
mod tests;
