//! PURE: which names go to tailscaled and what the client gets back.

use super::message::{self, NOERROR, NXDOMAIN, Query, SERVFAIL, TYPE_A, TYPE_AAAA};

/// Where a query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A name under the tailnet's MagicDNS domain: tailscaled's answer is final.
    Tailnet,
    /// A single-label name (`laptop`, a MagicDNS short name, reached at the end of the search
    /// list): tailscaled first, the cluster DNS when tailscaled knows no such host.
    TailnetFirst,
    /// Everything else: the cluster DNS.
    Upstream,
}

/// Routes `name` (lower-case, no trailing dot) of type `qtype`, given the tailnet's MagicDNS
/// domain (`suffix`, e.g. `tailnet.test` or `tail1234.ts.net`) when tailscaled told it.
pub fn route(name: &str, qtype: u16, suffix: Option<&str>) -> Route {
    let suffix = suffix.map(|s| s.trim_end_matches('.')).filter(|s| !s.is_empty());
    if let Some(s) = suffix {
        let under = name.len() > s.len() && name.ends_with(s) && name.as_bytes()[name.len() - s.len() - 1] == b'.';
        if name == s || under {
            return Route::Tailnet;
        }
    }
    if !name.is_empty() && !name.contains('.') && (qtype == TYPE_A || qtype == TYPE_AAAA) {
        return Route::TailnetFirst;
    }
    Route::Upstream
}

/// What tailscaled said about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Its DNS answer (a whole message).
    Answer(Vec<u8>),
    /// tailscaled takes no query of this type.
    UnsupportedType,
    /// tailscaled could not be asked (not up yet, restarting) or answered nonsense.
    Unavailable,
}

/// The reply to a query routed to tailscaled, or `None` to ask the cluster DNS instead.
///
/// For [`Route::Tailnet`] tailscaled is authoritative: its answer is passed on when it found the
/// host (records or not: a host with no IPv6 address has no AAAA record); any other answer (it
/// says REFUSED for names it does not know when MagicDNS routing is off, as with
/// `--accept-dns=false`) becomes NXDOMAIN, so stub resolvers walk on through their search list;
/// a type it takes no queries for gets an empty NOERROR; and SERVFAIL when tailscaled could not be
/// asked. For [`Route::TailnetFirst`] only an answer with records counts.
pub fn reply(query_buf: &[u8], query: &Query, route: Route, lookup: &Lookup) -> Option<Vec<u8>> {
    let found = |a: &[u8]| message::rcode_of(a) == Some(NOERROR);
    match (route, lookup) {
        (Route::Upstream, _) => None,
        (Route::Tailnet, Lookup::Answer(a)) if found(a) => message::adopt_answer(query_buf, query, a),
        (Route::Tailnet, Lookup::Answer(_)) => Some(message::reply(query_buf, query, NXDOMAIN)),
        (Route::Tailnet, Lookup::UnsupportedType) => Some(message::reply(query_buf, query, NOERROR)),
        (Route::Tailnet, Lookup::Unavailable) => Some(message::reply(query_buf, query, SERVFAIL)),
        (Route::TailnetFirst, Lookup::Answer(a)) if found(a) && message::answer_count(a).unwrap_or(0) > 0 => {
            message::adopt_answer(query_buf, query, a)
        }
        (Route::TailnetFirst, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::message::tests::{answer, query};
    use super::super::message::{answer_count, parse_query, rcode_of};
    use super::*;

    #[test]
    fn routes_by_the_tailnet_domain_and_short_names() {
        let s = Some("tailnet.test");
        assert_eq!(route("web-0.tailnet.test", TYPE_A, s), Route::Tailnet);
        assert_eq!(route("tailnet.test", TYPE_A, Some("tailnet.test.")), Route::Tailnet);
        assert_eq!(route("a.b.tailnet.test", 16, s), Route::Tailnet);
        assert_eq!(route("xtailnet.test", TYPE_A, s), Route::Upstream, "label boundary");
        assert_eq!(
            route("kubernetes.default.svc.cluster.local", TYPE_A, s),
            Route::Upstream
        );
        assert_eq!(route("laptop", TYPE_AAAA, s), Route::TailnetFirst);
        assert_eq!(
            route("laptop", 16, s),
            Route::Upstream,
            "short names only for addresses"
        );
        assert_eq!(
            route("web-0.tailnet.test", TYPE_A, None),
            Route::Upstream,
            "domain unknown yet"
        );
        assert_eq!(route("web-0.tailnet.test", TYPE_A, Some("")), Route::Upstream);
        assert_eq!(route("", TYPE_A, s), Route::Upstream, "the root");
    }

    #[test]
    fn tailscaled_is_final_under_the_tailnet_domain() {
        let q = query(9, "web-0.tailnet.test", TYPE_A, false);
        let p = parse_query(&q).unwrap();
        let a = answer("web-0.tailnet.test", [100, 64, 0, 1]);
        let r = reply(&q, &p, Route::Tailnet, &Lookup::Answer(a)).unwrap();
        assert_eq!((rcode_of(&r), answer_count(&r)), (Some(NOERROR), Some(1)));
        let mut refused = answer("web-0.tailnet.test", [0; 4]);
        refused[3] = 0x85;
        let r = reply(&q, &p, Route::Tailnet, &Lookup::Answer(refused)).unwrap();
        assert_eq!(rcode_of(&r), Some(NXDOMAIN));
        let r = reply(&q, &p, Route::Tailnet, &Lookup::UnsupportedType).unwrap();
        assert_eq!((rcode_of(&r), answer_count(&r)), (Some(NOERROR), Some(0)));
        let r = reply(&q, &p, Route::Tailnet, &Lookup::Unavailable).unwrap();
        assert_eq!(rcode_of(&r), Some(SERVFAIL));
        assert_eq!(reply(&q, &p, Route::Upstream, &Lookup::Unavailable), None);
    }

    #[test]
    fn short_names_fall_through_to_the_cluster_unless_tailscaled_has_the_host() {
        let q = query(9, "laptop", TYPE_A, false);
        let p = parse_query(&q).unwrap();
        let a = answer("laptop.tailnet.test", [100, 64, 0, 2]);
        assert!(reply(&q, &p, Route::TailnetFirst, &Lookup::Answer(a)).is_some());
        let mut empty = answer("laptop", [0; 4]);
        empty[7] = 0;
        empty.truncate(empty.len() - 16);
        assert_eq!(reply(&q, &p, Route::TailnetFirst, &Lookup::Answer(empty)), None);
        assert_eq!(reply(&q, &p, Route::TailnetFirst, &Lookup::Unavailable), None);
    }
}
