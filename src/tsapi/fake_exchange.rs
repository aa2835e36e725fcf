//! The fake's token exchange (workload identity federation), as tailscale's own client calls it:
//! `POST /api/v2/oauth/token-exchange` with the form fields `client_id` and `jwt`.

use std::collections::HashMap;

use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use serde_json::Value;

use super::{Exchange, Shared, message, new_access_token};

/// The claims of a JWT (its signature is not checked: see `FakeTailscale::trust_audience`).
fn claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn audiences(claims: &Value) -> Vec<String> {
    match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

pub(super) async fn exchange_token(
    State(shared): State<Shared>,
    form: Result<Form<HashMap<String, String>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let form = form.map(|Form(f)| f).unwrap_or_default();
    let mut inner = shared.lock();
    let id = form.get("client_id").map(String::as_str).unwrap_or_default();
    let Some(trusted) = inner.trusted_audience.clone() else {
        return message(
            StatusCode::UNAUTHORIZED,
            "this client does not trust federated identities",
        );
    };
    if id.is_empty() || id != inner.config.client_id {
        return message(StatusCode::UNAUTHORIZED, "unknown client_id");
    }
    let Some(claims) = form.get("jwt").and_then(|j| claims(j)) else {
        return message(StatusCode::BAD_REQUEST, "jwt is missing or not a JWT");
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if claims["exp"].as_u64().is_none_or(|exp| exp <= now) {
        return message(StatusCode::UNAUTHORIZED, "the ID token has expired");
    }
    if !audiences(&claims).contains(&trusted) {
        return message(
            StatusCode::UNAUTHORIZED,
            "the ID token's audience is not trusted by this client",
        );
    }
    inner.ledger.exchanges.push(Exchange {
        subject: claims["sub"].as_str().unwrap_or_default().to_string(),
        audience: trusted,
    });
    new_access_token(&mut inner)
}
