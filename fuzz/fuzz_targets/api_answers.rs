//! The Tailscale and Headscale API answer parsers with arbitrary bytes as the body: never a
//! panic; every error maps to a bounded reason, and a `Retry-After` delay stays capped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailnode::tsapi::{headscale, retry, tailscale};

fuzz_target!(|data: &[u8]| {
    let _ = tailscale::parse_token_answer(data);
    let _ = tailscale::parse_key_answer(data);
    let _ = headscale::parse_preauth_key(data);
    let _ = headscale::parse_user_id(data, "tailnode");
    let text = String::from_utf8_lossy(data);
    for status in [400, 401, 403, 404, 409, 500] {
        let e = retry::error_from(status, &text);
        assert!(!e.reason().is_empty());
        let _ = e.to_string();
    }
    if let Some(after) = retry::parse_retry_after(&text) {
        let policy = retry::RetryPolicy::default();
        assert!(policy.delay(0, Some(after)) <= policy.retry_after_cap);
    }
});
