//! The mutating admission webhook: Pod CREATE in, JSONPatch out. The handler reads the
//! TailscaleNode and Namespace caches, calls the pure engine, and always answers with an
//! AdmissionReview.

mod handler;

pub use handler::{WebhookState, review};

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use kube::api::DynamicObject;
use kube::core::admission::AdmissionReview;

use crate::metrics::AdmissionLabels;

/// Path the MutatingWebhookConfiguration calls.
pub const MUTATE_PATH: &str = "/mutate";

async fn mutate(State(state): State<Arc<WebhookState>>, body: Bytes) -> Json<AdmissionReview<DynamicObject>> {
    let started = Instant::now();
    let (review, result) = review(&state, &body);
    state
        .metrics
        .admission_duration
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .admissions
        .get_or_create(&AdmissionLabels { result })
        .inc();
    Json(review)
}

/// The webhook's HTTP routes.
pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new().route(MUTATE_PATH, post(mutate)).with_state(state)
}

/// PURE: whether an apiserver of this `major.minor` runs native sidecars (beta, on by default, 1.29+).
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .ok()
    };
    match (digits(major), digits(minor)) {
        (Some(1), Some(m)) => m >= 29,
        (Some(maj), _) => maj > 1,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
