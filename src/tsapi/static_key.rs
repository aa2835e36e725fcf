//! A fixed auth key supplied by the user: handed out as is, and unable to delete devices.

use futures::future::BoxFuture;

use super::{ApiError, KeyApi, MintRequest, MintedKey};

/// [`KeyApi`] that always returns the same key. Tags, expiry and ephemerality are the key's own;
/// the request's are ignored.
#[derive(Clone)]
pub struct StaticKey {
    key: String,
}

impl StaticKey {
    /// Wraps a key (`tskey-auth-…` or a Headscale pre-auth key).
    pub fn new(key: impl Into<String>) -> Self {
        StaticKey { key: key.into() }
    }
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey").field("key", &"<redacted>").finish()
    }
}

impl KeyApi for StaticKey {
    fn mint<'a>(&'a self, _req: &'a MintRequest) -> BoxFuture<'a, Result<MintedKey, ApiError>> {
        Box::pin(futures::future::ready(Ok(MintedKey {
            key: self.key.clone(),
            id: None,
        })))
    }

    fn delete_device<'a>(&'a self, _device_id: &'a str) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(futures::future::ready(Ok(false)))
    }

    fn kind(&self) -> &'static str {
        "static"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn returns_the_key_and_cannot_delete() {
        let api = StaticKey::new("tskey-auth-static");
        let req = MintRequest {
            description: "x".into(),
            tags: vec!["tag:k8s".into()],
            ephemeral: true,
            expiry: Duration::from_secs(60),
        };
        let minted = api.mint(&req).await.unwrap();
        assert_eq!(
            minted,
            MintedKey {
                key: "tskey-auth-static".into(),
                id: None
            }
        );
        assert!(!api.delete_device("n123").await.unwrap());
        assert_eq!(api.kind(), "static");
        assert!(!format!("{api:?}").contains("tskey"));
    }
}
