//! PURE: the TailscaleNode status and its conditions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ReplicaState, ReplicaStatus, TailscaleNodeStatus};

/// A problem found during a reconcile, with a bounded reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// What the user should know.
    pub message: String,
}

/// What one step's writes did (resets, slots).
#[derive(Debug, Default)]
pub struct Outcome {
    /// Something changed hands (a pod evicted, a state wiped, a slot claimed, a race lost):
    /// observe again before minting or opening gates.
    pub changed: bool,
    /// What went wrong, for the status and Events.
    pub problems: Vec<Problem>,
}

/// What the reconcile learned, for the conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    /// Why the credentials cannot be used, if they cannot.
    pub credentials: Option<Problem>,
    /// Other failures (minting, cleanup).
    pub failures: Vec<Problem>,
    /// Pods injected from an older spec (they need a new pod to pick the change up).
    pub restart_needed: Vec<String>,
    /// The longest `Retry-After` an API asked for in this reconcile.
    pub hold_off: Option<Duration>,
}

impl Findings {
    /// Records a failed mint (once per distinct message) and the API's `Retry-After`.
    pub fn mint_failed(&mut self, problem: Problem, retry_after: Option<Duration>) {
        if self.failures.iter().all(|f| f.message != problem.message) {
            self.failures.push(problem);
        }
        self.hold_off = self.hold_off.max(retry_after);
    }
}

/// Reasons of failures that pass by themselves (an API rate limit, a 5xx, a timeout).
const TRANSIENT: [&str; 2] = ["ApiRateLimited", "ApiUnavailable"];

/// Longest wait before looking again after only transient failures.
pub const TRANSIENT_CAP: Duration = Duration::from_secs(5);

/// PURE: when to look again after a reconcile that found problems, given the node's exponential
/// `backoff`. Never sooner than an API asked (`Retry-After`); after only transient failures
/// never later than [`TRANSIENT_CAP`], so a node converges within seconds of an API outage's end
/// (the key API's client already backs off within each attempt); otherwise (bad credentials, a
/// rejected request) the full backoff, which spares the API calls that cannot succeed.
pub fn retry_delay(backoff: Duration, findings: &Findings) -> Duration {
    let mut problems = findings.credentials.iter().chain(&findings.failures);
    let transient = problems.all(|p| TRANSIENT.contains(&p.reason));
    let delay = if transient { backoff.min(TRANSIENT_CAP) } else { backoff };
    delay.max(findings.hold_off.unwrap_or_default())
}

/// Names at most this many pods in a message, then a count.
const NAMED_PODS: usize = 5;

fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // Keep the transition time while the status stays the same.
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: last.unwrap_or_else(|| Time(jiff_now(now))),
    }
}

fn jiff_now(now: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(now.timestamp_nanos_opt().unwrap_or_default()))
        .unwrap_or_default()
}

/// The status for this reconcile.
pub fn status(
    previous: Option<&TailscaleNodeStatus>,
    generation: Option<i64>,
    replicas: Vec<ReplicaStatus>,
    findings: &Findings,
    now: DateTime<Utc>,
) -> TailscaleNodeStatus {
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let total = i32::try_from(replicas.len()).unwrap_or(i32::MAX);
    let ready = i32::try_from(replicas.iter().filter(|r| r.state == ReplicaState::Registered).count()).unwrap_or(0);
    let creds = match &findings.credentials {
        None => condition(
            prev,
            "CredentialsValid",
            true,
            "Valid",
            "credentials work".into(),
            generation,
            now,
        ),
        Some(p) => condition(
            prev,
            "CredentialsValid",
            false,
            p.reason,
            p.message.clone(),
            generation,
            now,
        ),
    };
    let first_problem = findings.credentials.iter().chain(findings.failures.iter()).next();
    let degraded = match first_problem {
        None => condition(
            prev,
            "Degraded",
            false,
            "AsExpected",
            "no failures".into(),
            generation,
            now,
        ),
        Some(p) => {
            let message = findings
                .credentials
                .iter()
                .chain(findings.failures.iter())
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            condition(prev, "Degraded", true, p.reason, message, generation, now)
        }
    };
    let ready_cond = if ready == total && first_problem.is_none() {
        let reason = if total == 0 {
            "NoReplicas"
        } else {
            "AllReplicasRegistered"
        };
        condition(
            prev,
            "Ready",
            true,
            reason,
            format!("{ready}/{total} replicas registered"),
            generation,
            now,
        )
    } else {
        let reason = first_problem.map(|p| p.reason).unwrap_or("ReplicasPending");
        condition(
            prev,
            "Ready",
            false,
            reason,
            format!("{ready}/{total} replicas registered"),
            generation,
            now,
        )
    };
    let restart = if findings.restart_needed.is_empty() {
        condition(
            prev,
            "RestartNeeded",
            false,
            "UpToDate",
            "every replica runs the current spec".into(),
            generation,
            now,
        )
    } else {
        let stale = &findings.restart_needed;
        let mut named = stale.iter().take(NAMED_PODS).cloned().collect::<Vec<_>>().join(", ");
        if stale.len() > NAMED_PODS {
            named.push_str(&format!(" and {} more", stale.len() - NAMED_PODS));
        }
        let message = format!(
            "{} pod(s) run an older spec of this TailscaleNode and pick the change up only in a new pod (e.g. kubectl rollout restart): {named}",
            stale.len()
        );
        condition(prev, "RestartNeeded", true, "SpecChanged", message, generation, now)
    };
    let registered: Vec<&ReplicaStatus> = replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Registered)
        .collect();
    let hostnames = summary(registered.iter().filter_map(|r| r.hostname.clone()).collect());
    let addresses = summary(registered.iter().filter_map(|r| r.ips.first().cloned()).collect());
    let conditions = vec![ready_cond, creds, degraded, restart];
    TailscaleNodeStatus {
        observed_generation: generation,
        conditions,
        ready_replicas: ready,
        total_replicas: total,
        replicas,
        hostnames,
        addresses,
        injection: None,
    }
}

/// Shown in `kubectl get tsn -o wide`: at most this many values, then a count.
const SUMMARY_VALUES: usize = 3;

/// PURE: `a, b, c (+2)`, or `None` for nothing.
fn summary(values: Vec<String>) -> Option<String> {
    if values.is_empty() {
        return None;
    }
    let mut out = values
        .iter()
        .take(SUMMARY_VALUES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if values.len() > SUMMARY_VALUES {
        out.push_str(&format!(" (+{})", values.len() - SUMMARY_VALUES));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(pod: &str, state: ReplicaState) -> ReplicaStatus {
        ReplicaStatus {
            pod: pod.into(),
            secret: format!("ts-{pod}"),
            state,
            ..Default::default()
        }
    }

    fn get<'a>(s: &'a TailscaleNodeStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn problem(reason: &'static str) -> Problem {
        Problem {
            reason,
            message: format!("{reason} happened"),
        }
    }

    /// After a transient API failure the node is looked at again within seconds whatever its
    /// backoff grew to, but never sooner than the API's Retry-After; other failures keep the
    /// full backoff.
    #[test]
    fn retry_delay_caps_transient_failures_and_honours_retry_after() {
        let long = Duration::from_secs(60);
        let mut f = Findings::default();
        f.mint_failed(problem("ApiUnavailable"), None);
        f.mint_failed(problem("ApiUnavailable"), None);
        assert_eq!(f.failures.len(), 1, "one entry per distinct message");
        assert_eq!(retry_delay(long, &f), TRANSIENT_CAP);
        assert_eq!(retry_delay(Duration::from_secs(1), &f), Duration::from_secs(1));
        f.mint_failed(problem("ApiRateLimited"), Some(Duration::from_secs(20)));
        f.mint_failed(problem("ApiRateLimited"), Some(Duration::from_secs(7)));
        assert_eq!(
            f.hold_off,
            Some(Duration::from_secs(20)),
            "the longest Retry-After wins"
        );
        assert_eq!(retry_delay(Duration::from_secs(1), &f), Duration::from_secs(20));
        let mut bad = Findings {
            credentials: Some(problem("ApiUnauthorized")),
            ..Default::default()
        };
        assert_eq!(retry_delay(long, &bad), long);
        bad.credentials = None;
        bad.mint_failed(problem("ApiRejected"), None);
        bad.mint_failed(problem("ApiUnavailable"), None);
        assert_eq!(retry_delay(long, &bad), long, "one lasting failure keeps the backoff");
    }

    #[test]
    fn all_registered_is_ready() {
        let now = Utc::now();
        let s = status(
            None,
            Some(3),
            vec![replica("a", ReplicaState::Registered)],
            &Findings::default(),
            now,
        );
        assert_eq!((s.ready_replicas, s.total_replicas), (1, 1));
        assert_eq!(get(&s, "Ready").status, "True");
        assert_eq!(get(&s, "CredentialsValid").status, "True");
        assert_eq!(get(&s, "Degraded").status, "False");
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn missing_credentials_are_reported_everywhere() {
        let findings = Findings {
            credentials: Some(Problem {
                reason: "SecretMissing",
                message: "Secret apps/oauth not found".into(),
            }),
            ..Default::default()
        };
        let s = status(
            None,
            None,
            vec![replica("a", ReplicaState::Pending)],
            &findings,
            Utc::now(),
        );
        assert_eq!(get(&s, "CredentialsValid").reason, "SecretMissing");
        assert_eq!(get(&s, "Ready").status, "False");
        assert_eq!(get(&s, "Ready").reason, "SecretMissing");
        assert_eq!(get(&s, "Degraded").status, "True");
        assert!(get(&s, "Degraded").message.contains("apps/oauth"));
    }

    #[test]
    fn wide_columns_summarise_registered_replicas() {
        let reg = |pod: &str, ip: &str| ReplicaStatus {
            hostname: Some(format!("h-{pod}")),
            ips: vec![ip.into(), "fd7a::1".into()],
            ..replica(pod, ReplicaState::Registered)
        };
        let mut rs = vec![reg("a", "100.64.0.1"), replica("p", ReplicaState::Pending)];
        let s = status(None, None, rs.clone(), &Findings::default(), Utc::now());
        assert_eq!(s.hostnames.as_deref(), Some("h-a"));
        assert_eq!(s.addresses.as_deref(), Some("100.64.0.1"));
        rs.extend(["b", "c", "d", "e"].map(|p| reg(p, "100.64.0.9")));
        let s = status(None, None, rs, &Findings::default(), Utc::now());
        assert_eq!(s.hostnames.as_deref(), Some("h-a, h-b, h-c (+2)"));
        let none = status(
            None,
            None,
            vec![replica("p", ReplicaState::Pending)],
            &Findings::default(),
            Utc::now(),
        );
        assert_eq!((none.hostnames, none.addresses), (None, None));
    }

    #[test]
    fn restart_needed_names_the_stale_pods() {
        let up_to_date = status(None, None, vec![], &Findings::default(), Utc::now());
        assert_eq!(get(&up_to_date, "RestartNeeded").status, "False");
        let findings = Findings {
            restart_needed: (0..7).map(|i| format!("web-{i}")).collect(),
            ..Default::default()
        };
        let s = status(None, None, vec![], &findings, Utc::now());
        let c = get(&s, "RestartNeeded");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "SpecChanged"));
        assert!(c.message.starts_with("7 pod(s)"), "{}", c.message);
        assert!(
            c.message.contains("web-0, web-1, web-2, web-3, web-4 and 2 more"),
            "{}",
            c.message
        );
        // Not a failure: Ready and Degraded do not change.
        assert_eq!(get(&s, "Degraded").status, "False");
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let t0 = Utc::now() - chrono::Duration::hours(1);
        let first = status(None, None, vec![], &Findings::default(), t0);
        let later = status(Some(&first), None, vec![], &Findings::default(), Utc::now());
        assert_eq!(
            get(&first, "Ready").last_transition_time,
            get(&later, "Ready").last_transition_time
        );
        let failing = Findings {
            credentials: None,
            failures: vec![Problem {
                reason: "MintFailed",
                message: "x".into(),
            }],
            ..Default::default()
        };
        let flipped = status(Some(&later), None, vec![], &failing, Utc::now());
        assert_ne!(
            get(&flipped, "Ready").last_transition_time,
            get(&later, "Ready").last_transition_time
        );
    }
}
