//! The admin server's routes: `/healthz` (the process answers), `/readyz` (every registered
//! component is ready) and `/metrics` (OpenMetrics text). Serve it with
//! [`crate::tls::serve_http`] on the admin port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// The content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Readiness of named components, shared by cloning. Ready when every registered component is;
/// with none registered it is ready.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    components: Arc<Mutex<Vec<(String, ReadyFlag)>>>,
}

/// One component's readiness; starts not ready. Cloning gives another handle to the same flag.
#[derive(Clone, Debug, Default)]
pub struct ReadyFlag {
    ready: Arc<AtomicBool>,
}

impl ReadyFlag {
    /// Marks the component ready or not.
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the component is ready.
    pub fn get(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

impl Readiness {
    /// No components yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The flag of component `name`, registering it (not ready) on first use; registering the
    /// same name again returns the same flag.
    pub fn register(&self, name: &str) -> ReadyFlag {
        let mut components = self.components.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, flag)) = components.iter().find(|(n, _)| n == name) {
            return flag.clone();
        }
        let flag = ReadyFlag::default();
        components.push((name.to_string(), flag.clone()));
        flag
    }

    /// The components that are not ready, in registration order.
    pub fn not_ready(&self) -> Vec<String> {
        let components = self.components.lock().unwrap_or_else(PoisonError::into_inner);
        components
            .iter()
            .filter(|(_, flag)| !flag.get())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether every registered component is ready.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_empty()
    }
}

/// The admin routes over `metrics` and `ready`.
pub fn router(metrics: Arc<Metrics>, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let not_ready = ready.not_ready();
                async move {
                    if not_ready.is_empty() {
                        (StatusCode::OK, "ok".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {}", not_ready.join(", ")),
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.encode();
                async move { ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response() }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::AdmissionLabels;
    use std::net::SocketAddr;
    use tokio_util::sync::CancellationToken;

    async fn serve(router: Router, shutdown: &CancellationToken) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = shutdown.clone();
        let task = tokio::spawn(async move {
            crate::tls::serve_http(listener, router, Default::default(), shutdown)
                .await
                .unwrap()
        });
        (addr, task)
    }

    async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let response = client.get(format!("http://{addr}{path}")).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    #[tokio::test]
    async fn readyz_lists_components_until_all_are_ready() {
        let ready = Readiness::new();
        let shutdown = CancellationToken::new();
        let (addr, server) = serve(router(Arc::new(Metrics::default()), ready.clone()), &shutdown).await;
        assert_eq!(
            get_text(addr, "/readyz").await,
            (200, "ok".into()),
            "nothing registered"
        );
        let webhook = ready.register("webhook");
        let controller = ready.register("controller");
        assert_eq!(
            get_text(addr, "/readyz").await,
            (503, "not ready: webhook, controller".into())
        );
        webhook.set(true);
        assert_eq!(get_text(addr, "/readyz").await, (503, "not ready: controller".into()));
        ready.register("controller").set(true);
        assert!(controller.get(), "same name, same flag");
        assert_eq!(get_text(addr, "/readyz").await, (200, "ok".into()));
        webhook.set(false);
        assert!(!ready.is_ready());
        assert_eq!(get_text(addr, "/readyz").await, (503, "not ready: webhook".into()));
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn healthz_and_metrics() {
        let metrics = Arc::new(Metrics::default());
        metrics
            .admissions
            .get_or_create(&AdmissionLabels { result: "injected" })
            .inc();
        let shutdown = CancellationToken::new();
        let (addr, server) = serve(router(metrics, Readiness::new()), &shutdown).await;
        assert_eq!(get_text(addr, "/healthz").await, (200, "ok".into()));
        crate::install_crypto_provider();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let m = client.get(format!("http://{addr}/metrics")).send().await.unwrap();
        assert_eq!(m.status(), 200);
        assert_eq!(m.headers()[header::CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        let text = m.text().await.unwrap();
        assert!(
            text.contains("tailnode_admissions_total{result=\"injected\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(get_text(addr, "/nope").await.0, 404);
        shutdown.cancel();
        server.await.unwrap();
    }
}
