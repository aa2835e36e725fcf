//! Just enough DER to read a certificate's validity (rcgen writes certificates but cannot read
//! them, and a parser crate would be a large dependency for two timestamps).
//!
//! `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
//! signature, issuer, validity SEQUENCE { notBefore Time, notAfter Time }, ... }, ... }`

use chrono::{DateTime, NaiveDateTime, Utc};

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const INTEGER: u8 = 0x02;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// One tag-length-value: `(tag, content, rest)`. Single-byte tags, definite lengths only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = rest
            .get(..n)?
            .iter()
            .fold(0_usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest.get(n..)?)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// The next element, which must have `tag`: `(content, rest)`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = tlv(input)?;
    (t == tag).then_some((content, rest))
}

fn time(tag: u8, content: &[u8]) -> Option<DateTime<Utc>> {
    let text = std::str::from_utf8(content).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let full = match (tag, text.len()) {
        (UTC_TIME, 12) => {
            let yy: u32 = text.get(..2)?.parse().ok()?;
            let century = if yy >= 50 { "19" } else { "20" };
            format!("{century}{text}")
        }
        (GENERALIZED_TIME, 14) => text.to_string(),
        _ => return None,
    };
    NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S")
        .ok()
        .map(|t| t.and_utc())
}

/// `(notBefore, notAfter)` of a DER certificate, or `None` when it does not parse.
pub fn validity(cert_der: &[u8]) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (cert, _) = expect(cert_der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let (tag, _, after_version) = tlv(tbs)?;
    let rest = if tag == VERSION { after_version } else { tbs };
    let (_, rest) = expect(rest, INTEGER)?;
    let (_, rest) = expect(rest, SEQUENCE)?; // signature algorithm
    let (_, rest) = expect(rest, SEQUENCE)?; // issuer
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (tag, content, rest) = tlv(validity)?;
    let not_before = time(tag, content)?;
    let (tag, content, _) = tlv(rest)?;
    Some((not_before, time(tag, content)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{generate_ca, issue_serving};
    use crate::tls::certs_from_pem;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn reads_what_rcgen_writes_in_utc_and_generalized_time() {
        // 2026 (UTCTime) and 2050+ (GeneralizedTime, the CA's notAfter in 2062).
        for now in [at(1_780_000_000), at(2_840_000_000)] {
            let ca = generate_ca(now).unwrap();
            let ca_der = certs_from_pem(ca.cert_pem.as_bytes()).unwrap().remove(0);
            let (from, until) = validity(&ca_der).unwrap();
            assert_eq!(from, now - super::super::BACKDATE);
            assert_eq!(until, now + super::super::CA_VALIDITY);
            let cert = issue_serving(&ca, &["a.svc".to_string()], now).unwrap();
            let der = certs_from_pem(cert.cert_pem.as_bytes()).unwrap().remove(0);
            assert_eq!(validity(&der).unwrap().1, cert.not_after);
        }
    }

    #[test]
    fn garbage_and_truncations_are_none() {
        let ca = generate_ca(at(1_780_000_000)).unwrap();
        let der = certs_from_pem(ca.cert_pem.as_bytes()).unwrap().remove(0);
        for len in 0..der.len().min(400) {
            assert_eq!(validity(&der[..len]), None, "truncated at {len}");
        }
        assert_eq!(validity(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(validity(&[]), None);
        assert_eq!(time(UTC_TIME, "2601011200Z".as_bytes()), None);
        assert_eq!(time(UTC_TIME, "26010112000éZ".as_bytes()), None);
        assert_eq!(time(GENERALIZED_TIME, "20261301120000Z".as_bytes()), None);
        assert_eq!(time(UTC_TIME, b"490101000000Z"), Some(at(2_493_072_000)));
        assert_eq!(time(UTC_TIME, b"500101000000Z"), Some(at(-631_152_000)));
    }
}
