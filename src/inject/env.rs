//! Outbound proxy environment for the app containers.

use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};

use crate::api::{Outbound, SIDECAR_NAME};

/// Entries always in `NO_PROXY`: the pod itself and cluster-internal names.
const NO_PROXY_BASE: [&str; 5] = ["localhost", "127.0.0.1", "::1", ".svc", ".cluster.local"];

/// The proxy variables for `outbound`, upper-case name first, in a fixed order.
pub(super) fn proxy_vars(outbound: &Outbound) -> Vec<(&'static str, &'static str, String)> {
    let socks = outbound.socks5_port.map(|p| format!("socks5h://127.0.0.1:{p}"));
    let http = outbound.http_proxy_port.map(|p| format!("http://127.0.0.1:{p}"));
    let mut vars = Vec::new();
    if let Some(s) = &socks {
        vars.push(("ALL_PROXY", "all_proxy", s.clone()));
    }
    if let Some(web) = http.or(socks) {
        vars.push(("HTTP_PROXY", "http_proxy", web.clone()));
        vars.push(("HTTPS_PROXY", "https_proxy", web));
    }
    let mut no_proxy: Vec<String> = NO_PROXY_BASE.iter().map(|s| s.to_string()).collect();
    for extra in &outbound.no_proxy {
        if !no_proxy.contains(extra) {
            no_proxy.push(extra.clone());
        }
    }
    vars.push(("NO_PROXY", "no_proxy", no_proxy.join(",")));
    vars
}

/// Appends the proxy variables to every app container (and to init containers when the sidecar
/// is native, so it runs before them), never to tailnode's own. A variable the container sets in
/// either case is kept.
pub(super) fn export_proxy_env(spec: &mut PodSpec, outbound: &Outbound, include_init: bool) {
    let vars = proxy_vars(outbound);
    let apply = |c: &mut Container| {
        // tailnode's own containers: the sidecar, the MagicDNS resolver and the init containers
        // that prepare the network namespace (none of them goes through the proxies).
        let own = [
            SIDECAR_NAME,
            super::dns::DNS_NAME,
            super::forwarding::FORWARDING_NAME,
            super::forwarding::LOCAL_ROUTES_NAME,
        ];
        if own.contains(&c.name.as_str()) {
            return;
        }
        let defined = |name: &str| c.env.iter().flatten().any(|e| e.name == name);
        let add: Vec<EnvVar> = vars
            .iter()
            .filter(|(upper, lower, _)| !defined(upper) && !defined(lower))
            .flat_map(|(upper, lower, value)| {
                [*upper, *lower].map(|name| EnvVar {
                    name: name.to_string(),
                    value: Some(value.clone()),
                    value_from: None,
                })
            })
            .collect();
        if !add.is_empty() {
            c.env.get_or_insert_with(Vec::new).extend(add);
        }
    };
    spec.containers.iter_mut().for_each(apply);
    if include_init {
        spec.init_containers.iter_mut().flatten().for_each(apply);
    }
}
