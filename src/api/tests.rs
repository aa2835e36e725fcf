//! Every CEL rule of the schema, evaluated client-side with kube's CEL validator (the same rules
//! the apiserver runs; the harness tests check them on a real apiserver too), and the CRD drift check.

use serde_json::{Value, json};

use super::*;

fn node(spec: Value) -> TailscaleNode {
    serde_json::from_value(json!({
        "apiVersion": "tailnode.dev/v1alpha1",
        "kind": "TailscaleNode",
        "metadata": {"name": "web", "namespace": "apps"},
        "spec": spec,
    }))
    .unwrap()
}

/// The messages of the rules `spec` breaks (empty when valid).
fn violations(spec: Value) -> Vec<String> {
    match node(spec).validate_cel() {
        Ok(()) => vec![],
        Err(errs) => errs.into_iter().map(|e| e.message).collect(),
    }
}

fn assert_only(spec: Value, needle: &str) {
    let v = violations(spec);
    assert_eq!(v.len(), 1, "expected exactly one violation, got {v:?}");
    assert!(v[0].contains(needle), "{:?} does not mention {needle:?}", v[0]);
}

#[test]
fn a_full_valid_spec_passes_every_rule() {
    let spec = json!({
        "mode": "auto",
        "hostname": "web",
        "tags": ["tag:k8s", "tag:web-1"],
        "credentials": {"headscale": {"url": "http://127.0.0.1:8080", "apiKeySecretName": "hs", "user": "1"}},
        "controlURL": "https://control.example.com",
        "serve": [
            {"port": 443, "protocol": "https", "target": "http://127.0.0.1:8080", "funnel": true},
            {"port": 80, "protocol": "http", "target": "http://127.0.0.1:8080", "path": "/api"},
            {"port": 5432, "protocol": "tcp", "target": "tcp://127.0.0.1:5432"}
        ],
        "outbound": {"socks5Port": 1055, "exportEnv": true},
        "routes": {"advertise": ["10.0.0.0/24", "fd00::/64"], "accept": true},
        "exitNode": {"advertise": true}
    });
    assert_eq!(violations(spec), Vec::<String>::new());
    assert_eq!(violations(json!({})), Vec::<String>::new());
}

#[test]
fn funnel_only_on_443_8443_10000_with_https() {
    for port in [443, 8443, 10000] {
        let ok =
            json!({"serve": [{"port": port, "protocol": "https", "target": "http://127.0.0.1:1", "funnel": true}]});
        assert_eq!(violations(ok), Vec::<String>::new(), "port {port}");
    }
    let bad_port =
        json!({"serve": [{"port": 9000, "protocol": "https", "target": "http://127.0.0.1:1", "funnel": true}]});
    assert_only(
        bad_port,
        "funnel works only with protocol https on port 443, 8443 or 10000",
    );
    let bad_proto =
        json!({"serve": [{"port": 443, "protocol": "http", "target": "http://127.0.0.1:1", "funnel": true}]});
    assert_only(bad_proto, "funnel works only");
}

#[test]
fn serve_ports_are_unique() {
    let spec = json!({"serve": [
        {"port": 443, "protocol": "https", "target": "http://127.0.0.1:1"},
        {"port": 443, "protocol": "http", "target": "http://127.0.0.1:2"}
    ]});
    assert_only(spec, "serve ports must be unique");
}

#[test]
fn serve_target_matches_protocol_and_path_needs_http() {
    let tcp_with_url = json!({"serve": [{"port": 22, "protocol": "tcp", "target": "http://127.0.0.1:22"}]});
    assert_only(tcp_with_url, "target must be tcp://host:port");
    let https_with_tcp = json!({"serve": [{"port": 443, "protocol": "https", "target": "tcp://127.0.0.1:1"}]});
    assert_only(https_with_tcp, "target must be");
    let tcp_path = json!({"serve": [{"port": 22, "protocol": "tcp", "target": "tcp://127.0.0.1:22", "path": "/x"}]});
    assert_only(tcp_path, "path applies only to http and https");
    let bad_path = json!({"serve": [{"port": 80, "protocol": "http", "target": "http://127.0.0.1:1", "path": "x"}]});
    assert_only(bad_path, "path must start with '/'");
}

#[test]
fn tags_must_start_with_tag() {
    assert_only(json!({"tags": ["k8s"]}), "every tag must look like 'tag:<name>'");
    assert_only(json!({"tags": ["tag:ok", "tag:"]}), "every tag");
}

/// An OAuth client is either a stored secret or workload identity federation (client id and
/// audience together).
#[test]
fn oauth_is_a_secret_or_a_federated_client() {
    let fed = json!({"credentials": {"oauth": {"clientID": "k123", "audience": "tailnode.example"}}});
    assert_eq!(violations(fed), Vec::<String>::new());
    assert_only(
        json!({"credentials": {"oauth": {"secretName": "o", "clientID": "k", "audience": "a"}}}),
        "set secretName (a stored client secret) or clientID with audience",
    );
    assert_only(
        json!({"credentials": {"oauth": {}}}),
        "set secretName (a stored client secret) or clientID with audience",
    );
    assert_only(
        json!({"credentials": {"oauth": {"clientID": "k"}}}),
        "clientID and audience go together",
    );
}

#[test]
fn exactly_one_credential_source() {
    let two = json!({"credentials": {
        "oauth": {"secretName": "oauth"},
        "authKey": {"secretName": "key"}
    }});
    assert_only(two, "set exactly one of oauth, headscale or authKey");
    assert_only(json!({"credentials": {}}), "set exactly one");
    assert_eq!(
        violations(json!({"credentials": {"oauth": {"secretName": "o"}}})),
        Vec::<String>::new()
    );
    assert_eq!(
        violations(json!({"credentials": {"authKey": {"secretName": "k"}}})),
        Vec::<String>::new()
    );
}

#[test]
fn hostname_is_a_dns_label() {
    for bad in ["Web", "-web", "web-", "we_b", "web.example"] {
        assert_only(json!({"hostname": bad}), "hostname must be a DNS label");
    }
    assert_eq!(violations(json!({"hostname": "web-1"})), Vec::<String>::new());
}

#[test]
fn urls_are_http_or_https() {
    assert_only(
        json!({"controlURL": "ftp://x"}),
        "controlURL must be an http:// or https:// URL",
    );
    let hs = json!({"credentials": {"headscale": {"url": "127.0.0.1:8080", "apiKeySecretName": "k", "user": "1"}}});
    assert_only(hs, "headscale.url must be");
}

#[test]
fn outbound_needs_a_port() {
    assert_only(
        json!({"outbound": {"exportEnv": true}}),
        "outbound: set socks5Port, httpProxyPort, or both",
    );
    assert_eq!(
        violations(json!({"outbound": {"httpProxyPort": 1056}})),
        Vec::<String>::new()
    );
}

#[test]
fn routes_are_cidrs() {
    assert_only(
        json!({"routes": {"advertise": ["10.0.0.1"]}}),
        "routes.advertise entries must be CIDRs",
    );
}

#[test]
fn exit_node_rules() {
    assert_only(
        json!({"exitNode": {"advertise": true, "use": "100.64.0.1"}}),
        "cannot advertise itself",
    );
    let both = json!({"exitNode": {"use": "100.64.0.1"}, "routes": {"advertise": ["10.0.0.0/24"]}});
    assert_only(both, "cannot advertise routes");
}

#[test]
fn mode_defaults_to_userspace_and_rejects_unknown_values() {
    assert_eq!(node(json!({})).spec.mode, Mode::Userspace);
    let bad: Result<TailscaleNodeSpec, _> = serde_json::from_value(json!({"mode": "kernel"}));
    assert!(bad.unwrap_err().to_string().contains("unknown variant `kernel`"));
}

#[test]
fn crd_is_named_and_namespaced() {
    use kube::CustomResourceExt;
    let crd = TailscaleNode::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("tailscalenodes.tailnode.dev"));
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["tsn".to_string()]));
    let cols = crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default();
    let names: Vec<_> = cols.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["Mode", "Ready", "Replicas", "Hostnames", "Addresses", "Age"]);
    let wide: Vec<_> = cols
        .iter()
        .filter(|c| c.priority == Some(1))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(wide, ["Hostnames", "Addresses"], "only in -o wide");
}

#[test]
fn committed_crd_matches_the_types() {
    let committed = include_str!("../../crds/tailscalenode.yaml");
    let generated = crate::crd::crd_yaml().unwrap();
    assert!(
        committed == generated,
        "crds/tailscalenode.yaml is stale: run `cargo run -- crd > crds/tailscalenode.yaml`"
    );
}

#[test]
fn committed_reference_matches_the_types() {
    let committed = include_str!("../../docs/reference.md");
    assert!(
        committed == crate::crd::reference_markdown(),
        "docs/reference.md is stale: run `cargo run -- crd --reference > docs/reference.md`"
    );
}

#[test]
fn every_field_has_a_description() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(TailscaleNode::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut missing = vec![];
    fn walk(path: &str, v: &Value, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                let here = format!("{path}.{k}");
                // Embedded Kubernetes types (resources, env) carry their own docs upstream.
                if here.contains(".resources.") || here.contains(".env.") {
                    continue;
                }
                if p.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, p, missing);
                if let Some(items) = p.get("items") {
                    walk(&here, items, missing);
                }
            }
        }
    }
    walk("spec", spec, &mut missing);
    assert!(missing.is_empty(), "fields without description: {missing:?}");
}

#[test]
fn names_derive_from_pod_and_node() {
    assert_eq!(state_secret_name("web-0"), "ts-web-0");
    assert_eq!(serve_config_map_name("web"), "tsn-web-serve");
}
