use std::sync::Arc;
use std::time::Duration;

use super::{dead_url, recording_policy, request, retries, slept};
use crate::metrics::Metrics;
use crate::tsapi::fake::{FakeConfig, FakeTailscale, Scripted};
use crate::tsapi::tailscale::{MAX_DESCRIPTION, sanitize_description, usable_for};
use crate::tsapi::{ApiError, KeyApi, TailscaleApi, TailscaleConfig};

const ID: &str = "client-id";
const SECRET: &str = "tskey-client-secret";

async fn fake() -> FakeTailscale {
    FakeTailscale::start(FakeConfig {
        client_id: ID.into(),
        client_secret: SECRET.into(),
        client_tags: vec!["tag:k8s".into(), "tag:web".into()],
    })
    .await
}

struct Client {
    api: TailscaleApi,
    sleeps: Arc<std::sync::Mutex<Vec<Duration>>>,
    metrics: Arc<Metrics>,
}

fn client_with(url: &str, secret: &str, tune: impl FnOnce(&mut TailscaleConfig)) -> Client {
    let (retry, sleeps) = recording_policy();
    let metrics = Arc::new(Metrics::default());
    let mut config = TailscaleConfig::new(ID, secret);
    config.base_url = url.to_owned();
    config.retry = retry;
    config.metrics = Some(metrics.clone());
    tune(&mut config);
    Client {
        api: TailscaleApi::new(config).unwrap(),
        sleeps,
        metrics,
    }
}

fn client(fake: &FakeTailscale) -> Client {
    client_with(&fake.url(), SECRET, |_| {})
}

fn keys_requests(fake: &FakeTailscale) -> usize {
    fake.ledger()
        .requests
        .iter()
        .filter(|r| r.path.ends_with("/keys"))
        .count()
}

#[tokio::test]
async fn mints_with_the_documented_body_and_caches_the_token() {
    let fake = fake().await;
    let c = client(&fake);
    let mut ids = Vec::new();
    for i in 0..10 {
        let minted = c
            .api
            .mint(&request(&format!("tailnode web-{i}"), &["tag:k8s"]))
            .await
            .unwrap();
        assert!(minted.key.starts_with("tskey-auth-"));
        ids.push(minted.id.unwrap());
    }
    let ledger = fake.ledger();
    assert_eq!(ledger.tokens_issued, 1);
    assert_eq!(ledger.mints.len(), 10);
    assert_eq!(ledger.mints.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), ids);
    let first = &ledger.mints[0];
    assert_eq!(first.tags, vec!["tag:k8s".to_owned()]);
    assert!(first.ephemeral && first.preauthorized && !first.reusable);
    assert_eq!(first.expiry_seconds, Some(3600));
    assert_eq!(first.description, "tailnode web-0");
    assert_eq!(first.tailnet, "-");
    assert!(slept(&c.sleeps).is_empty());
    assert_eq!(c.api.kind(), "tailscale");
}

#[tokio::test]
async fn concurrent_mints_share_one_token_fetch() {
    let fake = fake().await;
    let c = client(&fake);
    let req = request("tailnode", &["tag:web"]);
    let mints = (0..8).map(|_| c.api.mint(&req));
    let results = futures::future::join_all(mints).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(fake.ledger().tokens_issued, 1);
    assert_eq!(fake.ledger().mints.len(), 8);
}

#[tokio::test]
async fn a_refused_token_is_replaced_once() {
    let fake = fake().await;
    let c = client(&fake);
    let req = request("tailnode", &["tag:k8s"]);
    c.api.mint(&req).await.unwrap();
    fake.revoke_tokens();
    c.api.mint(&req).await.unwrap();
    assert_eq!(fake.ledger().tokens_issued, 2);

    // A 401 that persists after the refresh is reported, not looped on.
    fake.script(vec![Scripted::Status(401, None), Scripted::Status(401, None)]);
    let err = c.api.mint(&req).await.unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { status: 401, .. }), "{err:?}");
    assert_eq!(fake.ledger().tokens_issued, 3);
    assert!(slept(&c.sleeps).is_empty());
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized_without_retries() {
    let fake = fake().await;
    let c = client_with(&fake.url(), "wrong", |_| {});
    let err = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert!(matches!(&err, ApiError::Unauthorized { status: 401, message } if message == "invalid client credentials"));
    assert_eq!(err.reason(), "unauthorized");
    let ledger = fake.ledger();
    assert_eq!(ledger.tokens_issued, 0);
    assert_eq!(ledger.requests.len(), 1);
    assert!(slept(&c.sleeps).is_empty());
}

#[tokio::test]
async fn forbidden_is_unauthorized_without_retries() {
    let fake = fake().await;
    let c = client(&fake);
    fake.script(vec![Scripted::Status(403, None)]);
    let err = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { status: 403, .. }), "{err:?}");
    assert_eq!(keys_requests(&fake), 1);
}

#[tokio::test]
async fn rate_limit_honours_retry_after_then_succeeds() {
    let fake = fake().await;
    let c = client(&fake);
    fake.script(vec![Scripted::Status(429, Some(7))]);
    c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap();
    assert_eq!(slept(&c.sleeps), vec![Duration::from_secs(7)]);
    assert_eq!(retries(&c.metrics, "tailscale", "429"), 1);
    assert_eq!(fake.ledger().mints.len(), 1);
}

#[tokio::test]
async fn retry_after_is_capped_and_absent_means_backoff() {
    let fake = fake().await;
    let c = client(&fake);
    fake.script(vec![Scripted::Status(429, Some(86_400)), Scripted::Status(429, None)]);
    c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap();
    assert_eq!(
        slept(&c.sleeps),
        vec![Duration::from_secs(30), Duration::from_millis(400)]
    );
}

#[tokio::test]
async fn server_errors_back_off_exponentially_then_succeed() {
    let fake = fake().await;
    let c = client(&fake);
    fake.script(vec![
        Scripted::Status(503, None),
        Scripted::Status(502, None),
        Scripted::Status(500, None),
    ]);
    c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap();
    let expected: Vec<Duration> = [200, 400, 800].map(Duration::from_millis).to_vec();
    assert_eq!(slept(&c.sleeps), expected);
    assert_eq!(retries(&c.metrics, "tailscale", "5xx"), 3);
    assert_eq!(keys_requests(&fake), 4);
}

#[tokio::test]
async fn exhausted_rate_limit_is_rate_limited() {
    let fake = fake().await;
    let c = client_with(&fake.url(), SECRET, |cfg| cfg.retry.max_retries = 2);
    fake.script(vec![Scripted::Status(429, Some(1)); 3]);
    let err = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert!(matches!(err, ApiError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(1)));
    assert!(err.is_transient());
    assert_eq!(keys_requests(&fake), 3);
    assert_eq!(slept(&c.sleeps).len(), 2);
    assert!(fake.ledger().mints.is_empty());
}

#[tokio::test]
async fn exhausted_server_errors_are_server_errors() {
    let fake = fake().await;
    let c = client(&fake);
    fake.script(vec![Scripted::Status(500, None); 5]);
    let err = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert!(
        matches!(&err, ApiError::Server { status: 500, message } if message == "scripted 500"),
        "{err:?}"
    );
    assert_eq!(keys_requests(&fake), 5);
    assert_eq!(retries(&c.metrics, "tailscale", "5xx"), 4);
}

#[tokio::test]
async fn unreachable_api_is_a_transport_error_after_retries() {
    let url = dead_url().await;
    let c = client_with(&url, SECRET, |cfg| cfg.retry.max_retries = 2);
    let err = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert!(matches!(err, ApiError::Transport(_)), "{err:?}");
    assert_eq!(slept(&c.sleeps).len(), 2);
    assert_eq!(retries(&c.metrics, "tailscale", "transport"), 2);
}

#[tokio::test]
async fn a_timed_out_request_is_retried() {
    let fake = fake().await;
    fake.add_device("nSTALL");
    let c = client_with(&fake.url(), SECRET, |cfg| cfg.timeout = Duration::from_millis(300));
    fake.script(vec![Scripted::Stall(Duration::from_secs(5))]);
    assert!(c.api.delete_device("nSTALL").await.unwrap());
    assert_eq!(retries(&c.metrics, "tailscale", "transport"), 1);
    assert_eq!(fake.ledger().deletions, vec!["nSTALL".to_owned()]);
}

#[tokio::test]
async fn tags_the_client_does_not_own_are_a_bad_request() {
    let fake = fake().await;
    let c = client(&fake);
    let err = c
        .api
        .mint(&request("tailnode", &["tag:k8s", "tag:db"]))
        .await
        .unwrap_err();
    match err {
        ApiError::BadRequest { message } => {
            assert_eq!(message, "requested tags [tag:k8s tag:db] are invalid or not permitted")
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    fake.set_client_tags(Vec::new());
    let err = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert_eq!(err.reason(), "bad_request");
    assert!(!err.is_transient());
    assert!(slept(&c.sleeps).is_empty());
    assert!(fake.ledger().mints.is_empty());
}

#[tokio::test]
async fn delete_removes_the_device_and_a_missing_one_counts_as_gone() {
    let fake = fake().await;
    fake.add_device("n123CNTRL");
    fake.add_device("nOTHER");
    let c = client(&fake);
    assert!(c.api.delete_device("n123CNTRL").await.unwrap());
    assert!(c.api.delete_device("n123CNTRL").await.unwrap());
    assert!(c.api.delete_device("nNEVER").await.unwrap());
    let ledger = fake.ledger();
    assert_eq!(ledger.deletions, vec!["n123CNTRL".to_owned()]);
    assert_eq!(fake.devices(), vec!["nOTHER".to_owned()]);
    let statuses: Vec<u16> = ledger
        .requests
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![200, 404, 404]);
    assert_eq!(ledger.tokens_issued, 1);
    assert!(slept(&c.sleeps).is_empty());
}

#[tokio::test]
async fn revoking_deletes_the_key_and_a_missing_one_counts_as_gone() {
    let fake = fake().await;
    let c = client(&fake);
    let minted = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap();
    let id = minted.id.unwrap();
    assert!(c.api.revoke_key(&id).await.unwrap());
    assert!(c.api.revoke_key(&id).await.unwrap());
    let ledger = fake.ledger();
    assert_eq!(ledger.revocations, vec![id.clone()]);
    let deletes: Vec<(String, u16)> = ledger
        .requests
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| (r.path.clone(), r.status))
        .collect();
    let path = format!("/api/v2/tailnet/-/keys/{id}");
    assert_eq!(deletes, vec![(path.clone(), 200), (path, 404)]);
}

#[tokio::test]
async fn descriptions_are_sanitised_before_sending() {
    let fake = fake().await;
    let c = client(&fake);
    let long = "tailnode default/web-7f9c_0 (replica 0) ünïcode and a much longer tail";
    c.api.mint(&request(long, &["tag:k8s"])).await.unwrap();
    c.api.mint(&request("   ", &["tag:k8s"])).await.unwrap();
    let mints = fake.ledger().mints;
    assert_eq!(mints[0].description, sanitize_description(long));
    assert_eq!(mints[1].description, "tailnode");
}

#[tokio::test]
async fn a_custom_tailnet_is_used_in_the_path() {
    let fake = fake().await;
    let c = client_with(&fake.url(), SECRET, |cfg| cfg.tailnet = "example.com".into());
    c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap();
    assert_eq!(fake.ledger().mints[0].tailnet, "example.com");
}

#[test]
fn sanitize_description_keeps_the_allowed_alphabet() {
    assert_eq!(sanitize_description("tailnode web-0"), "tailnode web-0");
    assert_eq!(sanitize_description("ns/pod_name.x"), "ns-pod-name-x");
    assert_eq!(sanitize_description("é"), "-");
    assert_eq!(sanitize_description(""), "tailnode");
    let long = "a".repeat(80);
    assert_eq!(sanitize_description(&long).len(), MAX_DESCRIPTION);
    let out = sanitize_description("tailnode default/web-7f9c_0 (replica 0) ünïcode and more");
    assert!(out.chars().count() <= MAX_DESCRIPTION);
    assert!(out.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ' '));
}

#[test]
fn tokens_are_used_for_their_lifetime_minus_a_margin() {
    assert_eq!(usable_for(Duration::from_secs(3600)), Duration::from_secs(3300));
    assert_eq!(usable_for(Duration::from_secs(60)), Duration::from_secs(45));
    assert_eq!(usable_for(Duration::ZERO), Duration::ZERO);
}

#[test]
fn debug_output_hides_the_secret() {
    let config = TailscaleConfig::new(ID, SECRET);
    assert!(!format!("{config:?}").contains(SECRET));
    crate::install_crypto_provider();
    let api = TailscaleApi::new(config).unwrap();
    assert!(!format!("{api:?}").contains(SECRET));
    let mut bad = TailscaleConfig::new(ID, SECRET);
    bad.base_url = "api.tailscale.com".into();
    assert!(TailscaleApi::new(bad).is_err());
}

#[test]
fn parses_token_and_key_answers() {
    use crate::tsapi::tailscale::{parse_key_answer, parse_token_answer};
    let t = parse_token_answer(
        br#"{"access_token":"tskey-api-x","token_type":"Bearer","expires_in":3600,"scope":"auth_keys"}"#,
    )
    .unwrap();
    assert_eq!(
        (t.token.as_str(), t.lifetime),
        ("tskey-api-x", Duration::from_secs(3600))
    );
    assert!(!format!("{t:?}").contains("tskey"));
    // No lifetime: an hour; a wild one: capped at a day.
    let t = parse_token_answer(br#"{"access_token":"a"}"#).unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(3600));
    let t = parse_token_answer(br#"{"access_token":"a","expires_in":18446744073709551615}"#).unwrap();
    assert_eq!(t.lifetime, Duration::from_secs(86_400));
    assert!(matches!(
        parse_token_answer(br#"{"expires_in":1}"#),
        Err(ApiError::Decode(_))
    ));
    assert!(matches!(
        parse_token_answer(br#"{"access_token":"a","expires_in":-1}"#),
        Err(ApiError::Decode(_))
    ));

    let k = parse_key_answer(br#"{"id":"k123","key":"tskey-auth-k123-x","created":"2026-01-01T00:00:00Z"}"#).unwrap();
    assert_eq!((k.key.as_str(), k.id.as_deref()), ("tskey-auth-k123-x", Some("k123")));
    let k = parse_key_answer(br#"{"key":"k"}"#).unwrap();
    assert_eq!(k.id, None);
    match parse_key_answer(br#"{"id":"k1","key":null}"#) {
        Err(ApiError::Decode(m)) => assert!(!m.contains("k1"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// The fake's timed outage answers every keys request with its phase's fault until the phase
/// ends, then the next phase's, then serves normally again.
#[tokio::test]
async fn the_fakes_outage_runs_its_phases_in_order_then_ends() {
    let fake = fake().await;
    let c = client_with(&fake.url(), SECRET, |cfg| cfg.retry.max_retries = 0);
    let ends = fake.outage(vec![
        (Duration::from_millis(300), Scripted::Status(429, Some(1))),
        (Duration::from_millis(300), Scripted::Status(500, None)),
    ]);
    let first = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert_eq!(first.reason(), "rate_limited");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let second = c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap_err();
    assert_eq!(second.reason(), "server");
    tokio::time::sleep(ends.saturating_duration_since(std::time::Instant::now())).await;
    c.api.mint(&request("tailnode", &["tag:k8s"])).await.unwrap();
    assert_eq!(
        fake.ledger().mints.len(),
        1,
        "only the mint after the outage got through"
    );
}

/// ID tokens from a fixed subject, for the audience asked (or a fixed wrong one).
struct Tokens {
    wrong_audience: bool,
}

impl crate::tsapi::IdTokenSource for Tokens {
    fn id_token<'a>(&'a self, audience: &'a str) -> futures::future::BoxFuture<'a, Result<String, ApiError>> {
        use base64::Engine;
        let aud = if self.wrong_audience { "someone-else" } else { audience };
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims =
            serde_json::json!({"sub": "system:serviceaccount:tailnode-system:tailnode", "aud": [aud], "exp": exp});
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.sig",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes())
        );
        Box::pin(async move { Ok(jwt) })
    }
}

fn federated(fake: &FakeTailscale, wrong_audience: bool) -> TailscaleApi {
    let mut config = TailscaleConfig::new(ID, "");
    config.base_url = fake.url();
    config.retry.max_retries = 0;
    config.grant = crate::tsapi::Grant::IdToken {
        audience: "tailnode.example".into(),
        source: Arc::new(Tokens { wrong_audience }),
    };
    TailscaleApi::new(config).unwrap()
}

/// Workload identity federation: no client secret; the ServiceAccount token is exchanged for
/// an access token, which mints as usual. A token for another audience is refused.
#[tokio::test]
async fn a_federated_client_exchanges_its_id_token_and_mints() {
    let fake = fake().await;
    fake.trust_audience("tailnode.example");
    let api = federated(&fake, false);
    api.mint(&request("tailnode web-0", &["tag:k8s"])).await.unwrap();
    let ledger = fake.ledger();
    assert_eq!(ledger.mints.len(), 1);
    assert_eq!(ledger.exchanges.len(), 1);
    assert_eq!(
        ledger.exchanges[0].subject,
        "system:serviceaccount:tailnode-system:tailnode"
    );
    let refused = federated(&fake, true)
        .mint(&request("tailnode web-1", &["tag:k8s"]))
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), "unauthorized", "{refused}");
    assert_eq!(fake.ledger().mints.len(), 1);
}
