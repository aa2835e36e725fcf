//! The webhook's `review` with arbitrary bytes as the HTTP body: never a panic, always an
//! AdmissionReview with a response. The corpus holds real AdmissionReviews to mutate.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tailnode::webhook::WebhookState;
use tailnode_fuzz::{check_review, node_specs, webhook_state};

static STATE: OnceLock<WebhookState> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let state = STATE.get_or_init(|| webhook_state(node_specs()[1].clone(), Arc::default()));
    check_review(data, state);
});
