//! Self-managed webhook certificates against a real kube-apiserver: the Secret is created once
//! and reused, rotated near expiry, replicas racing converge on one Secret, the caBundle of a
//! MutatingWebhookConfiguration is patched without touching its other fields, and the apiserver
//! itself trusts the webhook served with the material, across a rotation.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::{Json, Router, routing::post};
use chrono::{TimeDelta, Utc};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Api, Client};
use serde_json::json;
use support::*;
use tailnode::certs::{SelfManagedConfig, ServingMaterial, ensure_self_managed, run_rotation};
use tailnode::tls::{ReloadingCert, ServerLimits, certs_from_pem, serve_https};
use tokio_util::sync::CancellationToken;

const FIELD_MANAGER: &str = "tailnode-tests";

fn config(ns: &str, secret: &str, dns_names: &[&str], webhook: Option<&str>) -> SelfManagedConfig {
    SelfManagedConfig {
        namespace: ns.to_string(),
        secret_name: secret.to_string(),
        dns_names: dns_names.iter().map(|s| s.to_string()).collect(),
        webhook_config_name: webhook.map(str::to_string),
        field_manager: FIELD_MANAGER.to_string(),
    }
}

fn default_config(ns: &str, secret: &str, webhook: Option<&str>) -> SelfManagedConfig {
    let svc = format!("tailnode-webhook.{ns}.svc");
    config(ns, secret, &[&svc], webhook)
}

fn data(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

fn assert_secret_holds(secret: &Secret, m: &ServingMaterial) {
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(data(secret, "tls.crt"), m.cert_pem);
    assert_eq!(data(secret, "tls.key"), m.key_pem);
    assert_eq!(data(secret, "ca.crt"), m.ca_pem);
    assert!(data(secret, "ca.key").contains("PRIVATE KEY"));
}

fn ca_bundles(config: &MutatingWebhookConfiguration) -> Vec<Option<Vec<u8>>> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.clone()))
        .collect()
}

/// A webhook configuration that calls `url` for ConfigMap CREATEs in the namespaces `selector`
/// matches.
async fn create_webhook_config(
    client: &Client,
    url: &str,
    selector: serde_json::Value,
    failure_policy: &str,
    hooks: &[&str],
) -> String {
    let name = unique("certs-hook");
    let webhooks: Vec<_> = hooks
        .iter()
        .map(|hook| {
            json!({
                "name": hook,
                "clientConfig": {"url": url},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}],
                "namespaceSelector": selector,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "failurePolicy": failure_policy,
                "timeoutSeconds": 5
            })
        })
        .collect();
    let config: MutatingWebhookConfiguration =
        serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": webhooks})).unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    name
}

fn matches_nothing() -> serde_json::Value {
    json!({"matchExpressions": [{"key": "tailnode.io/harness-never", "operator": "Exists"}]})
}

#[tokio::test]
async fn creates_once_patches_the_ca_bundle_and_then_reuses() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "certs", json!({})).await;
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let hook_name = create_webhook_config(
        &client,
        "https://127.0.0.1:1/x",
        matches_nothing(),
        "Ignore",
        &["a.certs.tailnode.dev", "b.certs.tailnode.dev"],
    )
    .await;
    let cfg = default_config(&ns.name, "webhook-certs", Some(&hook_name));

    let first = ensure_self_managed(client.clone(), &cfg, Utc::now()).await.unwrap();
    let secrets: Api<Secret> = ns.api();
    let secret = secrets.get("webhook-certs").await.unwrap();
    assert_secret_holds(&secret, &first);
    assert!(first.not_after > Utc::now() + TimeDelta::days(360));
    let hook = hooks.get(&hook_name).await.unwrap();
    let want = Some(first.ca_pem.as_bytes().to_vec());
    assert_eq!(ca_bundles(&hook), vec![want.clone(), want]);
    for webhook in hook.webhooks.as_ref().unwrap() {
        assert_eq!(webhook.client_config.url.as_deref(), Some("https://127.0.0.1:1/x"));
        assert_eq!(webhook.timeout_seconds, Some(5));
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(webhook.rules.as_ref().unwrap().len(), 1);
    }

    // Again: same material, nothing written.
    let second = ensure_self_managed(client.clone(), &cfg, Utc::now()).await.unwrap();
    assert_eq!(second, first);
    let again = secrets.get("webhook-certs").await.unwrap();
    assert_eq!(again.metadata.resource_version, secret.metadata.resource_version);
    let hook_again = hooks.get(&hook_name).await.unwrap();
    assert_eq!(hook_again.metadata.resource_version, hook.metadata.resource_version);

    // A webhook whose caBundle someone reset is fixed on the next call.
    let mut reset = hook_again.clone();
    reset.webhooks.as_mut().unwrap()[1].client_config.ca_bundle = None;
    hooks.replace(&hook_name, &PostParams::default(), &reset).await.unwrap();
    ensure_self_managed(client.clone(), &cfg, Utc::now()).await.unwrap();
    let fixed = hooks.get(&hook_name).await.unwrap();
    assert!(
        ca_bundles(&fixed)
            .iter()
            .all(|b| b.as_deref() == Some(first.ca_pem.as_bytes()))
    );

    // A patch computed from a stale read (webhooks since reordered) is refused by its `test` ops
    // with 422 Invalid, which ensure_self_managed treats as "re-read and retry".
    let mut stale = fixed.clone();
    stale.webhooks.as_mut().unwrap().reverse();
    for webhook in stale.webhooks.as_mut().unwrap() {
        webhook.client_config.ca_bundle = None;
    }
    let patch = tailnode::certs::objects::ca_bundle_patch(&stale, "other")
        .unwrap()
        .unwrap();
    let refused = hooks
        .patch(
            &hook_name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Json::<()>(patch),
        )
        .await
        .unwrap_err();
    assert!(matches!(&refused, kube::Error::Api(s) if s.is_invalid()), "{refused:?}");

    // A missing webhook configuration is an error that names it.
    let missing = default_config(&ns.name, "webhook-certs", Some("tailnode-no-such-config"));
    let err = ensure_self_managed(client.clone(), &missing, Utc::now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "read_webhook");

    hooks.delete(&hook_name, &DeleteParams::default()).await.unwrap();
    ns.cleanup().await;
}

#[tokio::test]
async fn near_expiry_material_is_rotated_with_the_same_ca() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "certs", json!({})).await;
    let cfg = default_config(&ns.name, "webhook-certs", None);
    let now = Utc::now();
    // Issued 300 days ago: 65 days left.
    let old = ensure_self_managed(client.clone(), &cfg, now - TimeDelta::days(300))
        .await
        .unwrap();
    assert!(tailnode::certs::needs_rotation(old.not_after, now));

    let rotated = ensure_self_managed(client.clone(), &cfg, now).await.unwrap();
    assert_ne!(rotated.cert_pem, old.cert_pem);
    assert_ne!(rotated.key_pem, old.key_pem);
    assert_eq!(rotated.ca_pem, old.ca_pem, "same CA, caBundle unchanged");
    assert!(rotated.not_after > now + TimeDelta::days(360));
    assert_secret_holds(&ns.api::<Secret>().get("webhook-certs").await.unwrap(), &rotated);
    assert_eq!(ensure_self_managed(client.clone(), &cfg, now).await.unwrap(), rotated);
    ns.cleanup().await;
}

#[tokio::test]
async fn a_secret_of_another_type_or_with_garbage_is_replaced() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "certs", json!({})).await;
    let secrets: Api<Secret> = ns.api();
    let opaque: Secret = serde_json::from_value(json!({
        "metadata": {"name": "webhook-certs", "labels": {"keep": "me"}},
        "type": "Opaque",
        "stringData": {"tls.crt": "garbage"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &opaque).await.unwrap();
    let cfg = default_config(&ns.name, "webhook-certs", None);
    let material = ensure_self_managed(client.clone(), &cfg, Utc::now()).await.unwrap();
    assert_secret_holds(&secrets.get("webhook-certs").await.unwrap(), &material);

    // Garbage in a TLS Secret: replaced in place, other labels kept.
    let mut broken = secrets.get("webhook-certs").await.unwrap();
    broken.data.as_mut().unwrap().insert(
        "tls.crt".into(),
        k8s_openapi::ByteString(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec()),
    );
    broken
        .metadata
        .labels
        .get_or_insert_default()
        .insert("keep".into(), "me".into());
    secrets
        .replace("webhook-certs", &PostParams::default(), &broken)
        .await
        .unwrap();
    let repaired = ensure_self_managed(client.clone(), &cfg, Utc::now()).await.unwrap();
    assert_eq!(
        repaired.ca_pem, material.ca_pem,
        "the CA survives a broken serving certificate"
    );
    let secret = secrets.get("webhook-certs").await.unwrap();
    assert_secret_holds(&secret, &repaired);
    assert_eq!(secret.metadata.labels.unwrap()["keep"], "me");
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replicas_converge_on_one_secret() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "certs", json!({})).await;
    let secrets: Api<Secret> = ns.api();
    let replicas: Vec<Client> = vec![h.client().await, h.client().await, h.client().await];
    for round in 0..3 {
        let cfg = default_config(&ns.name, &format!("race-{round}"), None);
        let now = Utc::now();
        // First creation, racing.
        let results = futures::future::join_all(
            replicas
                .iter()
                .map(|c| ensure_self_managed(c.clone(), &cfg, now - TimeDelta::days(300))),
        )
        .await;
        let results: Vec<ServingMaterial> = results.into_iter().map(Result::unwrap).collect();
        assert!(
            results.iter().all(|m| *m == results[0]),
            "round {round}: creation diverged"
        );
        assert_secret_holds(&secrets.get(&cfg.secret_name).await.unwrap(), &results[0]);

        // Rotation, racing.
        let rotated =
            futures::future::join_all(replicas.iter().map(|c| ensure_self_managed(c.clone(), &cfg, now))).await;
        let rotated: Vec<ServingMaterial> = rotated.into_iter().map(Result::unwrap).collect();
        assert!(
            rotated.iter().all(|m| *m == rotated[0]),
            "round {round}: rotation diverged"
        );
        assert_ne!(rotated[0].cert_pem, results[0].cert_pem);
        assert_eq!(rotated[0].ca_pem, results[0].ca_pem);
        assert_secret_holds(&secrets.get(&cfg.secret_name).await.unwrap(), &rotated[0]);
    }
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rotation_pushes_rotated_material_into_the_server() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "certs", json!({})).await;
    let cfg = default_config(&ns.name, "webhook-certs", None);
    let old = ensure_self_managed(client.clone(), &cfg, Utc::now() - TimeDelta::days(300))
        .await
        .unwrap();
    let reloading = Arc::new(ReloadingCert::from_pem(&old.cert_pem, &old.key_pem).unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_rotation(
        client.clone(),
        cfg.clone(),
        reloading.clone(),
        Duration::from_millis(100),
        shutdown.clone(),
    ));
    let old_der = certs_from_pem(old.cert_pem.as_bytes()).unwrap().remove(0);
    let served = eventually(Duration::from_secs(15), || {
        let current = reloading.current().cert[0].clone();
        let changed = current != old_der;
        async move { changed.then_some(current) }
    })
    .await
    .expect("run_rotation never replaced the expiring certificate");
    let secret = ns.api::<Secret>().get("webhook-certs").await.unwrap();
    assert_eq!(
        served,
        certs_from_pem(&secret.data.unwrap()["tls.crt"].0).unwrap().remove(0)
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    ns.cleanup().await;
}

async fn mutate(Json(review): Json<AdmissionReview<DynamicObject>>) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return Json(AdmissionResponse::invalid(e.to_string()).into_review()),
    };
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {"certs-harness/seen": "true"}}
    ]))
    .unwrap();
    Json(AdmissionResponse::from(&req).with_patch(patch).unwrap().into_review())
}

/// Creates ConfigMaps until one comes back annotated by the webhook.
async fn webhook_answers(cms: &Api<ConfigMap>, prefix: &str) -> bool {
    let mut attempt = 0;
    eventually(Duration::from_secs(20), || {
        attempt += 1;
        let cms = cms.clone();
        let name = format!("{prefix}-{attempt}");
        async move {
            let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
            let created = cms.create(&PostParams::default(), &cm).await.ok()?;
            let annotations = created.metadata.annotations?;
            (annotations.get("certs-harness/seen").map(String::as_str) == Some("true")).then_some(())
        }
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_trusts_the_self_managed_certificate_across_a_rotation() {
    let h = harness();
    let client = h.client().await;
    let ns = TestNamespace::new(&client, "certs", json!({})).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hook_name = create_webhook_config(
        &client,
        &format!("https://{addr}/mutate"),
        json!({"matchLabels": {"kubernetes.io/metadata.name": ns.name}}),
        "Fail",
        &["cm.certs.tailnode.dev"],
    )
    .await;
    let cfg = config(&ns.name, "webhook-certs", &["127.0.0.1"], Some(&hook_name));
    // Material issued 300 days ago: valid, but due for rotation.
    let old = ensure_self_managed(client.clone(), &cfg, Utc::now() - TimeDelta::days(300))
        .await
        .unwrap();
    let reloading = Arc::new(ReloadingCert::from_pem(&old.cert_pem, &old.key_pem).unwrap());
    let serve = |listener, shutdown: &CancellationToken| {
        tokio::spawn(serve_https(
            listener,
            reloading.clone(),
            Router::new().route("/mutate", post(mutate)),
            ServerLimits::default(),
            shutdown.clone(),
        ))
    };
    let first_shutdown = CancellationToken::new();
    let first_server = serve(listener, &first_shutdown);
    let cms: Api<ConfigMap> = ns.api();
    let before = webhook_answers(&cms, "before").await;

    let rotated = ensure_self_managed(client.clone(), &cfg, Utc::now()).await.unwrap();
    assert_ne!(rotated.cert_pem, old.cert_pem);
    reloading.set(&rotated.cert_pem, &rotated.key_pem).unwrap();
    // Restart on the same port so the apiserver has to make a new handshake, which now gets the
    // rotated certificate.
    first_shutdown.cancel();
    first_server.await.unwrap().unwrap();
    let second_shutdown = CancellationToken::new();
    let second_server = serve(tokio::net::TcpListener::bind(addr).await.unwrap(), &second_shutdown);
    let after = webhook_answers(&cms, "after").await;

    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(&hook_name, &DeleteParams::default())
        .await
        .unwrap();
    second_shutdown.cancel();
    second_server.await.unwrap().unwrap();
    assert!(
        before,
        "the apiserver never got through to the webhook with the first certificate"
    );
    assert!(
        after,
        "the apiserver never got through to the webhook after the rotation"
    );
    ns.cleanup().await;
}
