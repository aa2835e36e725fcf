//! PURE: the few things the resolver reads from and writes into DNS messages (RFC 1035): the
//! header, the one question, a response's rcode, and replies it builds itself. No I/O.

use std::ops::Range;

/// Length of a DNS header.
const HEADER: usize = 12;
/// Response code: no error.
pub const NOERROR: u8 = 0;
/// Response code: the query could not be parsed.
pub const FORMERR: u8 = 1;
/// Response code: the server failed.
pub const SERVFAIL: u8 = 2;
/// Response code: the name does not exist.
pub const NXDOMAIN: u8 = 3;
/// Response code: the server will not answer (tailscaled, for names it does not route).
pub const REFUSED: u8 = 5;
/// Query type A.
pub const TYPE_A: u16 = 1;
/// Query type AAAA.
pub const TYPE_AAAA: u16 = 28;

/// A query's one question and what a reply must echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The query id.
    pub id: u16,
    /// The question name, lower-case, dotted, without the trailing dot (`""` for the root).
    pub name: String,
    /// The question type.
    pub qtype: u16,
    /// The question class.
    pub qclass: u16,
    /// Where the question (name, type, class) sits in the message.
    pub question: Range<usize>,
}

/// Why a message is not a query the resolver can route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Shorter than a header: nothing to answer.
    #[error("message shorter than a DNS header")]
    Short,
    /// A response, or an opcode other than QUERY.
    #[error("not a standard query")]
    NotAQuery,
    /// Not exactly one question, or a malformed one.
    #[error("malformed question")]
    Malformed,
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]))
}

/// The labels of the name of a message's one question (exactly one, uncompressed), and the
/// offset right after the name.
fn question_name(buf: &[u8]) -> Result<(Vec<&[u8]>, usize), MessageError> {
    if u16_at(buf, 4) != Some(1) {
        return Err(MessageError::Malformed);
    }
    let mut at = HEADER;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*buf.get(at).ok_or(MessageError::Malformed)?);
        at += 1;
        if len == 0 {
            return Ok((labels, at));
        }
        // Compression pointers (0xc0) and the reserved label types have no place in a question.
        if len > 63 {
            return Err(MessageError::Malformed);
        }
        labels.push(buf.get(at..at + len).ok_or(MessageError::Malformed)?);
        at += len;
    }
}

/// Parses a query: header, exactly one uncompressed question. The rest (EDNS records) is left alone.
pub fn parse_query(buf: &[u8]) -> Result<Query, MessageError> {
    if buf.len() < HEADER {
        return Err(MessageError::Short);
    }
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let qr = buf[2] & 0x80 != 0;
    let opcode = (buf[2] >> 3) & 0x0f;
    if qr || opcode != 0 {
        return Err(MessageError::NotAQuery);
    }
    let (raw, at) = question_name(buf)?;
    let mut labels: Vec<String> = Vec::with_capacity(raw.len());
    for label in raw {
        if label.iter().any(|b| *b == b'.' || !b.is_ascii_graphic()) {
            return Err(MessageError::Malformed);
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    let qtype = u16_at(buf, at).ok_or(MessageError::Malformed)?;
    let qclass = u16_at(buf, at + 2).ok_or(MessageError::Malformed)?;
    let name = labels.join(".");
    if name.len() > 253 {
        return Err(MessageError::Malformed);
    }
    Ok(Query {
        id,
        name,
        qtype,
        qclass,
        question: HEADER..at + 4,
    })
}

/// The header id of a message, if it has a header.
pub fn id_of(buf: &[u8]) -> Option<u16> {
    u16_at(buf, 0)
}

/// The response code of a message (the header's low 4 bits), if it has a header.
pub fn rcode_of(buf: &[u8]) -> Option<u8> {
    buf.get(3).map(|b| b & 0x0f)
}

/// The number of answer records of a message, if it has a header.
pub fn answer_count(buf: &[u8]) -> Option<u16> {
    u16_at(buf, 6)
}

/// A reply with no records: `query`'s id and question, QR and RA set, RD echoed, `rcode`.
pub fn reply(query_buf: &[u8], query: &Query, rcode: u8) -> Vec<u8> {
    let rd = query_buf.get(2).map_or(0, |b| b & 0x01);
    let mut out = Vec::with_capacity(query.question.end);
    out.extend_from_slice(&query.id.to_be_bytes());
    out.push(0x80 | rd);
    out.push(0x80 | (rcode & 0x0f));
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(query_buf.get(query.question.clone()).unwrap_or_default());
    out
}

/// A header-only FORMERR reply to a message that has a header but no usable question.
pub fn format_error(query_buf: &[u8]) -> Option<Vec<u8>> {
    if query_buf.len() < HEADER {
        return None;
    }
    let id = id_of(query_buf)?;
    let rd = query_buf.get(2).map_or(0, |b| b & 0x01);
    let mut out = id.to_be_bytes().to_vec();
    out.push(0x80 | rd);
    out.push(0x80 | FORMERR);
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// tailscaled's answer (a whole DNS message, built for its own query with id 1) turned into the
/// reply to `query`: the client's id, RD echoed, RA set, and the client's own question bytes
/// (same name, so the same length, so compression pointers into it stay valid; otherwise the
/// answer's question is kept). `None` when the answer is no DNS response.
pub fn adopt_answer(query_buf: &[u8], query: &Query, answer: &[u8]) -> Option<Vec<u8>> {
    if answer.len() < HEADER || answer[2] & 0x80 == 0 {
        return None;
    }
    let mut out = answer.to_vec();
    out[0..2].copy_from_slice(&query.id.to_be_bytes());
    let rd = query_buf.get(2).map_or(0, |b| b & 0x01);
    out[2] = (out[2] & !0x01) | rd;
    out[3] |= 0x80;
    if let Ok(theirs) = parse_question_range(answer) {
        let ours = query_buf.get(query.question.clone())?;
        if theirs.len() == ours.len() {
            out[theirs].copy_from_slice(ours);
        }
    }
    Some(out)
}

/// Where the one question of a response sits (responses carry the same question section as queries).
fn parse_question_range(buf: &[u8]) -> Result<Range<usize>, MessageError> {
    let (_, at) = question_name(buf)?;
    if at + 4 > buf.len() {
        return Err(MessageError::Malformed);
    }
    Ok(HEADER..at + 4)
}

/// The LocalAPI spelling of a query type (`dns-query?type=`), for the types tailscaled takes.
pub fn type_name(qtype: u16) -> Option<&'static str> {
    Some(match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        255 => "ALL",
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query as stub resolvers send it: RD set, one question, optionally an EDNS OPT record.
    pub(crate) fn query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        if edns {
            m.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
        }
        m
    }

    /// An A answer as tailscaled builds it: id 1, lower-case question, one compressed A record.
    pub(crate) fn answer(name: &str, ip: [u8; 4]) -> Vec<u8> {
        let mut m = query(1, &name.to_ascii_lowercase(), TYPE_A, false);
        m[2] = 0x85; // QR, AA, RD
        m[3] = 0x80; // RA
        m[7] = 1; // ANCOUNT
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 2, 88, 0, 4]);
        m.extend_from_slice(&ip);
        m
    }

    #[test]
    fn parses_the_question_and_keeps_its_place() {
        let q = query(0xbeef, "Web-0.Tailnet.Test", TYPE_AAAA, true);
        let p = parse_query(&q).unwrap();
        assert_eq!(p.id, 0xbeef);
        assert_eq!(p.name, "web-0.tailnet.test");
        assert_eq!((p.qtype, p.qclass), (TYPE_AAAA, 1));
        assert_eq!(p.question, 12..12 + 20 + 4);
        assert_eq!(parse_query(&query(1, "", TYPE_A, false)).unwrap().name, "");
    }

    #[test]
    fn refuses_what_is_not_one_plain_question() {
        assert_eq!(parse_query(&[0; 5]), Err(MessageError::Short));
        let mut response = query(1, "a.b", TYPE_A, false);
        response[2] |= 0x80;
        assert_eq!(parse_query(&response), Err(MessageError::NotAQuery));
        let mut two = query(1, "a.b", TYPE_A, false);
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(MessageError::Malformed));
        let truncated = query(1, "abc.def", TYPE_A, false);
        assert_eq!(parse_query(&truncated[..16]), Err(MessageError::Malformed));
        let mut pointer = query(1, "abc", TYPE_A, false);
        pointer[12] = 0xc0;
        assert_eq!(parse_query(&pointer), Err(MessageError::Malformed));
        let mut dotted = query(1, "abc", TYPE_A, false);
        dotted[14] = b'.';
        assert_eq!(parse_query(&dotted), Err(MessageError::Malformed));
    }

    #[test]
    fn replies_echo_id_rd_and_question() {
        let q = query(7, "Nope.Tailnet.Test", TYPE_A, true);
        let p = parse_query(&q).unwrap();
        let r = reply(&q, &p, NXDOMAIN);
        assert_eq!(id_of(&r), Some(7));
        assert_eq!(rcode_of(&r), Some(NXDOMAIN));
        assert_eq!(r[2], 0x81, "QR and the echoed RD");
        assert_eq!(r[3] & 0x80, 0x80, "RA");
        assert_eq!(&r[12..], &q[p.question.clone()]);
        assert_eq!(answer_count(&r), Some(0));
        let f = format_error(&q).unwrap();
        assert_eq!((f.len(), rcode_of(&f), id_of(&f)), (12, Some(FORMERR), Some(7)));
        assert_eq!(format_error(&[1, 2]), None);
    }

    #[test]
    fn adopts_tailscaleds_answer_under_the_clients_id_and_question() {
        let q = query(0x1234, "Web-0.Tailnet.Test", TYPE_A, true);
        let p = parse_query(&q).unwrap();
        let a = answer("web-0.tailnet.test", [100, 64, 0, 7]);
        let r = adopt_answer(&q, &p, &a).unwrap();
        assert_eq!(id_of(&r), Some(0x1234));
        assert_eq!(&r[p.question.clone()], &q[p.question.clone()], "the client's spelling");
        assert_eq!(&r[r.len() - 4..], &[100, 64, 0, 7]);
        assert_eq!((rcode_of(&r), answer_count(&r)), (Some(NOERROR), Some(1)));
        assert_eq!(adopt_answer(&q, &p, &q), None, "a query is no answer");
        assert_eq!(adopt_answer(&q, &p, &[0x80; 4]), None);
    }

    #[test]
    fn names_the_types_tailscaled_takes() {
        assert_eq!(type_name(TYPE_A), Some("A"));
        assert_eq!(type_name(TYPE_AAAA), Some("AAAA"));
        assert_eq!(type_name(12), Some("PTR"));
        assert_eq!(type_name(65), None, "HTTPS records");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            // Whatever arrives, every reply made carries the query's id.
            if let Ok(q) = parse_query(&bytes) {
                let r = reply(&bytes, &q, SERVFAIL);
                proptest::prop_assert_eq!(id_of(&r), id_of(&bytes));
                if let Some(a) = adopt_answer(&bytes, &q, &bytes) {
                    proptest::prop_assert_eq!(id_of(&a), id_of(&bytes));
                }
            }
            if let Some(e) = format_error(&bytes) {
                proptest::prop_assert_eq!(id_of(&e), id_of(&bytes));
            }
        }
    }
}
