use std::collections::VecDeque;
use std::sync::Arc;

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn timings() -> Timings {
    Timings::new(15 * SEC, 10 * SEC, 2 * SEC).unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Answer {
    /// We hold the lease.
    Held,
    /// Someone else does.
    Taken,
    /// The request times out (after the retry period, through `bounded`).
    TimesOut,
    /// The request never answers (no timeout around it at all).
    Hangs,
}

/// Answers attempts from a script, then `rest` forever.
struct Scripted {
    script: VecDeque<Answer>,
    rest: Answer,
    /// Releases, each with whether the fence was still current at that moment.
    releases: Arc<std::sync::Mutex<Vec<bool>>>,
    fence: Option<Fence>,
}

impl Scripted {
    fn new(script: &[Answer], rest: Answer) -> Self {
        Self {
            script: script.iter().copied().collect(),
            rest,
            releases: Arc::default(),
            fence: None,
        }
    }

    /// Records releases (and the state of `fence` at each) into `releases`.
    fn recording(mut self, fence: &Fence, releases: &Arc<std::sync::Mutex<Vec<bool>>>) -> Self {
        self.fence = Some(fence.clone());
        self.releases = releases.clone();
        self
    }
}

impl Holder for Scripted {
    async fn try_hold(&mut self) -> Result<bool, LeaseError> {
        match self.script.pop_front().unwrap_or(self.rest) {
            Answer::Held => Ok(true),
            Answer::Taken => Ok(false),
            Answer::TimesOut => bounded("get", timings().retry_period(), std::future::pending()).await,
            Answer::Hangs => std::future::pending().await,
        }
    }

    async fn release(&mut self) -> Result<(), LeaseError> {
        let current = self.fence.as_ref().is_some_and(Fence::is_current);
        self.releases.lock().unwrap().push(current);
        Ok(())
    }
}

/// Leads with `holder` until leadership ends; returns (time to acquire, time leading). While
/// leading, the fence is asserted current at every look.
async fn lead_until_lost(holder: Scripted, fence: Fence) -> (Duration, Duration) {
    let start = Instant::now();
    let acquired = Arc::new(std::sync::Mutex::new(None));
    let (seen, watched) = (acquired.clone(), fence.clone());
    lead(holder, timings(), fence, CancellationToken::new(), |lost| async move {
        *seen.lock().unwrap() = Some(Instant::now());
        loop {
            tokio::select! {
                _ = lost.cancelled() => break,
                // 700 ms never lands on a deadline (whole seconds) in these scripts.
                _ = tokio::time::sleep(Duration::from_millis(700)) => {
                    assert!(watched.is_current(), "fence current while leading");
                }
            }
        }
    })
    .await;
    let acquired = acquired.lock().unwrap().expect("became leader");
    (acquired - start, Instant::now() - acquired)
}

/// The renewal after the first one hangs forever: the leader still steps down, on its timer,
/// exactly renewDeadline after its last success (4 s), so 5 s before leaseDuration has passed
/// since then: before any follower, which saw that renewal no earlier, may acquire.
#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewal_hangs_steps_down_before_the_lease_expires() {
    let fence = Fence::lease(timings());
    let holder = Scripted::new(&[Answer::Held, Answer::Held], Answer::Hangs);
    let (to_acquire, leading) = lead_until_lost(holder, fence.clone()).await;
    assert_eq!(to_acquire, Duration::ZERO);
    let last_success = 2 * SEC; // the first renewal began one retry period after acquiring
    assert_eq!(leading, last_success + timings().renew_deadline());
    assert!(leading < last_success + timings().lease_duration());
    assert!(!fence.is_current(), "fence revoked on step-down");
}

/// Every renewal request times out: the leader keeps trying and steps down at the deadline.
#[tokio::test(start_paused = true)]
async fn a_leader_whose_requests_time_out_steps_down_at_the_renew_deadline() {
    let fence = Fence::lease(timings());
    let holder = Scripted::new(&[Answer::Held], Answer::TimesOut);
    let (_, leading) = lead_until_lost(holder, fence.clone()).await;
    assert_eq!(leading, timings().renew_deadline());
    assert!(!fence.is_current());
}

/// Another replica took the lease: the leader stops at the next attempt.
#[tokio::test(start_paused = true)]
async fn a_leader_stops_when_the_lease_is_taken() {
    let fence = Fence::lease(timings());
    let holder = Scripted::new(&[Answer::Held, Answer::Held], Answer::Taken);
    let (_, leading) = lead_until_lost(holder, fence.clone()).await;
    assert_eq!(leading, 2 * timings().retry_period());
    assert!(!fence.is_current());
}

/// A follower retries every retry period (failures included) until it may take the lease; its
/// fence is not current before that.
#[tokio::test(start_paused = true)]
async fn a_follower_retries_until_it_acquires() {
    let fence = Fence::lease(timings());
    assert!(!fence.is_current());
    let script = [
        Answer::Taken,
        Answer::TimesOut,
        Answer::Taken,
        Answer::Held,
        Answer::Held,
    ];
    let holder = Scripted::new(&script, Answer::Taken);
    let (to_acquire, leading) = lead_until_lost(holder, fence).await;
    // Taken, sleep 2; times out after 2, sleep 2; taken, sleep 2; held.
    assert_eq!(to_acquire, 8 * SEC);
    assert_eq!(leading, 2 * timings().retry_period());
}

/// Renewals that keep succeeding keep the leader leading until shutdown.
#[tokio::test(start_paused = true)]
async fn a_renewing_leader_leads_until_shutdown() {
    let fence = Fence::lease(timings());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(120 * SEC).await;
        stop.cancel();
    });
    let start = Instant::now();
    let watched = fence.clone();
    let releases = Arc::default();
    lead(
        Scripted::new(&[], Answer::Held).recording(&fence, &releases),
        timings(),
        fence.clone(),
        shutdown,
        |lost| async move {
            while tokio::time::timeout(Duration::from_millis(700), lost.cancelled())
                .await
                .is_err()
            {
                assert!(watched.is_current());
            }
        },
    )
    .await;
    assert_eq!(Instant::now() - start, 120 * SEC);
    assert!(!fence.is_current(), "revoked once the work has stopped");
    // A graceful stop hands the lease over, after the fence is revoked (no write can follow).
    assert_eq!(
        *releases.lock().unwrap(),
        vec![false],
        "released once, fence revoked first"
    );
}

/// A leader that lost the lease (taken by another replica) does not release it on the way out,
/// even when the shutdown comes right after: the Lease is not its own any more.
#[tokio::test(start_paused = true)]
async fn a_leader_that_lost_the_lease_does_not_release_it() {
    let fence = Fence::lease(timings());
    let releases = Arc::default();
    let holder = Scripted::new(&[Answer::Held, Answer::Held], Answer::Taken).recording(&fence, &releases);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    lead(holder, timings(), fence.clone(), shutdown, |lost| async move {
        lost.cancelled().await;
        stop.cancel();
    })
    .await;
    assert!(releases.lock().unwrap().is_empty(), "no release after losing the lease");
}

/// Shutdown while waiting for the lease returns without running the work.
#[tokio::test(start_paused = true)]
async fn shutdown_while_following_skips_the_work() {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(5 * SEC).await;
        stop.cancel();
    });
    let holder = Scripted::new(&[], Answer::Taken);
    lead(holder, timings(), Fence::lease(timings()), shutdown, |_| async {
        panic!("a follower must not run the controller");
    })
    .await;
}

/// Every Lease request has its own timeout.
#[tokio::test(start_paused = true)]
async fn a_hanging_request_times_out() {
    let start = Instant::now();
    let r: Result<(), LeaseError> = bounded("replace", 2 * SEC, std::future::pending()).await;
    assert!(matches!(r, Err(LeaseError::Timeout { step: "replace", .. })));
    assert_eq!(Instant::now() - start, 2 * SEC);
}
