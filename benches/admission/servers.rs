//! The two servers of the admission benchmark, on one single-threaded runtime on their own thread,
//! and the CPU time a thread has run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use core_affinity::CoreId;
use serde::{Deserialize, Serialize};
use tailnode::tls::{ReloadingCert, ServerLimits, serve_https};
use tailnode::webhook::{MUTATE_PATH, router};
use tokio_util::sync::CancellationToken;

use crate::fixture;

/// The running servers.
pub struct Servers {
    /// The webhook router's address.
    pub real: SocketAddr,
    /// The no-op responder's address.
    pub noop: SocketAddr,
    /// The server thread's `/proc` entry, for [`cpu_time`].
    pub task: PathBuf,
    pub thread: std::thread::JoinHandle<()>,
}

/// This thread's `/proc` entry (`/proc/PID/task/TID`).
pub fn this_task() -> PathBuf {
    std::fs::canonicalize("/proc/thread-self").unwrap_or_default()
}

/// CPU time the thread of `task` has run (Linux schedstat); zero when unknown.
pub fn cpu_time(task: &Path) -> Duration {
    std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|ns| ns.parse().ok()))
        .map_or(Duration::ZERO, Duration::from_nanos)
}

#[derive(Deserialize)]
struct NoopReview {
    request: NoopRequest,
}

#[derive(Deserialize)]
struct NoopRequest {
    uid: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NoopAnswer {
    api_version: &'static str,
    kind: &'static str,
    response: NoopResponse,
}

#[derive(Serialize)]
struct NoopResponse {
    uid: String,
    allowed: bool,
}

/// Reads only `request.uid` and allows.
async fn noop(body: Bytes) -> Response {
    match serde_json::from_slice::<NoopReview>(&body) {
        Ok(review) => Json(NoopAnswer {
            api_version: "admission.k8s.io/v1",
            kind: "AdmissionReview",
            response: NoopResponse {
                uid: review.request.uid,
                allowed: true,
            },
        })
        .into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// Starts the webhook router and the no-op responder, each under `serve_https` with the default
/// limits, on one single-threaded runtime on their own thread (pinned to `core`).
pub fn start(resolver: Arc<ReloadingCert>, core: Option<CoreId>, shutdown: CancellationToken) -> Servers {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name("server".into()).spawn(move || {
        if let Some(core) = core {
            assert!(core_affinity::set_for_current(core), "pinning the server thread");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        runtime.block_on(async move {
            let real = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let noop_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send((
                real.local_addr().expect("addr"),
                noop_listener.local_addr().expect("addr"),
                this_task(),
            ))
            .expect("send addresses");
            let real_app = router(Arc::new(fixture::state()));
            let noop_app = Router::new().route(MUTATE_PATH, post(noop));
            let limits = ServerLimits::default();
            let (a, b) = tokio::join!(
                serve_https(real, resolver.clone(), real_app, limits, shutdown.clone()),
                serve_https(noop_listener, resolver, noop_app, limits, shutdown),
            );
            a.expect("webhook server");
            b.expect("no-op server");
        });
    });
    let thread = thread.expect("server thread");
    let (real, noop, task) = rx.recv().expect("server addresses");
    Servers {
        real,
        noop,
        task,
        thread,
    }
}
