//! `status.injection` per TailscaleNode, rendered once per spec generation.
//!
//! The render (`inject::policy::render`, the engine run for every variant) depends only on the
//! node, whose uid fixes its name and namespace and whose `metadata.generation` versions its
//! spec, and on the operator's flags, fixed for the life of the process. A reconcile of the same
//! generation (every pod event of the node triggers one) reuses it instead of rendering again.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

/// Node uid → (generation, the rendered `status.injection`).
#[derive(Default)]
pub struct Rendered {
    seen: Mutex<HashMap<String, (i64, Value)>>,
}

impl Rendered {
    /// The render of node `uid` at `generation`: remembered, or made by `render` and remembered.
    /// Without a uid or generation nothing is remembered.
    pub fn get_or_render(
        &self,
        uid: Option<&str>,
        generation: Option<i64>,
        render: impl FnOnce() -> Option<Value>,
    ) -> Option<Value> {
        let (Some(uid), Some(generation)) = (uid, generation) else {
            return render();
        };
        if let Ok(m) = self.seen.lock()
            && let Some((g, v)) = m.get(uid)
            && *g == generation
        {
            return Some(v.clone());
        }
        let value = render()?;
        if let Ok(mut m) = self.seen.lock() {
            m.insert(uid.to_string(), (generation, value.clone()));
        }
        Some(value)
    }

    /// Forgets node `uid` (it is being deleted).
    pub fn forget(&self, uid: &str) {
        if let Ok(mut m) = self.seen.lock() {
            m.remove(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use serde_json::json;

    use super::*;

    #[test]
    fn a_generation_is_rendered_once_and_a_new_one_again() {
        let r = Rendered::default();
        let calls = Cell::new(0);
        let render = |v: i64| {
            calls.set(calls.get() + 1);
            Some(json!({"generation": v}))
        };
        assert_eq!(
            r.get_or_render(Some("u1"), Some(1), || render(1)),
            Some(json!({"generation": 1}))
        );
        assert_eq!(
            r.get_or_render(Some("u1"), Some(1), || render(99)),
            Some(json!({"generation": 1}))
        );
        assert_eq!(calls.get(), 1);
        assert_eq!(
            r.get_or_render(Some("u1"), Some(2), || render(2)),
            Some(json!({"generation": 2}))
        );
        assert_eq!(
            r.get_or_render(Some("u2"), Some(2), || render(3)),
            Some(json!({"generation": 3}))
        );
        assert_eq!(calls.get(), 3);
        r.forget("u1");
        r.get_or_render(Some("u1"), Some(2), || render(4));
        assert_eq!(calls.get(), 4);
        // Without a generation, every call renders.
        r.get_or_render(Some("u3"), None, || render(5));
        r.get_or_render(Some("u3"), None, || render(5));
        assert_eq!(calls.get(), 6);
    }
}
