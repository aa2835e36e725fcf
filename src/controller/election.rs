//! PURE leader-election rules, after client-go's `leaderelection`.
//!
//! Two replicas' wall clocks are never compared. A follower judges a Lease expired by its own
//! monotonic clock: `leaseDuration` after the moment it last saw the Lease's record change. The
//! leader stops acting once its last successful renewal is older than `renewDeadline`, which is
//! shorter than `leaseDuration`; the difference is the margin by which it steps down before any
//! follower may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

/// The three timings of leader election, validated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
}

/// Timings that cannot give one leader at a time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingsError {
    /// A zero retry period would spin.
    #[error("the leader-election retry period must be greater than zero")]
    ZeroRetryPeriod,
    /// The leader would still act after followers may take over.
    #[error(
        "the leader-election renew deadline ({renew_deadline:?}) must be shorter than the lease duration ({lease_duration:?})"
    )]
    RenewDeadline {
        /// `--leader-elect-renew-deadline`.
        renew_deadline: Duration,
        /// `--leader-elect-lease-duration`.
        lease_duration: Duration,
    },
    /// The leader could not retry before its deadline.
    #[error(
        "the leader-election retry period ({retry_period:?}) must be shorter than the renew deadline ({renew_deadline:?})"
    )]
    RetryPeriod {
        /// `--leader-elect-retry-period`.
        retry_period: Duration,
        /// `--leader-elect-renew-deadline`.
        renew_deadline: Duration,
    },
}

impl Timings {
    /// Checks `renew_deadline < lease_duration` and `0 < retry_period < renew_deadline`.
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, TimingsError> {
        if retry_period.is_zero() {
            return Err(TimingsError::ZeroRetryPeriod);
        }
        if renew_deadline >= lease_duration {
            return Err(TimingsError::RenewDeadline {
                renew_deadline,
                lease_duration,
            });
        }
        if retry_period >= renew_deadline {
            return Err(TimingsError::RetryPeriod {
                retry_period,
                renew_deadline,
            });
        }
        Ok(Self {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }

    /// How long a Lease stays valid without renewal.
    pub fn lease_duration(&self) -> Duration {
        self.lease_duration
    }

    /// How long the leader keeps acting after its last successful renewal.
    pub fn renew_deadline(&self) -> Duration {
        self.renew_deadline
    }

    /// The pause between attempts, and the timeout of each Lease request.
    pub fn retry_period(&self) -> Duration {
        self.retry_period
    }

    /// `leaseDurationSeconds` to write: whole seconds, rounded up.
    pub fn lease_duration_seconds(&self) -> i32 {
        let d = self.lease_duration;
        let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
        i32::try_from(secs).unwrap_or(i32::MAX)
    }

    /// The leader must stop acting at `now` if its last successful renewal began at `last_renewal`.
    pub fn must_step_down(&self, last_renewal: Instant, now: Instant) -> bool {
        now.saturating_duration_since(last_renewal) >= self.renew_deadline
    }

    /// When the leader whose last successful renewal began at `last_renewal` must stop acting.
    pub fn step_down_at(&self, last_renewal: Instant) -> Instant {
        // An overflow cannot happen with parsed flags; stepping down at once is the safe answer.
        last_renewal.checked_add(self.renew_deadline).unwrap_or(last_renewal)
    }
}

/// The part of a Lease whose change proves that its holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `holderIdentity` ("" when released).
    pub holder: String,
    /// `renewTime`, compared for equality only, never with a local clock.
    pub renew_time: Option<Timestamp>,
    /// `leaseTransitions`.
    pub transitions: i32,
}

impl Record {
    /// The record of a Lease spec.
    pub fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|MicroTime(t)| *t),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone)]
struct Seen {
    record: Record,
    /// The holder's own `leaseDurationSeconds` (ours when it names none).
    duration: Duration,
    /// Local time at which this record was first seen.
    changed_at: Instant,
}

/// What one replica has seen of the Lease, on its own clock.
#[derive(Debug, Clone, Default)]
pub struct Observer {
    seen: Option<Seen>,
}

impl Observer {
    /// Notes the Lease as read at local time `now` (`None`: there is no Lease). The expiry clock
    /// restarts only when the record changed.
    pub fn observe(&mut self, spec: Option<&LeaseSpec>, timings: &Timings, now: Instant) {
        let Some(spec) = spec else {
            self.seen = None;
            return;
        };
        let record = Record::of(spec);
        let duration = match spec.lease_duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(s.unsigned_abs().into()),
            _ => timings.lease_duration,
        };
        match &mut self.seen {
            Some(seen) if seen.record == record => seen.duration = duration,
            _ => {
                self.seen = Some(Seen {
                    record,
                    duration,
                    changed_at: now,
                })
            }
        }
    }

    /// May `me` write itself into the Lease at local time `now`? Yes when there is none, when it
    /// is released or ours, or when its record has not changed for the holder's lease duration.
    pub fn may_acquire(&self, me: &str, now: Instant) -> bool {
        let Some(seen) = &self.seen else { return true };
        if seen.record.holder.is_empty() || seen.record.holder == me {
            return true;
        }
        now.saturating_duration_since(seen.changed_at) >= seen.duration
    }
}

/// The spec a leader writes to hand the Lease over when it stops on purpose (a rollout, a helm
/// upgrade): no holder, so a waiting replica takes it at its next attempt instead of waiting a
/// whole lease duration for a record that will never change again. Keeps the transitions count.
pub fn released_spec(previous: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(String::new()),
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: previous.lease_transitions,
        ..Default::default()
    }
}

/// The spec `identity` writes to take or renew the Lease at wall time `now` (informational for
/// readers; no replica compares it with its clock).
pub fn desired_spec(identity: &str, timings: &Timings, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let same_holder = previous.and_then(|p| p.holder_identity.as_deref()) == Some(identity);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(timings.lease_duration_seconds()),
        acquire_time: if same_holder {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if same_holder {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "election_tests.rs"]
mod tests;
