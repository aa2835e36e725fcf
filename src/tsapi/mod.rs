//! Auth-key and device APIs behind one narrow trait: the Tailscale v2 API (OAuth client),
//! Headscale's v1 API, and a static key. The controller holds one `Arc<dyn KeyApi>` per credential.

use std::time::Duration;

use futures::future::BoxFuture;

pub mod credentials;
pub mod fake;
pub mod headscale;
pub mod retry;
pub mod static_key;
pub mod tailscale;

#[cfg(test)]
mod tests;

pub use credentials::{ResolvedCredentials, build};
pub use headscale::{HeadscaleApi, HeadscaleConfig};
pub use retry::RetryPolicy;
pub use static_key::StaticKey;
pub use tailscale::{Grant, IdTokenSource, TailscaleApi, TailscaleConfig};

/// What to mint: a single-use, pre-authorized key for one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintRequest {
    /// Human-readable description (Tailscale: at most 50 letters, digits, hyphens, spaces).
    pub description: String,
    /// ACL tags the key carries, e.g. `tag:k8s`.
    pub tags: Vec<String>,
    /// Ephemeral device.
    pub ephemeral: bool,
    /// How long the key stays valid if unused.
    pub expiry: Duration,
}

/// A freshly minted key. `key` is a secret: never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct MintedKey {
    /// The auth key itself.
    pub key: String,
    /// The key's id at the API, when it has one.
    pub id: Option<String>,
}

impl std::fmt::Debug for MintedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Errors of a key API. `reason()` is a bounded label for conditions and metrics.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401/403: the credential is wrong or lacks a scope.
    #[error("the API refused the credentials ({status}): {message}")]
    Unauthorized { status: u16, message: String },
    /// 400: the request is not acceptable (e.g. tags the client does not own).
    #[error("the API rejected the request: {message}")]
    BadRequest { message: String },
    /// 429 after the retries ran out.
    #[error("the API is rate limiting us (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx after the retries ran out, or another unexpected status.
    #[error("the API answered {status}: {message}")]
    Server { status: u16, message: String },
    /// Network failure or timeout.
    #[error("could not reach the API: {0}")]
    Transport(String),
    /// The answer could not be understood.
    #[error("unexpected answer from the API: {0}")]
    Decode(String),
    /// The operation does not exist for this credential kind.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl ApiError {
    /// Bounded label: `unauthorized`, `bad_request`, `rate_limited`, `server`, `transport`,
    /// `decode`, `unsupported`.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::BadRequest { .. } => "bad_request",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Server { .. } => "server",
            ApiError::Transport(_) => "transport",
            ApiError::Decode(_) => "decode",
            ApiError::Unsupported(_) => "unsupported",
        }
    }

    /// True when the same call may succeed later without a change on the user's side.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::RateLimited { .. } | ApiError::Server { .. } | ApiError::Transport(_)
        )
    }
}

/// Errors of building a key-API client from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The base URL does not parse or is not http(s).
    #[error("invalid API base URL {url}: {message}")]
    BaseUrl { url: String, message: String },
    /// The HTTP client could not be built (TLS set-up).
    #[error("could not build the HTTP client: {0}")]
    Client(String),
    /// Federated credentials, but this operator has no ServiceAccount token source.
    #[error("workload identity federation needs the operator's ServiceAccount (--service-account)")]
    NoIdTokens,
}

/// Mints auth keys and deletes devices for one credential.
pub trait KeyApi: Send + Sync {
    /// Mints one key.
    fn mint<'a>(&'a self, req: &'a MintRequest) -> BoxFuture<'a, Result<MintedKey, ApiError>>;
    /// Deletes the device with this id (the `device_id` containerboot writes). A device that is
    /// already gone is success. Static keys cannot delete and return `Ok(false)`.
    fn delete_device<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, Result<bool, ApiError>>;
    /// Revokes the unused auth key with this id (the `id` of its `MintedKey`), so it can no longer
    /// join a device. A key already gone is success. APIs that cannot revoke return `Ok(false)`.
    fn revoke_key<'a>(&'a self, _key_id: &'a str) -> BoxFuture<'a, Result<bool, ApiError>> {
        Box::pin(futures::future::ready(Ok(false)))
    }
    /// `tailscale`, `headscale` or `static`.
    fn kind(&self) -> &'static str;
}
