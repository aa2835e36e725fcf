use k8s_openapi::jiff::SignedDuration;
use tokio::time::advance;

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn timings() -> Timings {
    Timings::new(15 * SEC, 10 * SEC, 2 * SEC).unwrap()
}

fn spec(holder: &str, renewed: Timestamp, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: Some(15),
        renew_time: Some(MicroTime(renewed)),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

#[test]
fn timings_are_validated() {
    let t = timings();
    assert_eq!(
        (t.lease_duration(), t.renew_deadline(), t.retry_period()),
        (15 * SEC, 10 * SEC, 2 * SEC)
    );
    assert_eq!(t.lease_duration_seconds(), 15);
    let e = Timings::new(15 * SEC, 15 * SEC, 2 * SEC).unwrap_err();
    assert!(matches!(e, TimingsError::RenewDeadline { .. }));
    assert!(
        e.to_string()
            .contains("renew deadline (15s) must be shorter than the lease duration (15s)")
    );
    let e = Timings::new(15 * SEC, 10 * SEC, 10 * SEC).unwrap_err();
    assert!(matches!(e, TimingsError::RetryPeriod { .. }));
    assert_eq!(
        Timings::new(15 * SEC, 10 * SEC, Duration::ZERO),
        Err(TimingsError::ZeroRetryPeriod)
    );
    let sub_second = Timings::new(Duration::from_millis(1500), SEC, Duration::from_millis(200)).unwrap();
    assert_eq!(sub_second.lease_duration_seconds(), 2, "rounded up, never shorter");
}

#[tokio::test(start_paused = true)]
async fn no_lease_a_released_lease_and_our_own_may_be_taken() {
    let t = timings();
    let mut o = Observer::default();
    assert!(o.may_acquire("a", Instant::now()));
    o.observe(Some(&spec("", Timestamp::now(), 3)), &t, Instant::now());
    assert!(o.may_acquire("a", Instant::now()));
    o.observe(Some(&spec("a", Timestamp::now(), 3)), &t, Instant::now());
    assert!(o.may_acquire("a", Instant::now()));
    o.observe(Some(&spec("b", Timestamp::now(), 4)), &t, Instant::now());
    assert!(!o.may_acquire("a", Instant::now()));
    o.observe(None, &t, Instant::now());
    assert!(o.may_acquire("a", Instant::now()));
}

/// The holder's wall clock is an hour behind the follower's: by the old rule (`renewTime +
/// leaseDuration < local now`) the follower would steal the lease on every attempt. Its record
/// keeps changing, so the follower never may.
#[tokio::test(start_paused = true)]
async fn a_follower_with_a_skewed_clock_does_not_steal_a_live_lease() {
    let t = timings();
    let mut follower = Observer::default();
    let leader_clock = Timestamp::now() - SignedDuration::from_hours(1);
    for i in 0..300u16 {
        let renewed = leader_clock + SignedDuration::from_secs(i64::from(i) * 2);
        follower.observe(Some(&spec("leader", renewed, 1)), &t, Instant::now());
        assert!(!follower.may_acquire("follower", Instant::now()), "attempt {i}");
        advance(t.retry_period()).await;
    }
    // Skewed the other way (the holder's renewTime an hour ahead): the same.
    let ahead = Timestamp::now() + SignedDuration::from_hours(1);
    for i in 0..30u16 {
        let renewed = ahead + SignedDuration::from_secs(i64::from(i) * 2);
        follower.observe(Some(&spec("leader", renewed, 1)), &t, Instant::now());
        assert!(!follower.may_acquire("follower", Instant::now()));
        advance(t.retry_period()).await;
    }
}

/// The record stops changing: the follower waits leaseDuration on its own clock from the moment
/// it saw the record, then may take over.
#[tokio::test(start_paused = true)]
async fn a_follower_takes_an_expired_lease() {
    let t = timings();
    let mut follower = Observer::default();
    let dead = spec("leader", Timestamp::now(), 1);
    let first_seen = Instant::now();
    follower.observe(Some(&dead), &t, first_seen);
    while Instant::now() < first_seen + t.lease_duration() {
        assert!(!follower.may_acquire("follower", Instant::now()));
        advance(t.retry_period() / 2).await;
        follower.observe(Some(&dead), &t, Instant::now());
    }
    assert!(follower.may_acquire("follower", Instant::now()));
    assert_eq!(Instant::now() - first_seen, t.lease_duration());
}

/// A renewTime far in the future (a holder with a wild clock that then died) does not block a
/// takeover: only the record's change matters, and it stopped changing.
#[tokio::test(start_paused = true)]
async fn a_stale_renew_time_in_the_future_does_not_block_takeover() {
    let t = timings();
    let mut follower = Observer::default();
    let future = spec("leader", Timestamp::now() + SignedDuration::from_hours(24 * 365), 1);
    follower.observe(Some(&future), &t, Instant::now());
    advance(t.lease_duration() - SEC).await;
    follower.observe(Some(&future), &t, Instant::now());
    assert!(!follower.may_acquire("follower", Instant::now()));
    advance(SEC).await;
    follower.observe(Some(&future), &t, Instant::now());
    assert!(follower.may_acquire("follower", Instant::now()));
}

/// A holder announcing a longer lease than ours is waited for that long.
#[tokio::test(start_paused = true)]
async fn the_holders_lease_duration_is_honoured() {
    let t = timings();
    let mut follower = Observer::default();
    let long = LeaseSpec {
        lease_duration_seconds: Some(40),
        ..spec("leader", Timestamp::now(), 1)
    };
    follower.observe(Some(&long), &t, Instant::now());
    advance(39 * SEC).await;
    assert!(!follower.may_acquire("follower", Instant::now()));
    advance(SEC).await;
    assert!(follower.may_acquire("follower", Instant::now()));
}

/// The leader's last successful renewal began at `renewed`; a follower can only have seen that
/// renewal's record after it began. Whenever the follower may take over, the leader has already
/// had to step down: renewDeadline < leaseDuration is the margin.
#[tokio::test(start_paused = true)]
async fn the_leader_steps_down_before_any_follower_may_acquire() {
    let t = timings();
    let renewed = Instant::now();
    advance(Duration::from_millis(300)).await; // the write lands; the follower reads it
    let mut follower = Observer::default();
    follower.observe(Some(&spec("leader", Timestamp::now(), 1)), &t, Instant::now());
    let mut stepped_down_at = None;
    for _ in 0..400 {
        let now = Instant::now();
        if t.must_step_down(renewed, now) {
            stepped_down_at.get_or_insert(now);
        }
        if follower.may_acquire("follower", now) {
            let down = stepped_down_at.expect("the leader steps down first");
            assert!(now - down >= t.lease_duration() - t.renew_deadline());
            assert_eq!(t.step_down_at(renewed), down);
            return;
        }
        advance(Duration::from_millis(100)).await;
    }
    panic!("the follower never acquired");
}

#[test]
fn desired_spec_counts_transitions_and_keeps_the_acquire_time() {
    let t = timings();
    let then = Timestamp::now() - SignedDuration::from_secs(60);
    let now = Timestamp::now();
    let taken = desired_spec("a", &t, Some(&spec("b", then, 4)), now);
    assert_eq!(taken.holder_identity.as_deref(), Some("a"));
    assert_eq!(taken.lease_transitions, Some(5));
    assert_eq!(taken.acquire_time, Some(MicroTime(now)));
    assert_eq!(taken.lease_duration_seconds, Some(15));
    let renewed = desired_spec("a", &t, Some(&taken), now + SignedDuration::from_secs(2));
    assert_eq!(renewed.lease_transitions, Some(5));
    assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
    assert_eq!(renewed.renew_time, Some(MicroTime(now + SignedDuration::from_secs(2))));
    assert_ne!(Record::of(&taken), Record::of(&renewed), "a renewal changes the record");
    assert_eq!(desired_spec("a", &t, None, now).lease_transitions, Some(1));
}

/// A released Lease has no holder (so any replica may take it at once) and keeps its count of
/// transitions; the next holder counts one more.
#[test]
fn a_released_lease_has_no_holder_and_keeps_its_transitions() {
    let (t, now) = (timings(), Timestamp::now());
    let released = released_spec(&spec("a", now, 3), now);
    assert_eq!(released.holder_identity.as_deref(), Some(""));
    assert_eq!(released.lease_transitions, Some(3));
    let mut o = Observer::default();
    o.observe(Some(&released), &t, tokio::time::Instant::now());
    assert!(
        o.may_acquire("b", tokio::time::Instant::now()),
        "a follower takes a released lease at once"
    );
    assert_eq!(desired_spec("b", &t, Some(&released), now).lease_transitions, Some(4));
}
