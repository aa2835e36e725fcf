//! The Tailscale v2 HTTP API through an OAuth client: one cached access token per credential,
//! auth keys minted with the client's tags, devices deleted by their stable node id.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::retry::{self, Caller, RetryPolicy};
use super::{ApiError, ConfigError, KeyApi, MintRequest, MintedKey};
use crate::metrics::Metrics;

/// The public Tailscale API.
pub const DEFAULT_BASE_URL: &str = "https://api.tailscale.com";
/// Longest description the API accepts.
pub const MAX_DESCRIPTION: usize = 50;

const API: &str = "tailscale";

/// Configuration of a [`TailscaleApi`]. [`TailscaleConfig::new`] fills in the defaults.
#[derive(Clone)]
pub struct TailscaleConfig {
    /// API base URL, default [`DEFAULT_BASE_URL`].
    pub base_url: String,
    /// Tailnet name; `-` (default) is the OAuth client's own tailnet.
    pub tailnet: String,
    /// OAuth client id.
    pub client_id: String,
    /// How the client proves itself. Never logged.
    pub grant: Grant,
    /// Timeout of one HTTP request, default 10 s.
    pub timeout: Duration,
    /// Retries on 429, 5xx and transport errors.
    pub retry: RetryPolicy,
    /// Where retries are counted (`api_retries{api="tailscale"}`).
    pub metrics: Option<Arc<Metrics>>,
}

impl TailscaleConfig {
    /// The defaults for this OAuth client: public API, tailnet `-`, 10 s timeout, 4 retries.
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        TailscaleConfig {
            base_url: DEFAULT_BASE_URL.to_owned(),
            tailnet: "-".to_owned(),
            client_id: client_id.into(),
            grant: Grant::Secret(client_secret.into()),
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            metrics: None,
        }
    }
}

/// How an OAuth client gets its access token.
#[derive(Clone)]
pub enum Grant {
    /// The client secret (`POST /api/v2/oauth/token`, client credentials).
    Secret(String),
    /// Workload identity federation: an ID token for `audience` from `source`, exchanged at
    /// `POST /api/v2/oauth/token-exchange` (form `client_id`, `jwt`), as tailscale's own client does.
    IdToken {
        audience: String,
        source: Arc<dyn IdTokenSource>,
    },
}

/// Issues short-lived ID tokens (JWTs) for an audience: the operator's ServiceAccount tokens.
pub trait IdTokenSource: Send + Sync {
    /// A fresh token for `audience`.
    fn id_token<'a>(&'a self, audience: &'a str) -> futures::future::BoxFuture<'a, Result<String, ApiError>>;
}

impl std::fmt::Debug for TailscaleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailscaleConfig")
            .field("base_url", &self.base_url)
            .field("tailnet", &self.tailnet)
            .field("client_id", &self.client_id)
            .field("grant", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// An access token and when to stop using it.
struct CachedToken {
    token: String,
    refresh_at: Instant,
}

/// [`KeyApi`] over the Tailscale v2 API with an OAuth client.
pub struct TailscaleApi {
    http: reqwest::Client,
    base: Url,
    tailnet: String,
    client_id: String,
    grant: Grant,
    retry: RetryPolicy,
    metrics: Option<Arc<Metrics>>,
    /// Held across a token fetch, so concurrent callers share one fetch.
    token: Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for TailscaleApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TailscaleApi")
            .field("base", &self.base.as_str())
            .field("tailnet", &self.tailnet)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct KeyAnswer {
    #[serde(default)]
    id: Option<String>,
    key: String,
}

impl TailscaleApi {
    /// Builds the client. Fails only on a bad base URL or TLS set-up.
    pub fn new(config: TailscaleConfig) -> Result<Self, ConfigError> {
        let TailscaleConfig {
            base_url,
            tailnet,
            client_id,
            grant,
            timeout,
            retry,
            metrics,
        } = config;
        Ok(TailscaleApi {
            http: retry::http_client(timeout)?,
            base: retry::parse_base(&base_url)?,
            tailnet,
            client_id,
            grant,
            retry,
            metrics,
            token: Mutex::new(None),
        })
    }

    fn caller(&self) -> Caller<'_> {
        Caller {
            api: API,
            policy: &self.retry,
            metrics: self.metrics.as_deref(),
        }
    }

    /// A valid access token: the cached one, or a new one fetched while holding the lock.
    async fn token(&self) -> Result<String, ApiError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.token.clone());
        }
        let fetched = self.fetch_token().await?;
        let token = fetched.token.clone();
        *cached = Some(fetched);
        Ok(token)
    }

    /// Drops the cached token if it is still `refused` (another task may have replaced it).
    async fn forget(&self, refused: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.token == refused) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<CachedToken, ApiError> {
        let resp = match &self.grant {
            Grant::Secret(secret) => {
                let url = retry::join(&self.base, &["api", "v2", "oauth", "token"])?;
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", self.client_id.as_str()),
                    ("client_secret", secret.as_str()),
                ];
                retry::send(&self.caller(), || self.http.post(url.clone()).form(&form)).await?
            }
            Grant::IdToken { audience, source } => {
                let url = retry::join(&self.base, &["api", "v2", "oauth", "token-exchange"])?;
                let jwt = source.id_token(audience).await?;
                let form = [
                    ("grant_type", "authorization_code"),
                    ("code", ""),
                    ("client_id", self.client_id.as_str()),
                    ("jwt", jwt.as_str()),
                ];
                retry::send(&self.caller(), || self.http.post(url.clone()).form(&form)).await?
            }
        };
        if !resp.status().is_success() {
            return Err(retry::error_for(resp).await);
        }
        let AccessToken { token, lifetime } = parse_token_answer(&retry::read_body(resp).await?)?;
        tracing::debug!(api = API, lifetime_s = lifetime.as_secs(), "fetched OAuth access token");
        Ok(CachedToken {
            token,
            refresh_at: Instant::now() + usable_for(lifetime),
        })
    }

    /// Sends an authenticated request; on 401 fetches a new token and sends it once more.
    async fn send_authed<F>(&self, build: F) -> Result<Response, ApiError>
    where
        F: Fn(&str) -> RequestBuilder,
    {
        let token = self.token().await?;
        let resp = retry::send(&self.caller(), || build(&token)).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        tracing::debug!(api = API, "access token refused, fetching a new one");
        self.forget(&token).await;
        let token = self.token().await?;
        retry::send(&self.caller(), || build(&token)).await
    }

    async fn mint_key(&self, req: &MintRequest) -> Result<MintedKey, ApiError> {
        let url = retry::join(&self.base, &["api", "v2", "tailnet", &self.tailnet, "keys"])?;
        let body = serde_json::json!({
            "capabilities": {"devices": {"create": {
                "reusable": false,
                "ephemeral": req.ephemeral,
                "preauthorized": true,
                "tags": req.tags,
            }}},
            "expirySeconds": req.expiry.as_secs(),
            "description": sanitize_description(&req.description),
        });
        let resp = self
            .send_authed(|token| self.http.post(url.clone()).bearer_auth(token).json(&body))
            .await?;
        if !resp.status().is_success() {
            return Err(retry::error_for(resp).await);
        }
        let minted = parse_key_answer(&retry::read_body(resp).await?)?;
        tracing::debug!(
            api = API,
            key_id = minted.id.as_deref().unwrap_or(""),
            "minted auth key"
        );
        Ok(minted)
    }

    async fn delete(&self, device_id: &str) -> Result<bool, ApiError> {
        let url = retry::join(&self.base, &["api", "v2", "device", device_id])?;
        let resp = self
            .send_authed(|token| self.http.delete(url.clone()).bearer_auth(token))
            .await?;
        retry::gone(resp, API, device_id).await
    }

    async fn revoke(&self, key_id: &str) -> Result<bool, ApiError> {
        let url = retry::join(&self.base, &["api", "v2", "tailnet", &self.tailnet, "keys", key_id])?;
        let resp = self
            .send_authed(|token| self.http.delete(url.clone()).bearer_auth(token))
            .await?;
        retry::gone(resp, API, key_id).await
    }
}

impl KeyApi for TailscaleApi {
    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedKey, ApiError>> {
        Box::pin(self.mint_key(req))
    }

    fn delete_device<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(self.delete(device_id))
    }

    fn revoke_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(self.revoke(key_id))
    }

    fn kind(&self) -> &'static str {
        API
    }
}

/// An OAuth access token and how long it is valid. `token` is a secret: never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The bearer token.
    pub token: String,
    /// Its lifetime: `expires_in`, default an hour, capped at a day.
    pub lifetime: Duration,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"<redacted>")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// PURE: reads the answer of `POST /api/v2/oauth/token`.
pub fn parse_token_answer(body: &[u8]) -> Result<AccessToken, ApiError> {
    let answer: TokenAnswer = retry::decode_json(body)?;
    // Capped at a day so that a wild `expires_in` cannot overflow the clock.
    let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600).min(86_400));
    Ok(AccessToken {
        token: answer.access_token,
        lifetime,
    })
}

/// PURE: reads the answer of `POST /api/v2/tailnet/{tailnet}/keys`.
pub fn parse_key_answer(body: &[u8]) -> Result<MintedKey, ApiError> {
    let answer: KeyAnswer = retry::decode_json(body)?;
    Ok(MintedKey {
        key: answer.key,
        id: answer.id,
    })
}

/// How long a token of this lifetime is used: the lifetime minus a margin of a quarter of it,
/// at most five minutes (an hour-long token is used for 55 minutes).
pub fn usable_for(lifetime: Duration) -> Duration {
    lifetime.saturating_sub((lifetime / 4).min(Duration::from_secs(300)))
}

/// A description the API accepts: ASCII letters, digits, hyphens and spaces, at most 50
/// characters. Other characters become hyphens; an empty result becomes `tailnode`.
pub fn sanitize_description(description: &str) -> String {
    let cleaned: String = description
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == ' ' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_DESCRIPTION)
        .collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() {
        "tailnode".to_owned()
    } else {
        cleaned.to_owned()
    }
}
