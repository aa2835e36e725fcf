//! The mutating admission webhook: Pod CREATE in, JSONPatch out. The handler reads the
//! TailscaleNode and Namespace caches, calls the pure engine, and always answers with an
//! AdmissionReview.

mod handler;

#[cfg(test)]
use handler::review_dynamic;
pub use handler::{WebhookState, review};

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kube::api::DynamicObject;
use kube::core::admission::AdmissionReview;

use tracing::warn;

use crate::metrics::AdmissionLabels;

/// Path the MutatingWebhookConfiguration calls.
pub const MUTATE_PATH: &str = "/mutate";

async fn mutate(State(state): State<Arc<WebhookState>>, body: Bytes) -> Response {
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
    json_response(&review)
}

/// The review as an `application/json` response, serialised into one buffer sized for it: axum's
/// `Json` writes through a growing `BytesMut`, which costs three times as much for the patch
/// (a JSON array of byte values). A review that does not serialise (it always does) is a 500, as
/// with `Json`.
fn json_response(review: &AdmissionReview<DynamicObject>) -> Response {
    // Each patch byte takes at most 4 characters ("255,"); the rest is small.
    let patch = review
        .response
        .as_ref()
        .and_then(|r| r.patch.as_ref())
        .map_or(0, Vec::len);
    let mut body = Vec::with_capacity(patch * 4 + 1024);
    match serde_json::to_writer(&mut body, review) {
        Ok(()) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response(),
        Err(error) => {
            warn!(%error, "serialising the admission response failed");
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
    }
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
