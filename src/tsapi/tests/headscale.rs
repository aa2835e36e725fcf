//! HeadscaleApi against a stub that answers like Headscale 0.29's grpc-gateway: `{"code",
//! "message"}` errors, 404 (gRPC NotFound) for a missing node, 400 (InvalidArgument) for a bad
//! tag or a non-numeric id, 500 (gRPC Unknown) for an unknown user id, plain-text 401.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{recording_policy, request, retries, slept};
use crate::metrics::Metrics;
use crate::tsapi::headscale::expiration_after;
use crate::tsapi::{ApiError, HeadscaleApi, HeadscaleConfig, KeyApi};

const API_KEY: &str = "hs-api-key-secret";

#[derive(Default)]
struct Stub {
    users: Vec<(u64, String)>,
    nodes: BTreeSet<u64>,
    script: VecDeque<u16>,
    user_lookups: usize,
    created: Vec<Value>,
    deleted: Vec<u64>,
    expired: Vec<u64>,
}

type Shared = Arc<Mutex<Stub>>;

fn grpc_error(status: StatusCode, code: u32, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message, "details": []}))).into_response()
}

/// The stub's answer when the request is not authorised or a failure is scripted.
fn gate(stub: &mut Stub, headers: &HeaderMap) -> Option<Response> {
    if let Some(code) = stub.script.pop_front() {
        let status = StatusCode::from_u16(code).unwrap();
        return Some(grpc_error(status, 14, "scripted"));
    }
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {API_KEY}")) {
        return Some((StatusCode::UNAUTHORIZED, "Unauthorized").into_response());
    }
    None
}

async fn list_users(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut stub = shared.lock().unwrap();
    if let Some(denied) = gate(&mut stub, &headers) {
        return denied;
    }
    stub.user_lookups += 1;
    let users: Vec<Value> = stub
        .users
        .iter()
        .filter(|(_, name)| query.get("name").is_none_or(|n| n == name))
        .map(|(id, name)| json!({"id": id.to_string(), "name": name, "createdAt": "2026-01-01T00:00:00Z"}))
        .collect();
    Json(json!({ "users": users })).into_response()
}

async fn create_key(State(shared): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let mut stub = shared.lock().unwrap();
    if let Some(denied) = gate(&mut stub, &headers) {
        return denied;
    }
    let tags = body["aclTags"].as_array().cloned().unwrap_or_default();
    if let Some(bad) = tags.iter().find(|t| !t.as_str().unwrap_or("").starts_with("tag:")) {
        return grpc_error(
            StatusCode::BAD_REQUEST,
            3,
            &format!("tag must start with 'tag:': {bad}"),
        );
    }
    let user: u64 = body["user"].as_str().and_then(|u| u.parse().ok()).unwrap_or(0);
    let Some((_, name)) = stub.users.iter().find(|(id, _)| *id == user).cloned() else {
        return grpc_error(StatusCode::INTERNAL_SERVER_ERROR, 2, "user not found");
    };
    stub.created.push(body.clone());
    let id = stub.created.len();
    Json(json!({"preAuthKey": {
        "user": {"id": user.to_string(), "name": name},
        "id": id.to_string(),
        "key": format!("hskey-auth-{id}-secret"),
        "reusable": body["reusable"],
        "ephemeral": body["ephemeral"],
        "used": false,
        "expiration": body["expiration"],
        "aclTags": tags,
    }}))
    .into_response()
}

async fn delete_node(State(shared): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let mut stub = shared.lock().unwrap();
    if let Some(denied) = gate(&mut stub, &headers) {
        return denied;
    }
    let Ok(id) = id.parse::<u64>() else {
        return grpc_error(StatusCode::BAD_REQUEST, 3, "type mismatch, parameter: node_id");
    };
    if !stub.nodes.remove(&id) {
        return grpc_error(StatusCode::NOT_FOUND, 5, "node not found");
    }
    stub.deleted.push(id);
    Json(json!({})).into_response()
}

/// Headscale 0.29 expires by numeric id and answers 200 whether or not the key exists.
async fn expire_key(State(shared): State<Shared>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let mut stub = shared.lock().unwrap();
    if let Some(denied) = gate(&mut stub, &headers) {
        return denied;
    }
    let Some(id) = body["id"].as_u64() else {
        return grpc_error(StatusCode::BAD_REQUEST, 3, "invalid id");
    };
    stub.expired.push(id);
    Json(json!({})).into_response()
}

struct Harness {
    url: String,
    stub: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn stub() -> Harness {
    let stub: Shared = Arc::new(Mutex::new(Stub {
        users: vec![(1, "other".into()), (7, "tailnode".into())],
        nodes: [3, 4].into_iter().collect(),
        ..Stub::default()
    }));
    let router = Router::new()
        .route("/api/v1/user", get(list_users))
        .route("/api/v1/preauthkey", post(create_key))
        .route("/api/v1/preauthkey/expire", post(expire_key))
        .route("/api/v1/node/{id}", delete(delete_node))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Harness { url, stub, task }
}

struct Client {
    api: HeadscaleApi,
    sleeps: Arc<Mutex<Vec<Duration>>>,
    metrics: Arc<Metrics>,
}

fn client(h: &Harness, key: &str, user: &str) -> Client {
    let (retry, sleeps) = recording_policy();
    let metrics = Arc::new(Metrics::default());
    let mut config = HeadscaleConfig::new(&h.url, key, user);
    config.retry = retry;
    config.metrics = Some(metrics.clone());
    Client {
        api: HeadscaleApi::new(config).unwrap(),
        sleeps,
        metrics,
    }
}

#[tokio::test]
async fn mints_for_a_numeric_user_without_a_lookup() {
    let h = stub().await;
    let c = client(&h, API_KEY, "7");
    let before = chrono::Utc::now();
    let minted = c
        .api
        .mint(&request("ignored by headscale", &["tag:k8s"]))
        .await
        .unwrap();
    assert_eq!(minted.key, "hskey-auth-1-secret");
    assert_eq!(minted.id.as_deref(), Some("1"));
    assert!(!format!("{minted:?}").contains("secret"));
    let stub = h.stub.lock().unwrap();
    assert_eq!(stub.user_lookups, 0);
    let body = &stub.created[0];
    assert_eq!(body["user"], "7");
    assert_eq!(body["reusable"], false);
    assert_eq!(body["ephemeral"], true);
    assert_eq!(body["aclTags"], json!(["tag:k8s"]));
    let expiration = chrono::DateTime::parse_from_rfc3339(body["expiration"].as_str().unwrap()).unwrap();
    let ahead = expiration.with_timezone(&chrono::Utc) - before;
    assert!((3590..=3610).contains(&ahead.num_seconds()), "{ahead:?}");
    assert_eq!(c.api.kind(), "headscale");
}

#[tokio::test]
async fn a_user_name_is_resolved_once() {
    let h = stub().await;
    let c = client(&h, API_KEY, "tailnode");
    for _ in 0..3 {
        c.api.mint(&request("x", &["tag:k8s"])).await.unwrap();
    }
    let stub = h.stub.lock().unwrap();
    assert_eq!(stub.user_lookups, 1);
    assert!(stub.created.iter().all(|b| b["user"] == "7"));
}

#[tokio::test]
async fn an_unknown_user_name_is_a_bad_request() {
    let h = stub().await;
    let c = client(&h, API_KEY, "nobody");
    let err = c.api.mint(&request("x", &["tag:k8s"])).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::BadRequest { message } if message.contains("nobody")),
        "{err:?}"
    );
    assert!(h.stub.lock().unwrap().created.is_empty());
}

#[tokio::test]
async fn a_bad_tag_is_a_bad_request_with_headscales_message() {
    let h = stub().await;
    let c = client(&h, API_KEY, "7");
    let err = c.api.mint(&request("x", &["k8s"])).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::BadRequest { message } if message.starts_with("tag must start with")),
        "{err:?}"
    );
    assert!(slept(&c.sleeps).is_empty());
}

#[tokio::test]
async fn a_wrong_api_key_is_unauthorized() {
    let h = stub().await;
    let c = client(&h, "wrong", "7");
    let err = c.api.mint(&request("x", &["tag:k8s"])).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::Unauthorized { status: 401, message } if message == "Unauthorized"),
        "{err:?}"
    );
    assert!(slept(&c.sleeps).is_empty());
}

#[tokio::test]
async fn server_errors_are_retried() {
    let h = stub().await;
    let c = client(&h, API_KEY, "tailnode");
    h.stub.lock().unwrap().script.extend([503, 502, 429]);
    c.api.mint(&request("x", &["tag:k8s"])).await.unwrap();
    assert_eq!(slept(&c.sleeps), [200, 400, 800].map(Duration::from_millis).to_vec());
    assert_eq!(retries(&c.metrics, "headscale", "5xx"), 2);
    assert_eq!(retries(&c.metrics, "headscale", "429"), 1);
}

#[tokio::test]
async fn an_unknown_user_id_exhausts_retries_as_a_server_error() {
    // Headscale 0.29 answers an unknown user id with gRPC Unknown (HTTP 500).
    let h = stub().await;
    let c = client(&h, API_KEY, "99");
    let err = c.api.mint(&request("x", &["tag:k8s"])).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::Server { status: 500, message } if message == "user not found"),
        "{err:?}"
    );
    assert_eq!(slept(&c.sleeps).len(), 4);
}

#[tokio::test]
async fn delete_removes_the_node_and_a_missing_one_counts_as_gone() {
    let h = stub().await;
    let c = client(&h, API_KEY, "7");
    assert!(c.api.delete_device("3").await.unwrap());
    assert!(c.api.delete_device("3").await.unwrap());
    assert!(c.api.delete_device("12345").await.unwrap());
    let stub = h.stub.lock().unwrap();
    assert_eq!(stub.deleted, vec![3]);
    assert_eq!(stub.nodes.iter().copied().collect::<Vec<_>>(), vec![4]);
    assert!(slept(&c.sleeps).is_empty());
}

#[tokio::test]
async fn revoking_expires_the_key_by_its_numeric_id() {
    let h = stub().await;
    let c = client(&h, API_KEY, "7");
    let minted = c.api.mint(&request("x", &["tag:k8s"])).await.unwrap();
    let id = minted.id.unwrap();
    assert!(c.api.revoke_key(&id).await.unwrap());
    assert_eq!(h.stub.lock().unwrap().expired, vec![id.parse::<u64>().unwrap()]);
    let err = c.api.revoke_key("tskey-not-an-id").await.unwrap_err();
    assert_eq!(err.reason(), "bad_request");
    assert_eq!(h.stub.lock().unwrap().expired.len(), 1);
}

#[tokio::test]
async fn a_non_numeric_device_id_is_rejected_locally() {
    let h = stub().await;
    let c = client(&h, API_KEY, "7");
    let err = c.api.delete_device("nAbC123CNTRL").await.unwrap_err();
    assert_eq!(err.reason(), "bad_request");
    assert!(h.stub.lock().unwrap().deleted.is_empty());
}

#[test]
fn expiration_is_rfc3339_and_out_of_range_is_none() {
    let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00.5Z")
        .unwrap()
        .to_utc();
    assert_eq!(
        expiration_after(now, Duration::from_secs(3600)).as_deref(),
        Some("2026-01-01T01:00:00Z")
    );
    assert_eq!(expiration_after(now, Duration::MAX), None);
    assert_eq!(expiration_after(now, Duration::from_secs(1 << 50)), None);
}

#[tokio::test]
async fn an_absurd_expiry_fails_without_a_request() {
    let h = stub().await;
    let c = client(&h, API_KEY, "7");
    let mut req = request("x", &["tag:k8s"]);
    req.expiry = Duration::from_secs(1 << 50);
    assert_eq!(c.api.mint(&req).await.unwrap_err().reason(), "bad_request");
    assert!(h.stub.lock().unwrap().created.is_empty());
}

#[test]
fn debug_output_hides_the_api_key() {
    let config = HeadscaleConfig::new("http://127.0.0.1:1", API_KEY, "7");
    assert!(!format!("{config:?}").contains(API_KEY));
    let api = HeadscaleApi::new(config).unwrap();
    assert!(!format!("{api:?}").contains(API_KEY));
}

/// Check against the local harness's real Headscale (`e2e/local/up`); skipped when its
/// variables are not set.
#[tokio::test]
async fn real_headscale_when_available() {
    let (Ok(url), Ok(key)) = (
        std::env::var("TAILNODE_HEADSCALE_URL"),
        std::env::var("TAILNODE_HEADSCALE_API_KEY"),
    ) else {
        return;
    };
    let user = std::env::var("TAILNODE_HEADSCALE_USER").or_else(|_| std::env::var("TAILNODE_HEADSCALE_USER_ID"));
    let api = HeadscaleApi::new(HeadscaleConfig::new(url, key, user.unwrap())).unwrap();
    let minted = api.mint(&request("tailnode unit", &["tag:k8s"])).await.unwrap();
    assert!(!minted.key.is_empty());
    assert!(minted.id.is_some());
    assert!(api.revoke_key(minted.id.as_deref().unwrap()).await.unwrap());
    assert!(api.delete_device("999999").await.unwrap());
}

#[test]
fn parses_user_and_preauth_key_answers() {
    use crate::tsapi::headscale::{parse_preauth_key, parse_user_id};
    let users = br#"{"users":[{"id":"1","name":"tailnode-x"},{"id":"7","name":"tailnode","createdAt":"2026-01-01T00:00:00Z"}]}"#;
    assert_eq!(parse_user_id(users, "tailnode").unwrap(), 7);
    assert!(matches!(
        parse_user_id(users, "nobody"),
        Err(ApiError::BadRequest { .. })
    ));
    assert!(matches!(
        parse_user_id(br#"{}"#, "tailnode"),
        Err(ApiError::BadRequest { .. })
    ));
    assert!(matches!(
        parse_user_id(br#"{"users":[{"id":"-1","name":"tailnode"}]}"#, "tailnode"),
        Err(ApiError::Decode(_))
    ));
    assert!(matches!(parse_user_id(b"<html>", "tailnode"), Err(ApiError::Decode(_))));

    let key = parse_preauth_key(
        br#"{"preAuthKey":{"user":{"id":"7"},"id":"3","key":"hskey-auth-x","reusable":false,"aclTags":["tag:k8s"]}}"#,
    )
    .unwrap();
    assert_eq!((key.key.as_str(), key.id.as_deref()), ("hskey-auth-x", Some("3")));
    assert!(matches!(
        parse_preauth_key(br#"{"preAuthKey":{}}"#),
        Err(ApiError::Decode(_))
    ));
}
