//! The fence: a cheap "am I still the leader?" check right before a write that must not come
//! from two replicas (minting a key, deleting a device, releasing a state Secret).

use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use super::election::Timings;
use super::status::Problem;

#[derive(Debug, Default)]
struct Held {
    last_renewal: Option<Instant>,
    revoked: bool,
}

#[derive(Debug)]
enum Inner {
    /// Leader election is off: this replica is the only controller.
    Always,
    /// Current while the last successful renewal is younger than the renew deadline.
    Lease { timings: Timings, held: Mutex<Held> },
}

/// Shared between the lease keeper, which records renewals, and the reconciles, which ask.
#[derive(Debug, Clone)]
pub struct Fence(Arc<Inner>);

impl Fence {
    /// A fence that is always current (`--leader-elect=false`).
    pub fn always() -> Self {
        Self(Arc::new(Inner::Always))
    }

    /// A fence for a Lease: not current until the first successful renewal.
    pub fn lease(timings: Timings) -> Self {
        Self(Arc::new(Inner::Lease {
            timings,
            held: Mutex::new(Held::default()),
        }))
    }

    fn with_held<T>(&self, f: impl FnOnce(&Timings, &mut Held) -> T) -> Option<T> {
        match &*self.0 {
            Inner::Always => None,
            Inner::Lease { timings, held } => {
                let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
                Some(f(timings, &mut held))
            }
        }
    }

    /// A renewal that began at `started` succeeded.
    pub fn renewed(&self, started: Instant) {
        self.with_held(|_, h| {
            if h.last_renewal.is_none_or(|last| started > last) {
                h.last_renewal = Some(started);
            }
        });
    }

    /// Leadership is over for good (lost, stepped down, or shutting down).
    /// The lease was (re-)acquired at `started`: current again after an earlier `revoke`.
    pub fn acquired(&self, started: Instant) {
        self.with_held(|_, h| {
            h.revoked = false;
            h.last_renewal = Some(started);
        });
    }

    pub fn revoke(&self) {
        self.with_held(|_, h| h.revoked = true);
    }

    /// True while this replica may act as the leader at local time `now`.
    pub fn is_current_at(&self, now: Instant) -> bool {
        self.with_held(|t, h| match h.last_renewal {
            Some(last) if !h.revoked => !t.must_step_down(last, now),
            _ => false,
        })
        .unwrap_or(true)
    }

    /// True while this replica may act as the leader. A process that was frozen past its renew
    /// deadline sees false at once, before it renews again.
    pub fn is_current(&self) -> bool {
        self.is_current_at(Instant::now())
    }

    /// `Ok` while current; otherwise the Problem that skips the write.
    pub fn check(&self) -> Result<(), Problem> {
        if self.is_current() {
            return Ok(());
        }
        Err(Problem {
            reason: "NotLeader",
            message: "leadership is not current (lease not renewed within the renew deadline); write skipped".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timings() -> Timings {
        Timings::new(Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2)).unwrap()
    }

    #[test]
    fn without_election_the_fence_is_always_current() {
        let f = Fence::always();
        f.revoke();
        assert!(f.is_current());
        assert!(f.check().is_ok());
    }

    /// A replica that has never renewed, or whose leadership was revoked, may not write.
    #[tokio::test(start_paused = true)]
    async fn a_lease_acquired_again_after_a_step_down_makes_the_fence_current() {
        let f = Fence::lease(timings());
        f.acquired(Instant::now());
        assert!(f.is_current());
        f.revoke();
        assert!(!f.is_current(), "stepped down");
        // A renewal of the old term does not bring it back; acquiring the lease again does.
        f.renewed(Instant::now());
        assert!(!f.is_current());
        f.acquired(Instant::now());
        assert!(f.is_current());
    }

    #[tokio::test(start_paused = true)]
    async fn not_current_before_the_first_renewal_or_after_revoke() {
        let f = Fence::lease(timings());
        assert!(!f.is_current());
        assert_eq!(f.check().unwrap_err().reason, "NotLeader");
        f.renewed(Instant::now());
        assert!(f.is_current());
        f.revoke();
        assert!(!f.is_current());
        f.renewed(Instant::now());
        assert!(!f.is_current(), "a revoked fence stays revoked");
    }

    /// A frozen process (SIGSTOP) resumes with the monotonic clock moved on: the fence says no at
    /// once, with no renewal task having run.
    #[tokio::test(start_paused = true)]
    async fn a_frozen_leader_sees_false_as_soon_as_it_resumes() {
        let f = Fence::lease(timings());
        let renewed = Instant::now();
        f.renewed(renewed);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(f.is_current());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!f.is_current(), "exactly renewDeadline after the last success");
        assert!(!f.is_current_at(renewed + Duration::from_secs(30)));
        // An older renewal finishing late never moves the fence back.
        f.renewed(renewed - Duration::from_secs(1));
        assert!(f.is_current_at(renewed + Duration::from_secs(9)));
    }
}
