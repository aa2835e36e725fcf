//! Renders `spec.serve` into containerboot's serve-config JSON (tailscale's ServeConfig with Go
//! field names). Maps are ordered, so the same spec gives the same bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{ServeEndpoint, ServeProtocol};

/// Placeholder containerboot replaces with the node's certificate domain.
pub const CERT_DOMAIN: &str = "${TS_CERT_DOMAIN}";

/// tailscale's `ipn.ServeConfig`, the parts tailnode writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServeConfig {
    /// Per-port TCP handlers.
    #[serde(rename = "TCP", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tcp: BTreeMap<String, TcpPortHandler>,
    /// Per host:port web handlers.
    #[serde(rename = "Web", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub web: BTreeMap<String, WebServerConfig>,
    /// host:port entries exposed through Funnel.
    #[serde(rename = "AllowFunnel", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allow_funnel: BTreeMap<String, bool>,
}

/// One of HTTPS, HTTP or TCPForward.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpPortHandler {
    /// Terminate TLS and hand to the web handlers.
    #[serde(rename = "HTTPS", default, skip_serializing_if = "Option::is_none")]
    pub https: Option<bool>,
    /// Plain HTTP to the web handlers.
    #[serde(rename = "HTTP", default, skip_serializing_if = "Option::is_none")]
    pub http: Option<bool>,
    /// Forward raw TCP to host:port.
    #[serde(rename = "TCPForward", default, skip_serializing_if = "Option::is_none")]
    pub tcp_forward: Option<String>,
}

/// Web handlers of one host:port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WebServerConfig {
    /// Handlers by path.
    #[serde(rename = "Handlers")]
    pub handlers: BTreeMap<String, HttpHandler>,
}

/// A reverse-proxy handler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpHandler {
    /// Backend URL.
    #[serde(rename = "Proxy")]
    pub proxy: String,
}

impl ServeConfig {
    /// The serve config for a list of endpoints.
    pub fn from_endpoints(endpoints: &[ServeEndpoint]) -> Self {
        let mut cfg = ServeConfig::default();
        for e in endpoints {
            let port = e.port.to_string();
            let host_port = format!("{CERT_DOMAIN}:{port}");
            let web = |cfg: &mut ServeConfig| {
                let path = e.path.clone().unwrap_or_else(|| "/".to_string());
                cfg.web.entry(host_port.clone()).or_default().handlers.insert(
                    path,
                    HttpHandler {
                        proxy: e.target.clone(),
                    },
                );
            };
            match e.protocol {
                ServeProtocol::Https => {
                    cfg.tcp.insert(
                        port,
                        TcpPortHandler {
                            https: Some(true),
                            ..Default::default()
                        },
                    );
                    web(&mut cfg);
                    if e.funnel {
                        cfg.allow_funnel.insert(host_port.clone(), true);
                    }
                }
                ServeProtocol::Http => {
                    cfg.tcp.insert(
                        port,
                        TcpPortHandler {
                            http: Some(true),
                            ..Default::default()
                        },
                    );
                    web(&mut cfg);
                }
                ServeProtocol::Tcp => {
                    let target = e.target.strip_prefix("tcp://").unwrap_or(&e.target).to_string();
                    cfg.tcp.insert(
                        port,
                        TcpPortHandler {
                            tcp_forward: Some(target),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        cfg
    }
}

/// The serve-config file content for `endpoints`: pretty JSON with a final newline.
pub fn render_serve_config(endpoints: &[ServeEndpoint]) -> String {
    let cfg = ServeConfig::from_endpoints(endpoints);
    let mut out = serde_json::to_string_pretty(&cfg).unwrap_or_else(|_| "{}".to_string());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: i32, protocol: ServeProtocol, target: &str, funnel: bool) -> ServeEndpoint {
        ServeEndpoint {
            port,
            protocol,
            target: target.into(),
            path: None,
            funnel,
        }
    }

    #[test]
    fn https_with_funnel_matches_the_documented_shape() {
        let out = render_serve_config(&[ep(443, ServeProtocol::Https, "http://127.0.0.1:8080", true)]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "TCP": {"443": {"HTTPS": true}},
                "Web": {"${TS_CERT_DOMAIN}:443": {"Handlers": {"/": {"Proxy": "http://127.0.0.1:8080"}}}},
                "AllowFunnel": {"${TS_CERT_DOMAIN}:443": true}
            })
        );
    }

    #[test]
    fn http_path_and_tcp_forward() {
        let mut api = ep(80, ServeProtocol::Http, "http://127.0.0.1:9000", false);
        api.path = Some("/api".into());
        let db = ep(5432, ServeProtocol::Tcp, "tcp://127.0.0.1:5432", false);
        let cfg = ServeConfig::from_endpoints(&[api, db]);
        assert_eq!(cfg.tcp["80"].http, Some(true));
        assert_eq!(
            cfg.web["${TS_CERT_DOMAIN}:80"].handlers["/api"].proxy,
            "http://127.0.0.1:9000"
        );
        assert_eq!(cfg.tcp["5432"].tcp_forward.as_deref(), Some("127.0.0.1:5432"));
        assert!(cfg.allow_funnel.is_empty());
        assert!(!cfg.web.contains_key("${TS_CERT_DOMAIN}:5432"));
    }

    #[test]
    fn rendering_is_deterministic_regardless_of_input_order() {
        let a = ep(443, ServeProtocol::Https, "http://127.0.0.1:8080", false);
        let b = ep(8443, ServeProtocol::Https, "http://127.0.0.1:8081", true);
        let one = render_serve_config(&[a.clone(), b.clone()]);
        assert_eq!(one, render_serve_config(&[a.clone(), b.clone()]));
        assert_eq!(one, render_serve_config(&[b, a]));
        assert!(one.ends_with('\n'));
    }

    #[test]
    fn empty_spec_renders_empty_object() {
        assert_eq!(render_serve_config(&[]), "{}\n");
    }
}
