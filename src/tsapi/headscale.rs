//! Headscale's v1 API (0.26–0.29) with an API key: pre-auth keys for a user, node deletion.
//!
//! Headscale's stable node id, which containerboot writes as `device_id`, is the node's numeric
//! id in decimal (`NodeID.StableID()` in `hscontrol/types/node.go`), so a device is deleted with
//! `DELETE /api/v1/node/{device_id}`. A missing node answers gRPC `NotFound`, which the gateway
//! turns into HTTP 404.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::Url;
use serde::Deserialize;
use tokio::sync::OnceCell;

use super::retry::{self, Caller, RetryPolicy};
use super::{ApiError, ConfigError, KeyApi, MintRequest, MintedKey};
use crate::metrics::Metrics;

const API: &str = "headscale";

/// Configuration of a [`HeadscaleApi`]. [`HeadscaleConfig::new`] fills in the defaults.
#[derive(Clone)]
pub struct HeadscaleConfig {
    /// Headscale's server URL, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// An API key (`headscale apikeys create`). Never logged.
    pub api_key: String,
    /// The user that owns the keys: a numeric id, or a name resolved once through the API.
    pub user: String,
    /// Timeout of one HTTP request, default 10 s.
    pub timeout: Duration,
    /// Retries on 429, 5xx and transport errors.
    pub retry: RetryPolicy,
    /// Where retries are counted (`api_retries{api="headscale"}`).
    pub metrics: Option<Arc<Metrics>>,
}

impl HeadscaleConfig {
    /// The defaults for this server, key and user: 10 s timeout, 4 retries.
    pub fn new(base_url: impl Into<String>, api_key: impl Into<String>, user: impl Into<String>) -> Self {
        HeadscaleConfig {
            base_url: base_url.into(),
            api_key: api_key.into(),
            user: user.into(),
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            metrics: None,
        }
    }
}

impl std::fmt::Debug for HeadscaleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadscaleConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .field("user", &self.user)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// [`KeyApi`] over Headscale's v1 API.
pub struct HeadscaleApi {
    http: reqwest::Client,
    base: Url,
    api_key: String,
    user: String,
    retry: RetryPolicy,
    metrics: Option<Arc<Metrics>>,
    /// The user's numeric id, resolved on first use.
    user_id: OnceCell<u64>,
}

impl std::fmt::Debug for HeadscaleApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadscaleApi")
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct UserList {
    #[serde(default)]
    users: Vec<User>,
}

#[derive(Deserialize)]
struct User {
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateAnswer {
    pre_auth_key: PreAuthKey,
}

#[derive(Deserialize)]
struct PreAuthKey {
    #[serde(default)]
    id: Option<String>,
    key: String,
}

impl HeadscaleApi {
    /// Builds the client. Fails only on a bad base URL or TLS set-up.
    pub fn new(config: HeadscaleConfig) -> Result<Self, ConfigError> {
        let HeadscaleConfig {
            base_url,
            api_key,
            user,
            timeout,
            retry,
            metrics,
        } = config;
        let user_id = OnceCell::new_with(user.trim().parse::<u64>().ok());
        Ok(HeadscaleApi {
            http: retry::http_client(timeout)?,
            base: retry::parse_base(&base_url)?,
            api_key,
            user,
            retry,
            metrics,
            user_id,
        })
    }

    fn caller(&self) -> Caller<'_> {
        Caller {
            api: API,
            policy: &self.retry,
            metrics: self.metrics.as_deref(),
        }
    }

    /// The configured user's numeric id; a name is looked up once and cached.
    async fn user_id(&self) -> Result<u64, ApiError> {
        self.user_id.get_or_try_init(|| self.lookup_user()).await.copied()
    }

    async fn lookup_user(&self) -> Result<u64, ApiError> {
        let name = self.user.as_str();
        let mut url = retry::join(&self.base, &["api", "v1", "user"])?;
        url.query_pairs_mut().append_pair("name", name);
        let resp = retry::send(&self.caller(), || self.http.get(url.clone()).bearer_auth(&self.api_key)).await?;
        if !resp.status().is_success() {
            return Err(retry::error_for(resp).await);
        }
        let id = parse_user_id(&retry::read_body(resp).await?, name)?;
        tracing::debug!(api = API, user = name, user_id = id, "resolved Headscale user");
        Ok(id)
    }

    async fn mint_key(&self, req: &MintRequest) -> Result<MintedKey, ApiError> {
        let user = self.user_id().await?;
        let url = retry::join(&self.base, &["api", "v1", "preauthkey"])?;
        let expiration = expiration_after(chrono::Utc::now(), req.expiry).ok_or_else(|| ApiError::BadRequest {
            message: "key expiry is out of range".to_owned(),
        })?;
        let body = serde_json::json!({
            "user": user.to_string(),
            "reusable": false,
            "ephemeral": req.ephemeral,
            "expiration": expiration,
            "aclTags": req.tags,
        });
        let resp = retry::send(&self.caller(), || {
            self.http.post(url.clone()).bearer_auth(&self.api_key).json(&body)
        })
        .await?;
        if !resp.status().is_success() {
            return Err(retry::error_for(resp).await);
        }
        let minted = parse_preauth_key(&retry::read_body(resp).await?)?;
        tracing::debug!(
            api = API,
            key_id = minted.id.as_deref().unwrap_or(""),
            "minted pre-auth key"
        );
        Ok(minted)
    }

    async fn delete(&self, device_id: &str) -> Result<bool, ApiError> {
        // The stable id of a Headscale node is its numeric id; anything else cannot be one.
        let node_id = device_id.trim().parse::<u64>().map_err(|_| ApiError::BadRequest {
            message: format!("device id {device_id:?} is not a Headscale node id"),
        })?;
        let id = node_id.to_string();
        let url = retry::join(&self.base, &["api", "v1", "node", &id])?;
        let resp = retry::send(&self.caller(), || {
            self.http.delete(url.clone()).bearer_auth(&self.api_key)
        })
        .await?;
        retry::gone(resp, API, &id).await
    }

    /// Expires a pre-auth key (`POST /api/v1/preauthkey/expire`, by numeric id since 0.28).
    async fn expire(&self, key_id: &str) -> Result<bool, ApiError> {
        let id = key_id.trim().parse::<u64>().map_err(|_| ApiError::BadRequest {
            message: format!("key id {key_id:?} is not a Headscale pre-auth key id"),
        })?;
        let url = retry::join(&self.base, &["api", "v1", "preauthkey", "expire"])?;
        let body = serde_json::json!({"id": id});
        let resp = retry::send(&self.caller(), || {
            self.http.post(url.clone()).bearer_auth(&self.api_key).json(&body)
        })
        .await?;
        retry::gone(resp, API, key_id).await
    }
}

/// PURE: the numeric id of the user called `name` in the answer of `GET /api/v1/user?name=`.
pub fn parse_user_id(body: &[u8], name: &str) -> Result<u64, ApiError> {
    let list: UserList = retry::decode_json(body)?;
    let user = list
        .users
        .into_iter()
        .find(|u| u.name == name)
        .ok_or_else(|| ApiError::BadRequest {
            message: format!("Headscale has no user named {name:?}"),
        })?;
    user.id
        .parse::<u64>()
        .map_err(|_| ApiError::Decode("Headscale user id is not a number".to_owned()))
}

/// PURE: reads the answer of `POST /api/v1/preauthkey`.
pub fn parse_preauth_key(body: &[u8]) -> Result<MintedKey, ApiError> {
    let answer: CreateAnswer = retry::decode_json(body)?;
    let PreAuthKey { id, key } = answer.pre_auth_key;
    Ok(MintedKey { key, id })
}

/// `now + expiry` in RFC 3339 (seconds, `Z`), or `None` when it is not a representable date.
pub fn expiration_after(now: chrono::DateTime<chrono::Utc>, expiry: Duration) -> Option<String> {
    let expiry = chrono::Duration::from_std(expiry).ok()?;
    let at = now.checked_add_signed(expiry)?;
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

impl KeyApi for HeadscaleApi {
    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedKey, ApiError>> {
        Box::pin(self.mint_key(req))
    }

    fn delete_device<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(self.delete(device_id))
    }

    fn revoke_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(self.expire(key_id))
    }

    fn kind(&self) -> &'static str {
        API
    }
}
