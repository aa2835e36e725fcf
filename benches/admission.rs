//! Admission latency of the webhook over HTTPS (handler + engine + JSONPatch + TLS), at a fixed
//! request rate, bounded in count and time. Prints p50/p90/p99/max.
//!
//! `cargo bench --bench admission -- [RATE_PER_SEC] [REQUESTS]` (defaults: 200/s, 2000 requests).
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use serde_json::json;
use tailnode::api::TailscaleNode;
use tailnode::inject::OperatorDefaults;
use tailnode::metrics::Metrics;
use tailnode::webhook::{WebhookState, router};
use tokio_util::sync::CancellationToken;

fn state() -> WebhookState {
    let mut nodes = Writer::<TailscaleNode>::default();
    let node: TailscaleNode = serde_json::from_value(json!({
        "apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"mode": "auto", "tags": ["tag:k8s"], "serve": [{"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080"}],
                 "outbound": {"socks5Port": 1055, "exportEnv": true}}
    }))
    .unwrap();
    nodes.apply_watcher_event(&Event::Apply(node));
    let mut namespaces = Writer::<Namespace>::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "apps",
        "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}))
    .unwrap();
    namespaces.apply_watcher_event(&Event::Apply(ns));
    WebhookState {
        nodes: nodes.as_reader(),
        namespaces: namespaces.as_reader(),
        native_sidecars: true,
        defaults: OperatorDefaults::default(),
        api_server_host: None,
        metrics: Arc::new(Metrics::default()),
    }
}

fn review(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("00000000-0000-0000-0000-{i:012}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps", "operation": "CREATE", "userInfo": {"username": "bench"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "web-7d9f8c-", "namespace": "apps",
                             "labels": {"app": "web", "tailnode.dev/node": "web"}},
                "spec": {"containers": [
                    {"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}],
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                    {"name": "metrics", "image": "exporter"}]}},
            "dryRun": false
        }
    }))
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    tailnode::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rate: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let count: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000).min(20_000);

    let now = chrono::Utc::now();
    let ca = tailnode::certs::generate_ca(now).unwrap();
    let serving = tailnode::certs::issue_serving(&ca, &["127.0.0.1".to_string()], now).unwrap();
    let resolver = Arc::new(tailnode::tls::ReloadingCert::from_pem(&serving.cert_pem, &serving.key_pem).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let app = router(Arc::new(state()));
    tokio::spawn(tailnode::tls::serve_https(
        listener,
        resolver,
        app,
        tailnode::tls::ServerLimits::default(),
        shutdown.clone(),
    ));

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let url = format!("https://{addr}/mutate");
    // Warm up the connection pool.
    for i in 0..20 {
        client.post(&url).body(review(i)).send().await.unwrap();
    }
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut tasks = Vec::with_capacity(count);
    let mut ticker = tokio::time::interval(interval);
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        ticker.tick().await;
        let (client, url, body) = (client.clone(), url.clone(), review(i));
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let resp = client.post(url).body(body).send().await.unwrap();
            assert!(resp.status().is_success());
            let text = resp.text().await.unwrap();
            assert!(text.contains("\"patchType\":\"JSONPatch\""));
            t.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    shutdown.cancel();
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "admission over HTTPS: {} requests at {rate}/s: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        ms(percentile(&lat, 0.50)),
        ms(percentile(&lat, 0.90)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap()),
    );
}
