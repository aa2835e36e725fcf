//! A MutatingWebhookConfiguration with `clientConfig.url` on loopback routes a Pod CREATE from the
//! real apiserver to a webhook served by this test, and the stored Pod carries its patch.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::{Json, Router, routing::post};
use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::json;
use support::*;

async fn mutate(Json(review): Json<AdmissionReview<DynamicObject>>) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"harness-webhook/seen": "true"}}
    ]))
    .unwrap();
    let resp = AdmissionResponse::from(&req).with_patch(patch).unwrap();
    Json(resp.into_review())
}

/// Serves `router` over TLS on 127.0.0.1 with a certificate from a fresh CA; returns the address
/// and the CA in PEM.
async fn serve_tls(router: Router) -> (SocketAddr, String) {
    tailnode::install_crypto_provider();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let svc = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                }
            });
        }
    });
    (addr, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_routes_pod_create_to_a_loopback_webhook() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "hook", json!({})).await;
    let (addr, ca_pem) = serve_tls(Router::new().route("/mutate", post(mutate))).await;

    let name = unique("harness-hook");
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "probe.harness.tailnode.dev",
            "clientConfig": {
                "url": format!("https://{addr}/mutate"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Fail",
            "timeoutSeconds": 5
        }]
    }))
    .unwrap();
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    hooks.create(&PostParams::default(), &config).await.unwrap();

    // The apiserver picks the new configuration up from its watch within a moment.
    let pods: Api<Pod> = ns.api();
    let mut attempt = 0;
    let stored = eventually(Duration::from_secs(15), || {
        attempt += 1;
        let pods = pods.clone();
        let pod_name = format!("p{attempt}");
        async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": pod_name},
                "spec": {"containers": [{"name": "app", "image": "nginx"}]}
            }))
            .unwrap();
            let created = pods.create(&PostParams::default(), &pod).await.ok()?;
            let seen = created
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.get("harness-webhook/seen").map(String::as_str) == Some("true"));
            seen.then_some(created)
        }
    })
    .await;
    hooks.delete(&name, &DeleteParams::default()).await.unwrap();
    let stored = stored.expect("no Pod CREATE ever reached the loopback webhook");
    let fetched = pods.get(stored.metadata.name.as_deref().unwrap()).await.unwrap();
    assert_eq!(fetched.metadata.annotations.unwrap()["harness-webhook/seen"], "true");
    ns.cleanup().await;
}
