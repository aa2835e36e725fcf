//! HTTP plumbing shared by the key APIs: the retry policy (exponential backoff on 429, 5xx and
//! transport errors, honouring `Retry-After`), URL building, and mapping answers to [`ApiError`].

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::{ApiError, ConfigError};
use crate::metrics::{Metrics, RetryLabels};

/// How the retry loop waits. Tests swap in one that records the delay and returns at once.
pub type SleepFn = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// When and how long to back off. `Default`: 4 retries, 200 ms doubling up to 5 s, `Retry-After`
/// honoured up to 30 s, real sleeps.
#[derive(Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub max_retries: u32,
    /// Delay before the first retry; doubles on each further retry.
    pub backoff_base: Duration,
    /// Upper bound of the computed backoff.
    pub backoff_cap: Duration,
    /// Upper bound of a server's `Retry-After`.
    pub retry_after_cap: Duration,
    /// Waits the given time.
    pub sleep: SleepFn,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 4,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(5),
            retry_after_cap: Duration::from_secs(30),
            sleep: Arc::new(|d| Box::pin(tokio::time::sleep(d))),
        }
    }
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_retries", &self.max_retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .field("retry_after_cap", &self.retry_after_cap)
            .finish_non_exhaustive()
    }
}

impl RetryPolicy {
    /// The computed backoff before retry number `retry` (0-based): `base * 2^retry`, capped.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.min(20);
        self.backoff_base.saturating_mul(factor).min(self.backoff_cap)
    }

    /// The delay before retry number `retry`: the server's `Retry-After` when it gave a non-zero
    /// one (capped), else the computed backoff.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(after) if !after.is_zero() => after.min(self.retry_after_cap),
            _ => self.backoff(retry),
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let secs = (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// Who is calling, for metrics and logs, and with which policy.
pub(crate) struct Caller<'a> {
    /// `tailscale` or `headscale`.
    pub api: &'static str,
    /// The retry policy.
    pub policy: &'a RetryPolicy,
    /// Where retries are counted.
    pub metrics: Option<&'a Metrics>,
}

/// A failed attempt that may be retried.
enum Failure {
    RateLimited { retry_after: Option<Duration> },
    Server { status: u16, message: String },
    Transport(String),
}

impl Failure {
    fn cause(&self) -> &'static str {
        match self {
            Failure::RateLimited { .. } => "429",
            Failure::Server { .. } => "5xx",
            Failure::Transport(_) => "transport",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    fn into_error(self) -> ApiError {
        match self {
            Failure::RateLimited { retry_after } => ApiError::RateLimited { retry_after },
            Failure::Server { status, message } => ApiError::Server { status, message },
            Failure::Transport(message) => ApiError::Transport(message),
        }
    }
}

/// Sends the request `build` makes, retrying on 429, 5xx and transport errors. Returns the
/// first answer that is neither (success or a 4xx other than 429); the caller interprets it.
pub(crate) async fn send<F>(caller: &Caller<'_>, mut build: F) -> Result<Response, ApiError>
where
    F: FnMut() -> RequestBuilder,
{
    let mut retry = 0u32;
    loop {
        let failure = match build().send().await {
            Ok(resp) if resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                Failure::RateLimited { retry_after }
            }
            Ok(resp) if resp.status().is_server_error() => {
                let status = resp.status().as_u16();
                Failure::Server {
                    status,
                    message: message_of(resp).await,
                }
            }
            Ok(resp) => return Ok(resp),
            Err(err) => Failure::Transport(error_chain(&err)),
        };
        if retry >= caller.policy.max_retries {
            tracing::debug!(
                api = caller.api,
                cause = failure.cause(),
                retry,
                "key API retries exhausted"
            );
            return Err(failure.into_error());
        }
        let delay = caller.policy.delay(retry, failure.retry_after());
        if let Some(metrics) = caller.metrics {
            metrics
                .api_retries
                .get_or_create(&RetryLabels {
                    api: caller.api,
                    cause: failure.cause(),
                })
                .inc();
        }
        tracing::debug!(
            api = caller.api,
            cause = failure.cause(),
            retry,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "retrying key API call"
        );
        (caller.policy.sleep)(delay).await;
        retry += 1;
    }
}

/// A DELETE answer: success and 404 both mean the object is gone (`Ok(true)`).
pub(crate) async fn gone(resp: Response, api: &'static str, id: &str) -> Result<bool, ApiError> {
    let status = resp.status();
    if status.is_success() || status == StatusCode::NOT_FOUND {
        tracing::debug!(
            api,
            id,
            already_gone = status == StatusCode::NOT_FOUND,
            "deleted at the API"
        );
        return Ok(true);
    }
    Err(error_for(resp).await)
}

/// Maps an unsuccessful, non-retried answer to an error; see [`error_from`].
pub(crate) async fn error_for(resp: Response) -> ApiError {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    error_from(status, &body)
}

/// PURE: an unsuccessful answer's status and body as an error: 400 → `BadRequest`, 401/403 →
/// `Unauthorized`, anything else → `Server`, each with [`message_from`] the body.
pub fn error_from(status: u16, body: &str) -> ApiError {
    let message = message_from(body);
    match status {
        400 => ApiError::BadRequest { message },
        401 | 403 => ApiError::Unauthorized { status, message },
        _ => ApiError::Server { status, message },
    }
}

/// Reads an answer's body.
pub(crate) async fn read_body(resp: Response) -> Result<Vec<u8>, ApiError> {
    resp.bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| ApiError::Transport(error_chain(&e)))
}

/// PURE: decodes a JSON answer body. The error names the position only, never the text, which
/// may hold a key.
pub fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::Decode(format!(
            "{:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

/// The error text of an answer; see [`message_from`].
async fn message_of(resp: Response) -> String {
    message_from(&resp.text().await.unwrap_or_default())
}

/// PURE: the error text of an answer body: its JSON `message` field (Tailscale and Headscale
/// both use it), else the start of the body (at most 200 characters).
pub fn message_from(text: &str) -> String {
    const MAX: usize = 200;
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text)
        && let Some(serde_json::Value::String(message)) = map.get("message")
    {
        return message.clone();
    }
    let text = text.trim();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// An error and its sources, `: `-separated (reqwest's own text is terse).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Parses an API base URL (`https://api.tailscale.com`, `http://127.0.0.1:8080/prefix`).
pub(crate) fn parse_base(url: &str) -> Result<Url, ConfigError> {
    let parsed = Url::parse(url).map_err(|e| ConfigError::BaseUrl {
        url: url.to_owned(),
        message: e.to_string(),
    })?;
    if parsed.cannot_be_a_base() || !matches!(parsed.scheme(), "http" | "https") {
        return Err(ConfigError::BaseUrl {
            url: url.to_owned(),
            message: "not an http(s) base URL".to_owned(),
        });
    }
    Ok(parsed)
}

/// `base` with `segments` appended, each percent-encoded as one path segment.
pub(crate) fn join(base: &Url, segments: &[&str]) -> Result<Url, ApiError> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| ApiError::Decode("base URL cannot take a path".to_owned()))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// A reqwest client with this request timeout, shared by every key API of the process that uses
/// the same timeout: a client holds its TLS configuration (every trusted root, parsed) and a
/// connection pool, and an operator with a credential per namespace would otherwise keep one of
/// each per namespace (tens of MB at 50 namespaces). Requests carry their own authorization, so
/// sharing the pool shares nothing secret. Installs the ring TLS provider first: reqwest built
/// with `rustls-no-provider` panics without one.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, ConfigError> {
    static CLIENTS: std::sync::Mutex<Vec<(Duration, reqwest::Client)>> = std::sync::Mutex::new(Vec::new());
    crate::install_crypto_provider();
    let mut clients = CLIENTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, client)) = clients.iter().find(|(t, _)| *t == timeout) {
        return Ok(client.clone());
    }
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| ConfigError::Client(error_chain(&e)))?;
    clients.push((timeout, client.clone()));
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(0), Duration::from_millis(200));
        assert_eq!(p.backoff(1), Duration::from_millis(400));
        assert_eq!(p.backoff(3), Duration::from_millis(1600));
        assert_eq!(p.backoff(5), Duration::from_secs(5));
        assert_eq!(p.backoff(63), Duration::from_secs(5));
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(0, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(p.delay(0, Some(Duration::from_secs(3600))), Duration::from_secs(30));
        assert_eq!(p.delay(2, Some(Duration::ZERO)), Duration::from_millis(800));
        assert_eq!(p.delay(2, None), Duration::from_millis(800));
    }

    #[test]
    fn parses_retry_after_forms() {
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn joins_and_encodes_segments() {
        let base = parse_base("http://127.0.0.1:9/prefix/").unwrap();
        let url = join(&base, &["api", "v2", "tailnet", "example.com", "keys"]).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/prefix/api/v2/tailnet/example.com/keys"
        );
        let url = join(&base, &["device", "a/b c"]).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9/prefix/device/a%2Fb%20c");
        assert!(parse_base("mailto:x@y").is_err());
        assert!(parse_base("not a url").is_err());
    }

    #[test]
    fn maps_error_answers() {
        let e = error_from(400, r#"{"message":"tags not owned"}"#);
        assert!(matches!(e, ApiError::BadRequest { ref message } if message == "tags not owned"));
        let e = error_from(403, "  forbidden\n");
        assert!(matches!(e, ApiError::Unauthorized { status: 403, ref message } if message == "forbidden"));
        let e = error_from(418, &"é".repeat(300));
        assert!(matches!(e, ApiError::Server { status: 418, ref message } if message.chars().count() == 201));
        // A `message` that is not a string falls back to the body.
        assert_eq!(message_from(r#"{"message":7}"#), r#"{"message":7}"#);
    }

    #[test]
    fn decode_errors_name_the_position_not_the_text() {
        let e = decode_json::<serde_json::Value>(b"{\"key\": tskey-secret").unwrap_err();
        assert!(matches!(e, ApiError::Decode(ref m) if !m.contains("tskey") && m.contains("line 1")));
    }
}
