//! Tests of the HTTP key APIs against the contract fake and a Headscale stub.

mod headscale;
mod tailscale;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{MintRequest, RetryPolicy};
use crate::metrics::{Metrics, RetryLabels};

/// A retry policy whose sleeps return at once and are recorded.
pub(super) fn recording_policy() -> (RetryPolicy, Arc<Mutex<Vec<Duration>>>) {
    let slept = Arc::new(Mutex::new(Vec::new()));
    let record = slept.clone();
    let policy = RetryPolicy {
        sleep: Arc::new(move |d| {
            record.lock().unwrap().push(d);
            Box::pin(async {})
        }),
        ..RetryPolicy::default()
    };
    (policy, slept)
}

pub(super) fn slept(sleeps: &Arc<Mutex<Vec<Duration>>>) -> Vec<Duration> {
    sleeps.lock().unwrap().clone()
}

pub(super) fn request(description: &str, tags: &[&str]) -> MintRequest {
    MintRequest {
        description: description.to_owned(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        ephemeral: true,
        expiry: Duration::from_secs(3600),
    }
}

pub(super) fn retries(metrics: &Metrics, api: &'static str, cause: &'static str) -> u64 {
    metrics.api_retries.get_or_create(&RetryLabels { api, cause }).get()
}

/// A loopback URL where nothing listens.
pub(super) async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}
