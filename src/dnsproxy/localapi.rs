//! tailscaled's LocalAPI over its unix socket: the two requests the resolver makes, as pure
//! request builders and response parsers, and one thin I/O function.
//!
//! Checked against tailscale.com v1.102.5: `ipn/localapi/localapi.go` serves
//! `GET /localapi/v0/dns-query?name=<name>&type=<A|AAAA|...>` with JSON
//! `apitype.DNSQueryResponse{Bytes []byte, Resolvers}` (Bytes, base64 in JSON, is the whole DNS
//! response of tailscaled's internal resolver, built for a query with id 1); it needs write
//! access, which a unix-socket peer has when it runs as root or as tailscaled's own uid
//! (`ipn/ipnauth`, `IsReadonlyConn`). It accepts only the Host `local-tailscaled.sock`.
//! `GET /localapi/v0/status?peers=false` gives `CurrentTailnet.MagicDNSSuffix` (and the older
//! top-level `MagicDNSSuffix`). The internal resolver answers MagicDNS names from the netmap
//! whatever `--accept-dns` says (`ipn/ipnlocal/resolve.go`, `magicDNSHosts`).

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Host header the LocalAPI accepts.
const HOST: &str = "local-tailscaled.sock";
/// Largest LocalAPI response read.
const MAX_RESPONSE: u64 = 256 * 1024;

/// Why a LocalAPI request gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// The socket could not be reached or the exchange failed.
    #[error("talking to tailscaled's LocalAPI")]
    Io(#[source] std::io::Error),
    /// No answer within the timeout.
    #[error("tailscaled's LocalAPI did not answer in time")]
    Timeout,
    /// An HTTP status other than 200.
    #[error("tailscaled's LocalAPI answered HTTP {0}")]
    Status(u16),
    /// Not HTTP, or not the JSON expected.
    #[error("tailscaled's LocalAPI answer could not be read")]
    Malformed,
}

impl LocalApiError {
    /// A fixed label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LocalApiError::Io(_) => "io",
            LocalApiError::Timeout => "timeout",
            LocalApiError::Status(_) => "status",
            LocalApiError::Malformed => "malformed",
        }
    }
}

/// PURE: the path of a dns-query request.
pub fn dns_query_path(name: &str, qtype: &str) -> String {
    format!("/localapi/v0/dns-query?name={}&type={qtype}", escape(name))
}

/// The path of the status request (without peers: only the tailnet's own facts).
pub const STATUS_PATH: &str = "/localapi/v0/status?peers=false";

/// PURE: percent-encodes everything but unreserved URL characters.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// PURE: an HTTP/1.0 GET (the server closes the connection after the response, no chunking).
pub fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.0\r\nHost: {HOST}\r\nUser-Agent: tailnode-dns-proxy\r\n\r\n").into_bytes()
}

/// PURE: the status code and body of an HTTP/1.x response.
pub fn parse_response(raw: &[u8]) -> Result<(u16, &[u8]), LocalApiError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(LocalApiError::Malformed)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| LocalApiError::Malformed)?;
    let status_line = head.lines().next().ok_or(LocalApiError::Malformed)?;
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(LocalApiError::Malformed);
    }
    let code = parts
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or(LocalApiError::Malformed)?;
    Ok((code, &raw[end + 4..]))
}

/// PURE: the DNS message in a dns-query answer.
pub fn parse_dns_query(body: &[u8]) -> Result<Vec<u8>, LocalApiError> {
    #[derive(Deserialize)]
    struct DnsQueryResponse {
        #[serde(rename = "Bytes")]
        bytes: String,
    }
    let r: DnsQueryResponse = serde_json::from_slice(body).map_err(|_| LocalApiError::Malformed)?;
    base64::engine::general_purpose::STANDARD
        .decode(r.bytes)
        .map_err(|_| LocalApiError::Malformed)
}

/// PURE: the tailnet's MagicDNS domain in a status answer (lower-case, no trailing dot), if any.
pub fn parse_suffix(body: &[u8]) -> Result<Option<String>, LocalApiError> {
    #[derive(Deserialize)]
    struct Tailnet {
        #[serde(rename = "MagicDNSSuffix", default)]
        magic_dns_suffix: String,
    }
    #[derive(Deserialize)]
    struct Status {
        #[serde(rename = "CurrentTailnet", default)]
        current_tailnet: Option<Tailnet>,
        #[serde(rename = "MagicDNSSuffix", default)]
        magic_dns_suffix: String,
    }
    let s: Status = serde_json::from_slice(body).map_err(|_| LocalApiError::Malformed)?;
    let suffix = s
        .current_tailnet
        .map(|t| t.magic_dns_suffix)
        .filter(|t| !t.is_empty())
        .unwrap_or(s.magic_dns_suffix);
    let suffix = suffix.trim_end_matches('.').to_ascii_lowercase();
    Ok((!suffix.is_empty()).then_some(suffix))
}

/// I/O: one GET on the LocalAPI socket; the body of a 200 answer.
pub async fn get(socket: &Path, path: &str, timeout: Duration) -> Result<Vec<u8>, LocalApiError> {
    let exchange = async {
        let mut conn = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(LocalApiError::Io)?;
        conn.write_all(&request(path)).await.map_err(LocalApiError::Io)?;
        let mut raw = Vec::new();
        conn.take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .await
            .map_err(LocalApiError::Io)?;
        Ok::<_, LocalApiError>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| LocalApiError::Timeout)??;
    match parse_response(&raw)? {
        (200, body) => Ok(body.to_vec()),
        (code, _) => Err(LocalApiError::Status(code)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_plain_http_10_with_the_localapi_host() {
        let r = String::from_utf8(request(&dns_query_path("web-0.tailnet.test", "AAAA"))).unwrap();
        assert_eq!(
            r,
            "GET /localapi/v0/dns-query?name=web-0.tailnet.test&type=AAAA HTTP/1.0\r\nHost: local-tailscaled.sock\r\nUser-Agent: tailnode-dns-proxy\r\n\r\n"
        );
        assert_eq!(
            dns_query_path("a b&c=d", "A"),
            "/localapi/v0/dns-query?name=a%20b%26c%3Dd&type=A"
        );
    }

    #[test]
    fn reads_status_and_body() {
        let raw = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Bytes\":\"AAE=\"}";
        let (code, body) = parse_response(raw).unwrap();
        assert_eq!(code, 200);
        assert_eq!(parse_dns_query(body).unwrap(), vec![0, 1]);
        let (code, _) = parse_response(b"HTTP/1.1 403 Forbidden\r\n\r\ndns-query access denied\n").unwrap();
        assert_eq!(code, 403);
        assert!(matches!(parse_response(b"garbage"), Err(LocalApiError::Malformed)));
        assert!(matches!(
            parse_response(b"SSH-2.0\r\n\r\n"),
            Err(LocalApiError::Malformed)
        ));
        assert!(matches!(
            parse_dns_query(b"{\"Bytes\":\"!!\"}"),
            Err(LocalApiError::Malformed)
        ));
        assert!(matches!(parse_dns_query(b"[]"), Err(LocalApiError::Malformed)));
    }

    #[test]
    fn finds_the_magicdns_domain_in_the_status() {
        let status = br#"{"Version":"1.102.5","MagicDNSSuffix":"old.example","CurrentTailnet":{"Name":"tailnode","MagicDNSSuffix":"Tailnet.Test.","MagicDNSEnabled":true}}"#;
        assert_eq!(parse_suffix(status).unwrap().as_deref(), Some("tailnet.test"));
        assert_eq!(
            parse_suffix(br#"{"MagicDNSSuffix":"tail1234.ts.net","CurrentTailnet":null}"#)
                .unwrap()
                .as_deref(),
            Some("tail1234.ts.net")
        );
        assert_eq!(parse_suffix(br#"{"BackendState":"NeedsLogin"}"#).unwrap(), None);
        assert!(parse_suffix(b"nope").is_err());
    }
}
