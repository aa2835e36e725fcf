//! Credentials with their Secrets read, and the key API they build.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{
    ConfigError, Grant, HeadscaleApi, HeadscaleConfig, IdTokenSource, KeyApi, StaticKey, TailscaleApi, TailscaleConfig,
};
use crate::metrics::Metrics;

/// Credentials with their secrets read. Never log the values.
#[derive(Clone, PartialEq, Eq)]
pub enum ResolvedCredentials {
    /// Tailscale OAuth client.
    OAuth {
        client_id: String,
        client_secret: String,
        api_url: String,
        tailnet: String,
    },
    /// Tailscale OAuth client trusted through workload identity federation: no secret, the
    /// operator's ServiceAccount token for `audience` instead.
    Federated {
        client_id: String,
        audience: String,
        api_url: String,
        tailnet: String,
    },
    /// Headscale API key.
    Headscale { url: String, api_key: String, user: String },
    /// A static auth key.
    Static { key: String },
}

impl std::fmt::Debug for ResolvedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            ResolvedCredentials::OAuth { .. } => "OAuth",
            ResolvedCredentials::Federated { .. } => "Federated",
            ResolvedCredentials::Headscale { .. } => "Headscale",
            ResolvedCredentials::Static { .. } => "Static",
        };
        write!(f, "ResolvedCredentials::{kind}(<redacted>)")
    }
}

impl ResolvedCredentials {
    /// A digest of the credential content (for caching clients; never the values themselves).
    pub fn cache_key(&self) -> String {
        let parts: Vec<&str> = match self {
            ResolvedCredentials::OAuth {
                client_id,
                client_secret,
                api_url,
                tailnet,
            } => vec!["oauth", client_id, client_secret, api_url, tailnet],
            ResolvedCredentials::Federated {
                client_id,
                audience,
                api_url,
                tailnet,
            } => vec!["federated", client_id, audience, api_url, tailnet],
            ResolvedCredentials::Headscale { url, api_key, user } => vec!["headscale", url, api_key, user],
            ResolvedCredentials::Static { key } => vec!["static", key],
        };
        let mut h = Sha256::new();
        for part in parts {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The key API for `creds`; federated credentials take their ID tokens from `id_tokens`.
pub fn build(
    creds: &ResolvedCredentials,
    metrics: Option<Arc<Metrics>>,
    id_tokens: Option<Arc<dyn IdTokenSource>>,
) -> Result<Arc<dyn KeyApi>, ConfigError> {
    Ok(match creds {
        ResolvedCredentials::OAuth {
            client_id,
            client_secret,
            api_url,
            tailnet,
        } => {
            let mut cfg = TailscaleConfig::new(client_id.clone(), client_secret.clone());
            cfg.base_url = api_url.clone();
            cfg.tailnet = tailnet.clone();
            cfg.metrics = metrics;
            Arc::new(TailscaleApi::new(cfg)?)
        }
        ResolvedCredentials::Federated {
            client_id,
            audience,
            api_url,
            tailnet,
        } => {
            let source = id_tokens.ok_or(ConfigError::NoIdTokens)?;
            let mut cfg = TailscaleConfig::new(client_id.clone(), String::new());
            cfg.grant = Grant::IdToken {
                audience: audience.clone(),
                source,
            };
            cfg.base_url = api_url.clone();
            cfg.tailnet = tailnet.clone();
            cfg.metrics = metrics;
            Arc::new(TailscaleApi::new(cfg)?)
        }
        ResolvedCredentials::Headscale { url, api_key, user } => {
            let mut cfg = HeadscaleConfig::new(url.clone(), api_key.clone(), user.clone());
            cfg.metrics = metrics;
            Arc::new(HeadscaleApi::new(cfg)?)
        }
        ResolvedCredentials::Static { key } => Arc::new(StaticKey::new(key.clone())),
    })
}
