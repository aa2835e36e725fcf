//! What the controller last wrote, so that a reconcile that would write the same object again
//! skips the call. Entries expire, so an object changed or deleted behind the controller's back
//! is written again within `TTL`; any failed write forgets the entry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long a remembered write is trusted.
pub const TTL: Duration = Duration::from_secs(60);

/// Object key → (hash of what was written, when).
#[derive(Default)]
pub struct Applied {
    seen: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
}

/// A hash of any serialisable value.
pub fn digest<T: serde::Serialize>(value: &T) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(value).unwrap_or_default()).to_vec()
}

impl Applied {
    /// True when `key` was written with exactly `hash` less than `TTL` before `now`.
    pub fn is_current(&self, key: &str, hash: &[u8], now: Instant) -> bool {
        self.seen
            .lock()
            .map(|m| {
                m.get(key)
                    .is_some_and(|(h, at)| h == hash && now.duration_since(*at) < TTL)
            })
            .unwrap_or(false)
    }

    /// Remembers a successful write.
    pub fn record(&self, key: &str, hash: Vec<u8>, now: Instant) {
        if let Ok(mut m) = self.seen.lock() {
            m.insert(key.to_string(), (hash, now));
        }
    }

    /// Forgets `key` (after a failed write, or when the object is gone).
    pub fn forget(&self, key: &str) {
        if let Ok(mut m) = self.seen.lock() {
            m.remove(key);
        }
    }

    /// Forgets every key that starts with `prefix` (a node being cleaned up).
    pub fn forget_prefix(&self, prefix: &str) {
        if let Ok(mut m) = self.seen.lock() {
            m.retain(|k, _| !k.starts_with(prefix));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_skipped_only_while_identical_and_fresh() {
        let a = Applied::default();
        let t0 = Instant::now();
        let h = digest(&serde_json::json!({"rules": ["x"]}));
        assert!(!a.is_current("ns/role/web", &h, t0));
        a.record("ns/role/web", h.clone(), t0);
        assert!(a.is_current("ns/role/web", &h, t0 + Duration::from_secs(1)));
        assert!(!a.is_current("ns/role/web", &digest(&serde_json::json!({"rules": ["y"]})), t0));
        assert!(!a.is_current("ns/role/web", &h, t0 + TTL), "expired");
        a.forget_prefix("ns/");
        assert!(!a.is_current("ns/role/web", &h, t0));
    }
}
