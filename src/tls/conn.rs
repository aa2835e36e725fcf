//! One connection: the handshake under its timeout, then hyper (HTTP/1.1 or h2) with a header
//! read timeout, an idle timeout, a request timeout and a body cap.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::limits::{ConnectionPermit, ServerLimits};

/// PURE: whether a request announces a body larger than `max` bytes.
pub(crate) fn announces_too_large<B>(request: &Request<B>, max: usize) -> bool {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > u64::try_from(max).unwrap_or(u64::MAX))
}

/// When a connection last started or finished a request, and how many it has in flight.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    in_flight: usize,
    last: Instant,
    served: bool,
}

/// A request in flight; dropping it marks the connection active now.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(|s| s.in_flight = s.in_flight.saturating_sub(1));
    }
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                last: Instant::now(),
                served: false,
            }),
        })
    }

    fn update(&self, f: impl FnOnce(&mut ActivityState)) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state);
        state.last = Instant::now();
    }

    fn snapshot(&self) -> ActivityState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.update(|s| {
            s.in_flight += 1;
            s.served = true;
        });
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle` (or, before its first
    /// request, for `first`).
    async fn idle(&self, first: Duration, idle: Duration) {
        loop {
            let state = self.snapshot();
            if state.in_flight > 0 {
                tokio::time::sleep(idle).await;
                continue;
            }
            let deadline = state.last + if state.served { idle } else { first };
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The router as a hyper service that tracks [`Activity`], refuses announced oversized bodies
/// (413) and bounds each request (408).
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    limits: ServerLimits,
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = code;
    response
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.start();
        if announces_too_large(&request, self.limits.max_body_bytes) {
            return Box::pin(std::future::ready(Ok(status(StatusCode::PAYLOAD_TOO_LARGE))));
        }
        let response = self.inner.call(request);
        let timeout = self.limits.request_timeout;
        Box::pin(async move {
            let _in_flight = in_flight;
            match tokio::time::timeout(timeout, response).await {
                Ok(response) => response,
                Err(_) => {
                    debug!("request timed out");
                    Ok(status(StatusCode::REQUEST_TIMEOUT))
                }
            }
        })
    }
}

/// Serves one accepted connection until it ends, idles out, or `shutdown` fires. `permit` holds
/// its place under the connection caps until then.
pub(crate) async fn serve_connection<F, IO>(
    handshake: F,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
    peer: SocketAddr,
    permit: ConnectionPermit,
) where
    F: Future<Output = std::io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _permit = permit;
    let io = tokio::select! {
        () = shutdown.cancelled() => return,
        done = tokio::time::timeout(limits.handshake_timeout, handshake) => match done {
            Ok(Ok(io)) => io,
            Ok(Err(error)) => {
                debug!(%error, %peer, "connection handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "connection handshake timed out");
                return;
            }
        },
    };
    let activity = Activity::new();
    let service = Tracked {
        inner: TowerToHyperService::new(router),
        activity: activity.clone(),
        limits,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = activity.idle(limits.header_read_timeout, limits.idle_timeout) => {
            debug!(%peer, "closing an idle connection");
            connection.as_mut().graceful_shutdown();
            // A client that ignores GOAWAY, or stalls inside a frame, is dropped.
            match tokio::time::timeout(limits.header_read_timeout, connection).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(error) = result {
        debug!(%error, %peer, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(length: Option<&str>) -> Request<()> {
        let mut builder = Request::post("/");
        if let Some(length) = length {
            builder = builder.header(header::CONTENT_LENGTH, length);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn announced_body_sizes_over_the_cap_are_too_large() {
        assert!(!announces_too_large(&request(None), 10));
        assert!(!announces_too_large(&request(Some("10")), 10));
        assert!(announces_too_large(&request(Some("11")), 10));
        assert!(!announces_too_large(&request(Some("garbage")), 10));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_in_flight_and_restarts_after_each() {
        let (first, idle) = (Duration::from_secs(1), Duration::from_secs(5));
        let activity = Activity::new();
        let start = Instant::now();
        // Without a request, the first-request deadline applies.
        activity.idle(first, idle).await;
        assert_eq!(start.elapsed(), first);

        let request = activity.start();
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(first, idle).await }
        });
        tokio::time::sleep(idle * 3).await;
        assert!(!waiting.is_finished(), "a request in flight keeps the connection");
        let ended = Instant::now();
        drop(request);
        waiting.await.unwrap();
        assert!(ended.elapsed() >= idle, "{:?}", ended.elapsed());
        assert!(ended.elapsed() <= idle * 2, "{:?}", ended.elapsed());
    }
}
