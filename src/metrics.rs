//! Prometheus metrics: one registry, typed families with bounded labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok` or the error's bounded reason.
    pub result: &'static str,
}

/// Labels of an admission.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `injected`, `refreshed`, `skipped`, `denied` or `error`.
    pub result: &'static str,
}

/// Labels of a key-API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// `tailscale`, `headscale` or `static`.
    pub api: &'static str,
    /// `ok` or the error's bounded reason (`ApiError::reason`).
    pub outcome: &'static str,
}

/// Labels of a retried API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `tailscale` or `headscale`.
    pub api: &'static str,
    /// `429`, `5xx` or `transport`.
    pub cause: &'static str,
}

/// Every metric tailnode exports.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Reconcile wall time.
    pub reconcile_duration: Histogram,
    /// Admissions by result.
    pub admissions: Family<AdmissionLabels, Counter>,
    /// Admission handling time (engine + patch), seconds.
    pub admission_duration: Histogram,
    /// Key mints by API and outcome.
    pub key_mints: Family<ApiLabels, Counter>,
    /// Device deletions by API and outcome.
    pub device_deletions: Family<ApiLabels, Counter>,
    /// Retries of API calls by cause.
    pub api_retries: Family<RetryLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tailnode");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let admissions = Family::<AdmissionLabels, Counter>::default();
        let admission_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let key_mints = Family::<ApiLabels, Counter>::default();
        let device_deletions = Family::<ApiLabels, Counter>::default();
        let api_retries = Family::<RetryLabels, Counter>::default();
        registry.register("reconciles", "TailscaleNode reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        registry.register("admissions", "Pod admissions by result", admissions.clone());
        registry.register(
            "admission_duration_seconds",
            "Time spent answering one admission review",
            admission_duration.clone(),
        );
        registry.register("key_mints", "Auth keys minted, by API and outcome", key_mints.clone());
        registry.register(
            "device_deletions",
            "Devices deleted, by API and outcome",
            device_deletions.clone(),
        );
        registry.register("api_retries", "Retried key-API calls, by cause", api_retries.clone());
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            admissions,
            admission_duration,
            key_mints,
            device_deletions,
            api_retries,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_with_labels() {
        let m = Metrics::default();
        m.admissions
            .get_or_create(&AdmissionLabels { result: "injected" })
            .inc();
        m.key_mints
            .get_or_create(&ApiLabels {
                api: "headscale",
                outcome: "ok",
            })
            .inc_by(2);
        let text = m.encode();
        assert!(
            text.contains("tailnode_admissions_total{result=\"injected\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tailnode_key_mints_total{api=\"headscale\",outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(text.contains("# EOF"));
    }
}
