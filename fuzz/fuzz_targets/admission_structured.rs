//! The webhook's `review` with structured-but-mutated JSON: a real Pod AdmissionReview (and the
//! `web` TailscaleNode it names) edited by the fuzzer's bytes, so that most inputs parse and
//! reach the engine and the patch.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tailnode::metrics::Metrics;
use tailnode::webhook::WebhookState;
use tailnode_fuzz::{admission_review, check_review, mutated, node_specs, pick, pods, webhook_state};

struct Fixtures {
    metrics: Arc<Metrics>,
    specs: Vec<Value>,
    pods: Vec<Value>,
    /// One state per unedited spec of `web`.
    states: Vec<WebhookState>,
}

static FIXTURES: OnceLock<Fixtures> = OnceLock::new();

fn fixtures() -> &'static Fixtures {
    FIXTURES.get_or_init(|| {
        let metrics = Arc::new(Metrics::default());
        let specs = node_specs();
        let states = specs
            .iter()
            .map(|s| webhook_state(s.clone(), metrics.clone()))
            .collect();
        Fixtures {
            metrics,
            specs,
            pods: pods(),
            states,
        }
    })
}

fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let f = fixtures();
    let spec = u.choose_index(f.specs.len())?;
    let edited;
    let state = if u.ratio(1, 4)? {
        edited = webhook_state(mutated(u, &f.specs[spec])?, f.metrics.clone());
        &edited
    } else {
        &f.states[spec]
    };
    let (_, pod) = pick(u, &f.pods, true)?;
    let operation = *u.choose(&["CREATE", "CREATE", "CREATE", "UPDATE", "DELETE", "CONNECT"])?;
    let kind = *u.choose(&["Pod", "Pod", "Pod", "Deployment"])?;
    let mut review = admission_review(pod, operation, kind);
    review["request"]["namespace"] = (*u.choose(&["apps", "apps", "locked", "base", "missing"])?).into();
    if u.ratio(1, 4)? {
        review = mutated(u, &review)?;
    }
    let body = serde_json::to_vec(&review).map_err(|_| arbitrary::Error::IncorrectFormat)?;
    check_review(&body, state);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
