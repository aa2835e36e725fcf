//! Pure mapping between certificate material and Kubernetes objects: the `kubernetes.io/tls`
//! Secret that stores it, and the JSON patch that puts the CA into a webhook's `caBundle`.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::SecondsFormat;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;

use super::{CertError, Issued, Stored};

/// The Secret type the material is stored as.
pub const SECRET_TYPE: &str = "kubernetes.io/tls";
/// Serving certificate key in the Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Serving private key key in the Secret.
pub const TLS_KEY_KEY: &str = "tls.key";
/// CA bundle key in the Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
/// CA private key key in the Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// Annotation with the serving certificate's notAfter, RFC 3339. Informational, for people and
/// monitoring: tailnode itself reads the validity from the certificate.
pub const NOT_AFTER_ANNOTATION: &str = "tailnode.io/tls-not-after";
/// Label marking the Secret as written by tailnode.
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
const MANAGED_BY: &str = "tailnode";

fn text(data: Option<&BTreeMap<String, ByteString>>, key: &str) -> Option<String> {
    let bytes = data?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// What `secret` holds; anything missing or non-UTF-8 is `None`.
pub fn stored_from_secret(secret: &Secret) -> Stored {
    let data = secret.data.as_ref();
    Stored {
        cert_pem: text(data, TLS_CERT_KEY),
        key_pem: text(data, TLS_KEY_KEY),
        ca_pem: text(data, CA_CERT_KEY),
        ca_key_pem: text(data, CA_KEY_KEY),
    }
}

/// The Secret storing `issued`. With `current`, its metadata (labels, annotations, owner
/// references, resourceVersion for the optimistic-concurrency check) and any other data keys
/// are kept.
pub fn secret_for(current: Option<&Secret>, namespace: &str, name: &str, issued: &Issued) -> Secret {
    let mut secret = current.cloned().unwrap_or_default();
    let meta = &mut secret.metadata;
    meta.name = Some(name.to_string());
    meta.namespace = Some(namespace.to_string());
    meta.managed_fields = None;
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(
        NOT_AFTER_ANNOTATION.to_string(),
        issued.material.not_after.to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    secret.type_ = Some(SECRET_TYPE.to_string());
    secret.string_data = None;
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    let m = &issued.material;
    for (key, value) in [
        (TLS_CERT_KEY, &m.cert_pem),
        (TLS_KEY_KEY, &m.key_pem),
        (CA_CERT_KEY, &m.ca_pem),
        (CA_KEY_KEY, &issued.ca_key_pem),
    ] {
        data.insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
    }
    secret
}

/// A JSON patch setting `caBundle` of every webhook in `config` to `ca_pem`, or `None` when all
/// already have it. Only `caBundle` is touched; each change is guarded by a `test` of the
/// webhook's name at that index, so a concurrent reorder makes the patch fail instead of
/// landing on the wrong webhook.
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    ca_pem: &str,
) -> Result<Option<json_patch::Patch>, CertError> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut ops = Vec::new();
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        let current = webhook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice());
        if current == Some(ca_pem.as_bytes()) {
            continue;
        }
        ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name}));
        ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
    }
    if ops.is_empty() {
        return Ok(None);
    }
    serde_json::from_value(serde_json::Value::Array(ops))
        .map(Some)
        .map_err(|source| CertError::BuildPatch { source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{IssueReason, ServingMaterial};
    use chrono::DateTime;

    fn issued() -> Issued {
        Issued {
            material: ServingMaterial {
                cert_pem: "CERT".into(),
                key_pem: "KEY".into(),
                ca_pem: "CA".into(),
                not_after: DateTime::from_timestamp(1_900_000_000, 0).unwrap_or_default(),
            },
            ca_key_pem: "CAKEY".into(),
            reason: IssueReason::Missing,
            new_ca: true,
        }
    }

    #[test]
    fn secret_round_trips_and_keeps_foreign_metadata() {
        let mut current = Secret::default();
        current.metadata.resource_version = Some("42".into());
        current.metadata.labels = Some(BTreeMap::from([("team".to_string(), "a".to_string())]));
        current.data = Some(BTreeMap::from([("extra".to_string(), ByteString(b"x".to_vec()))]));
        let s = secret_for(Some(&current), "ns", "certs", &issued());
        assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(s.type_.as_deref(), Some(SECRET_TYPE));
        let labels = s.metadata.labels.clone().unwrap();
        assert_eq!(labels["team"], "a");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(s.data.as_ref().unwrap()["extra"].0, b"x");
        assert_eq!(
            s.metadata.annotations.as_ref().unwrap()[NOT_AFTER_ANNOTATION],
            "2030-03-17T17:46:40Z"
        );
        let stored = stored_from_secret(&s);
        assert_eq!(stored.cert_pem.as_deref(), Some("CERT"));
        assert_eq!(stored.key_pem.as_deref(), Some("KEY"));
        assert_eq!(stored.ca_pem.as_deref(), Some("CA"));
        assert_eq!(stored.ca_key_pem.as_deref(), Some("CAKEY"));
    }

    #[test]
    fn empty_or_non_utf8_secret_reads_as_missing() {
        assert_eq!(stored_from_secret(&Secret::default()), Stored::default());
        let s = Secret {
            data: Some(BTreeMap::from([(
                TLS_CERT_KEY.to_string(),
                ByteString(vec![0xff, 0xfe]),
            )])),
            ..Secret::default()
        };
        assert_eq!(stored_from_secret(&s), Stored::default());
    }

    #[test]
    fn patch_touches_only_webhooks_with_a_different_bundle() {
        let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "w"},
            "webhooks": [
                {"name": "a.tailnode.io", "clientConfig": {"url": "https://x/a", "caBundle": base64::engine::general_purpose::STANDARD.encode("CA")},
                 "sideEffects": "None", "admissionReviewVersions": ["v1"]},
                {"name": "b.tailnode.io", "clientConfig": {"url": "https://x/b"},
                 "sideEffects": "None", "admissionReviewVersions": ["v1"]}
            ]
        }))
        .unwrap();
        let patch = ca_bundle_patch(&config, "CA").unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!([
                {"op": "test", "path": "/webhooks/1/name", "value": "b.tailnode.io"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "Q0E="}
            ])
        );
        let mut applied = serde_json::to_value(&config).unwrap();
        json_patch::patch(&mut applied, &patch).unwrap();
        let applied: MutatingWebhookConfiguration = serde_json::from_value(applied).unwrap();
        assert_eq!(ca_bundle_patch(&applied, "CA").unwrap(), None);
        assert_eq!(
            ca_bundle_patch(&MutatingWebhookConfiguration::default(), "CA").unwrap(),
            None
        );
    }
}
