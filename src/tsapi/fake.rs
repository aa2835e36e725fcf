//! A contract fake of the Tailscale v2 API: a real HTTP server on `127.0.0.1:0` that enforces
//! what tailnode relies on — OAuth client credentials and Bearer tokens that expire, tag
//! ownership, descriptions of at most 50 letters/digits/hyphens/spaces, keys shown only once,
//! device deletion with 404 for unknown devices — and can play scripted failures. Public so
//! that integration tests in `tests/` can use it; not for production.
//!
//! Tag ownership is simplified: a requested tag must equal one of the client's tags.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Form, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The OAuth client the fake knows.
#[derive(Debug, Clone, Default)]
pub struct FakeConfig {
    /// Accepted client id.
    pub client_id: String,
    /// Accepted client secret.
    pub client_secret: String,
    /// Tags the client owns; a key may only carry these. Empty: every mint fails with 400.
    pub client_tags: Vec<String>,
}

/// One scripted answer, consumed by the next request to a keys or device endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// Answer this status (with `Retry-After: secs` when given) instead of handling the request.
    Status(u16, Option<u64>),
    /// Wait this long, then handle the request normally (lets a client time out).
    Stall(Duration),
}

/// A key the fake minted. The key string itself is not kept: it is shown once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintRecord {
    /// The key id.
    pub id: String,
    /// Tags requested.
    pub tags: Vec<String>,
    /// Ephemeral devices.
    pub ephemeral: bool,
    /// Reusable key.
    pub reusable: bool,
    /// Pre-authorized devices.
    pub preauthorized: bool,
    /// `expirySeconds` as sent.
    pub expiry_seconds: Option<u64>,
    /// Description as sent.
    pub description: String,
    /// The tailnet in the path.
    pub tailnet: String,
}

/// One request the fake answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Status answered.
    pub status: u16,
}

/// Everything the fake has seen and done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Access tokens issued.
    pub tokens_issued: usize,
    /// Keys minted, in order.
    pub mints: Vec<MintRecord>,
    /// Devices deleted, in order (404s are not deletions).
    pub deletions: Vec<String>,
    /// Auth keys revoked (deleted) by id, in order (404s are not revocations).
    pub revocations: Vec<String>,
    /// Every request, in order of completion.
    pub requests: Vec<RequestRecord>,
    /// ID tokens exchanged for access tokens (workload identity federation), in order.
    pub exchanges: Vec<Exchange>,
}

/// One accepted token exchange: the ID token's subject and audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub subject: String,
    pub audience: String,
}

struct Inner {
    config: FakeConfig,
    token_ttl: Duration,
    tokens: HashMap<String, Instant>,
    devices: BTreeSet<String>,
    script: VecDeque<Scripted>,
    /// Timed faults: each answers every keys/device request until its deadline.
    outage: VecDeque<(Instant, Scripted)>,
    /// The audience the client trusts for token exchange (none: exchange is refused).
    trusted_audience: Option<String>,
    ledger: Ledger,
    seq: u64,
}

impl Inner {
    /// The next scripted answer, else the fault of the outage phase running now.
    fn fault(&mut self, now: Instant) -> Option<Scripted> {
        if let Some(s) = self.script.pop_front() {
            return Some(s);
        }
        while self.outage.front().is_some_and(|(until, _)| *until <= now) {
            self.outage.pop_front();
        }
        self.outage.front().map(|(_, s)| s.clone())
    }
}

#[derive(Clone)]
struct Shared(Arc<Mutex<Inner>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The running fake. Dropping it stops the server.
pub struct FakeTailscale {
    addr: SocketAddr,
    shared: Shared,
    task: JoinHandle<()>,
}

impl FakeTailscale {
    /// Starts the fake on `127.0.0.1:0`.
    ///
    /// # Panics
    /// When no loopback port can be bound (test support only; see [`FakeTailscale::try_start`]).
    #[allow(clippy::expect_used)]
    pub async fn start(config: FakeConfig) -> FakeTailscale {
        Self::try_start(config)
            .await
            .expect("bind the fake Tailscale API on 127.0.0.1:0")
    }

    /// Starts the fake on `127.0.0.1:0`.
    pub async fn try_start(config: FakeConfig) -> std::io::Result<FakeTailscale> {
        Self::try_start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts the fake on `addr` (e.g. a harness bridge address that pods reach).
    pub async fn try_start_on(config: FakeConfig, addr: SocketAddr) -> std::io::Result<FakeTailscale> {
        let shared = Shared(Arc::new(Mutex::new(Inner {
            config,
            token_ttl: Duration::from_secs(3600),
            tokens: HashMap::new(),
            devices: BTreeSet::new(),
            script: VecDeque::new(),
            outage: VecDeque::new(),
            trusted_audience: None,
            ledger: Ledger::default(),
            seq: 0,
        })));
        let router = Router::new()
            .route("/api/v2/oauth/token", post(issue_token))
            .route("/api/v2/oauth/token-exchange", post(exchange::exchange_token))
            .route("/api/v2/tailnet/{tailnet}/keys", post(mint_key))
            .route("/api/v2/tailnet/{tailnet}/keys/{id}", delete(revoke_key))
            .route("/api/v2/device/{id}", delete(delete_device))
            .layer(middleware::from_fn_with_state(shared.clone(), record_and_script))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        // No Nagle: a response written in pieces would otherwise wait for the client's delayed
        // ACK (tens of milliseconds), which no real API adds.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(FakeTailscale { addr, shared, task })
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the ledger.
    pub fn ledger(&self) -> Ledger {
        self.shared.lock().ledger.clone()
    }

    /// Registers a device that DELETE can remove.
    pub fn add_device(&self, id: impl Into<String>) {
        self.shared.lock().devices.insert(id.into());
    }

    /// Devices still registered, sorted.
    pub fn devices(&self) -> Vec<String> {
        self.shared.lock().devices.iter().cloned().collect()
    }

    /// Appends scripted answers for the next keys/device requests.
    pub fn script(&self, steps: Vec<Scripted>) {
        self.shared.lock().script.extend(steps);
    }

    /// Starts an outage of the keys/device endpoints: each `(length, answer)` phase answers every
    /// request that way for its length, one after the other, starting now. Returns when it ends.
    pub fn outage(&self, phases: Vec<(Duration, Scripted)>) -> Instant {
        let mut inner = self.shared.lock();
        let mut at = Instant::now();
        inner.outage.clear();
        for (length, answer) in phases {
            at += length;
            inner.outage.push_back((at, answer));
        }
        at
    }

    /// Lets the client trust ID tokens for `audience` (workload identity federation): the token
    /// exchange accepts a JWT whose `aud` holds it and whose `exp` is ahead. The fake reads the
    /// claims but does not check the signature (Tailscale checks it against the issuer's keys).
    pub fn trust_audience(&self, audience: &str) {
        self.shared.lock().trusted_audience = Some(audience.to_string());
    }

    /// Replaces the client's tags (empty: every mint fails with 400).
    pub fn set_client_tags(&self, tags: Vec<String>) {
        self.shared.lock().config.client_tags = tags;
    }

    /// Lifetime of tokens issued from now on (default one hour).
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.shared.lock().token_ttl = ttl;
    }

    /// Invalidates every issued token: the next call with one gets 401.
    pub fn revoke_tokens(&self) {
        self.shared.lock().tokens.clear();
    }
}

impl Drop for FakeTailscale {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn message(status: StatusCode, text: impl Into<String>) -> Response {
    (status, Json(json!({ "message": text.into() }))).into_response()
}

/// Records every request; plays the script on keys and device endpoints.
async fn record_and_script(State(shared): State<Shared>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let scripted = if path.starts_with("/api/v2/tailnet/") || path.starts_with("/api/v2/device/") {
        shared.lock().fault(Instant::now())
    } else {
        None
    };
    let resp = match scripted {
        Some(Scripted::Status(code, retry_after)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = message(status, format!("scripted {code}"));
            if let Some(secs) = retry_after {
                resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
            }
            resp
        }
        Some(Scripted::Stall(wait)) => {
            tokio::time::sleep(wait).await;
            next.run(req).await
        }
        None => next.run(req).await,
    };
    let status = resp.status().as_u16();
    shared
        .lock()
        .ledger
        .requests
        .push(RequestRecord { method, path, status });
    resp
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

#[path = "fake_exchange.rs"]
mod exchange;

/// A new access token, recorded as issued.
fn new_access_token(inner: &mut Inner) -> Response {
    inner.seq += 1;
    let token = format!("fake-access-token-{}-{}", inner.seq, std::process::id());
    let ttl = inner.token_ttl;
    inner.tokens.insert(token.clone(), Instant::now() + ttl);
    inner.ledger.tokens_issued += 1;
    Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "scope": "auth_keys devices:core",
    }))
    .into_response()
}

async fn issue_token(
    State(shared): State<Shared>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let form = form.map(|Form(f)| f).unwrap_or_default();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return message(StatusCode::BAD_REQUEST, "unsupported grant_type");
    }
    let (id, secret) = match basic_credentials(&headers) {
        Some(creds) => creds,
        None => (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    let mut inner = shared.lock();
    if id.is_empty() || id != inner.config.client_id || secret != inner.config.client_secret {
        return message(StatusCode::UNAUTHORIZED, "invalid client credentials");
    }
    new_access_token(&mut inner)
}

/// None when the request carries a valid, unexpired Bearer token; else the 401 to answer.
fn check_bearer(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.and_then(|t| inner.tokens.get(t)) {
        Some(expires) if Instant::now() < *expires => None,
        _ => Some(message(StatusCode::UNAUTHORIZED, "API token invalid or expired")),
    }
}

fn valid_description(d: &str) -> bool {
    d.chars().count() <= 50 && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ' ')
}

async fn mint_key(
    State(shared): State<Shared>,
    Path(tailnet): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let mut inner = shared.lock();
    if let Some(denied) = check_bearer(&inner, &headers) {
        return denied;
    }
    let Ok(Json(body)) = body else {
        return message(StatusCode::BAD_REQUEST, "invalid JSON body");
    };
    let create = &body["capabilities"]["devices"]["create"];
    let tags: Vec<String> = create["tags"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let owned = |t: &String| inner.config.client_tags.contains(t);
    if tags.is_empty() || !tags.iter().all(owned) {
        return message(
            StatusCode::BAD_REQUEST,
            format!("requested tags [{}] are invalid or not permitted", tags.join(" ")),
        );
    }
    let description = body["description"].as_str().unwrap_or_default().to_owned();
    if !valid_description(&description) {
        return message(
            StatusCode::BAD_REQUEST,
            "description must be at most 50 characters of letters, numbers, hyphens and spaces",
        );
    }
    inner.seq += 1;
    let id = format!("k{}FAKE", inner.seq);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let key = format!("tskey-auth-{id}-{:x}{nanos:x}", std::process::id());
    let expiry_seconds = body["expirySeconds"].as_u64();
    let record = MintRecord {
        id: id.clone(),
        tags,
        ephemeral: create["ephemeral"].as_bool().unwrap_or(false),
        reusable: create["reusable"].as_bool().unwrap_or(false),
        preauthorized: create["preauthorized"].as_bool().unwrap_or(false),
        expiry_seconds,
        description: description.clone(),
        tailnet,
    };
    let now = chrono::Utc::now();
    let seconds = expiry_seconds.unwrap_or(90 * 86_400);
    let Some(expires) = i64::try_from(seconds)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .and_then(|d| now.checked_add_signed(d))
    else {
        return message(StatusCode::BAD_REQUEST, "expirySeconds out of range");
    };
    let answer = json!({
        "id": id,
        "key": key,
        "created": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "expires": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "capabilities": body["capabilities"].clone(),
        "description": description,
    });
    inner.ledger.mints.push(record);
    Json(answer).into_response()
}

async fn revoke_key(
    State(shared): State<Shared>,
    Path((_, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut inner = shared.lock();
    if let Some(denied) = check_bearer(&inner, &headers) {
        return denied;
    }
    let known = inner.ledger.mints.iter().any(|m| m.id == id);
    if known && !inner.ledger.revocations.contains(&id) {
        inner.ledger.revocations.push(id);
        StatusCode::OK.into_response()
    } else {
        message(StatusCode::NOT_FOUND, "key not found")
    }
}

async fn delete_device(State(shared): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let mut inner = shared.lock();
    if let Some(denied) = check_bearer(&inner, &headers) {
        return denied;
    }
    if inner.devices.remove(&id) {
        inner.ledger.deletions.push(id);
        StatusCode::OK.into_response()
    } else {
        message(StatusCode::NOT_FOUND, "not found")
    }
}
