//! The MagicDNS resolver's message handling (`tailnode dns-proxy`) with arbitrary bytes as the
//! app's query and as tailscaled's answer: never a panic; a reply keeps the query's id and
//! question; a routed name is the query's name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailnode::dnsproxy::message::{self, NXDOMAIN, SERVFAIL};
use tailnode::dnsproxy::route::{self, Lookup, Route};

fuzz_target!(|data: &[u8]| {
    // The first byte is the query's length; the rest after the query is tailscaled's answer.
    let Some((&len, rest)) = data.split_first() else { return };
    let (query, answer) = rest.split_at(usize::from(len).min(rest.len()));
    let _ = message::format_error(query);
    let Ok(q) = message::parse_query(query) else { return };
    for rcode in [NXDOMAIN, SERVFAIL] {
        let r = message::reply(query, &q, rcode);
        assert_eq!(message::id_of(&r), Some(q.id));
        assert_eq!(message::rcode_of(&r), Some(rcode));
        assert_eq!(&r[12..], &query[q.question.clone()]);
    }
    if let Some(r) = message::adopt_answer(query, &q, answer) {
        assert_eq!(message::id_of(&r), Some(q.id));
        assert_eq!(r.len(), answer.len());
    }
    for suffix in [None, Some("tailnet.test"), Some(q.name.as_str())] {
        let how = route::route(&q.name, q.qtype, suffix);
        for lookup in [
            Lookup::Answer(answer.to_vec()),
            Lookup::UnsupportedType,
            Lookup::Unavailable,
        ] {
            let r = route::reply(query, &q, how, &lookup);
            assert!(how != Route::Upstream || r.is_none());
            if let Some(r) = r {
                assert_eq!(message::id_of(&r), Some(q.id));
            }
        }
    }
});
