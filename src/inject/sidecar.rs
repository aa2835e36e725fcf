//! Builds the `tailscale` sidecar container and the volumes it needs.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, ConfigMapVolumeSource, Container, DownwardAPIProjection, DownwardAPIVolumeFile,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ClusterFacts, EffectiveMode, InjectError, env};
use crate::api::{
    POD_INDEX_LABEL, SIDECAR_NAME, SLOT_ANNOTATION, TailscaleNodeSpec, serve_config_map_name, slot_secret_prefix,
};

/// Env var that carries a StatefulSet pod's ordinal (from the downward API).
pub(super) const POD_INDEX_ENV: &str = "TS_POD_INDEX";
/// The slot number of a slot pod, from its `tailnode.dev/slot` annotation (downward API).
pub(super) const SLOT_ENV: &str = "TS_SLOT";
/// Writable scratch directory for tailscaled (socket, temp files).
pub(super) const VOL_TMP: &str = "tailnode-tmp";
/// The serve config ConfigMap, mounted as a directory so updates arrive.
pub(super) const VOL_SERVE: &str = "tailnode-serve";
/// hostPath /dev/net/tun for TUN mode.
pub(super) const VOL_TUN: &str = "tailnode-tun";
/// Service-account token for pods that turned automounting off.
pub(super) const VOL_TOKEN: &str = "tailnode-kube-api-access";
/// Where the serve config directory is mounted.
pub const SERVE_DIR: &str = "/etc/tailnode/serve";
/// File name of the serve config inside the ConfigMap.
pub const SERVE_FILE: &str = "serve.json";
/// Default port of containerboot's health endpoint.
pub const DEFAULT_HEALTH_PORT: i32 = 9002;
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The uid of a userspace sidecar (and of the MagicDNS resolver next to it).
pub(super) const NON_ROOT_UID: i64 = 1000;

/// Everything the builder needs, resolved by the engine.
pub(super) struct Plan<'a> {
    pub node_name: &'a str,
    pub spec: &'a TailscaleNodeSpec,
    pub facts: &'a ClusterFacts,
    pub mode: EffectiveMode,
    pub native: bool,
    pub hostname: String,
    pub own_token: bool,
    /// The pod takes a slot (`replicaIdentity: slots`): its Secret and hostname follow `TS_SLOT`.
    pub slot: bool,
}

/// Adds the sidecar, its volumes, and (when asked) the proxy env of the app containers.
pub(super) fn add(spec: &mut PodSpec, plan: &Plan<'_>) -> Result<(), InjectError> {
    let volumes = volumes(plan);
    for v in &volumes {
        if spec.volumes.iter().flatten().any(|existing| existing.name == v.name) {
            return Err(InjectError::NameTaken {
                what: "volume",
                name: v.name.clone(),
            });
        }
    }
    if let Some(outbound) = plan.spec.outbound.as_ref().filter(|o| o.export_env) {
        env::export_proxy_env(spec, outbound, plan.native);
    }
    let container = container(plan);
    let image = spec_image(plan);
    let forwarding = super::forwarding::needed(plan.spec, plan.mode).then(|| super::forwarding::container(&image));
    if let Some(f) = &forwarding {
        container_name_free(spec, &f.name)?;
    }
    let magic_dns = super::dns::wanted(plan.spec);
    let resolver = magic_dns.then(|| super::dns::container(plan.facts, plan.mode, plan.native, VOL_TMP));
    if let Some(r) = &resolver {
        container_name_free(spec, &r.name)?;
    }
    if plan.native {
        let inits = spec.init_containers.get_or_insert_with(Vec::new);
        inits.insert(0, container);
        // Before the sidecar: tailscaled resolves its control server's name through it.
        if let Some(r) = resolver {
            inits.insert(0, r);
        }
    } else {
        spec.containers.push(container);
        spec.containers.extend(resolver);
    }
    if magic_dns {
        super::dns::configure_pod(spec, plan.facts);
    }
    // First of all: the pod's network namespace is set before tailscaled starts routing.
    if let Some(ranges) = super::forwarding::local_ranges(plan.spec, plan.mode, &plan.facts.defaults.cluster_cidrs) {
        let local = super::forwarding::local_routes_container(&image, &ranges);
        container_name_free(spec, &local.name)?;
        spec.init_containers.get_or_insert_with(Vec::new).insert(0, local);
    }
    if let Some(f) = forwarding {
        spec.init_containers.get_or_insert_with(Vec::new).insert(0, f);
    }
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes);
    Ok(())
}

/// Refuses a pod that already has a container (of any kind) named `name`, which tailnode adds.
fn container_name_free(spec: &PodSpec, name: &str) -> Result<(), InjectError> {
    let mut all = spec.init_containers.iter().flatten().chain(&spec.containers);
    if all.any(|c| c.name == name) {
        return Err(InjectError::NameTaken {
            what: "container",
            name: name.to_string(),
        });
    }
    Ok(())
}

/// The sidecar's image (the init containers that prepare its network namespace use it too).
fn spec_image(plan: &Plan<'_>) -> String {
    plan.spec
        .sidecar
        .as_ref()
        .and_then(|s| s.image.clone())
        .unwrap_or_else(|| plan.facts.defaults.image.clone())
}

fn health_port(spec: &TailscaleNodeSpec) -> i32 {
    spec.sidecar
        .as_ref()
        .and_then(|s| s.health_port)
        .unwrap_or(DEFAULT_HEALTH_PORT)
}

fn container(plan: &Plan<'_>) -> Container {
    let spec = plan.spec;
    let sidecar = spec.sidecar.clone().unwrap_or_default();
    let port = health_port(spec);
    let mut mounts = vec![mount(VOL_TMP, "/tmp", false)];
    if !spec.serve.is_empty() {
        mounts.push(mount(VOL_SERVE, SERVE_DIR, true));
    }
    if plan.mode == EffectiveMode::Tun {
        mounts.push(mount(VOL_TUN, "/dev/net/tun", false));
    }
    if plan.own_token {
        mounts.push(mount(VOL_TOKEN, SA_DIR, true));
    }
    Container {
        name: SIDECAR_NAME.to_string(),
        image: Some(spec_image(plan)),
        image_pull_policy: sidecar.image_pull_policy.map(|p| p.as_str().to_string()),
        env: Some(env_vars(plan, port, sidecar.env)),
        resources: Some(sidecar.resources.unwrap_or_else(default_resources)),
        security_context: Some(security_context(plan.mode, sidecar.privileged)),
        volume_mounts: Some(mounts),
        restart_policy: plan.native.then(|| "Always".to_string()),
        // A native sidecar gates the app on the tunnel being up; containerboot's own boot timeout
        // (60 s) restarts it first if login never completes.
        startup_probe: plan.native.then(|| health_probe(port, 1, 120)),
        readiness_probe: Some(health_probe(port, 5, 3)),
        liveness_probe: Some(liveness_probe(port, plan.native)),
        ..Default::default()
    }
}

fn health_probe(port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// Seconds between liveness checks, and failed checks in a row before the kubelet restarts the
/// sidecar: a minute without a tailnet IP.
pub(super) const LIVENESS_PERIOD: i32 = 10;
/// See [`LIVENESS_PERIOD`].
pub(super) const LIVENESS_FAILURES: i32 = 6;

/// The sidecar's liveness probe: containerboot's `/healthz` on the health port.
///
/// `/healthz` answers 200 while tailscaled's current netmap gives the node a tailnet IP, else
/// 503 (tailscale.com v1.102.5, `kube/health/healthz.go`, `Healthz.ServeHTTP`, updated from
/// `cmd/containerboot/main.go`). It never calls the apiserver, so an apiserver outage cannot
/// restart sidecars. tailscaled keeps its last netmap while the control server (Tailscale or
/// Headscale) is unreachable, so a control hiccup does not fail it either; only a node that lost
/// its addresses does. The thresholds are generous all the same: one check every 10 s, a restart
/// after 6 failures in a row (a minute), each check allowed 5 s. A native sidecar's startup probe
/// (2 minutes) covers start-up and liveness begins after it; a regular sidecar has no startup
/// probe, so its liveness waits 60 s first — containerboot's own `TS_BOOT_TIMEOUT` — and a slow
/// login ends by containerboot's exit, not by the kubelet.
pub(super) fn liveness_probe(port: i32, native: bool) -> Probe {
    Probe {
        timeout_seconds: Some(5),
        initial_delay_seconds: (!native).then_some(60),
        ..health_probe(port, LIVENESS_PERIOD, LIVENESS_FAILURES)
    }
}

/// Requests and limits of a sidecar whose TailscaleNode sets no `sidecar.resources` (set ones are
/// used exactly as written, nothing merged). Small requests (cpu 10m, memory 32Mi) so the sidecar
/// schedules anywhere, and a memory limit (256Mi, well above a userspace tailscaled's usual
/// 30–80Mi) so namespaces whose LimitRange or ResourceQuota demands limits admit the pod. No CPU
/// limit: throttling a network data path hurts latency, and no quota needs one unless it caps
/// `limits.cpu`; such a namespace can set `sidecar.resources`.
pub(super) fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("10m")),
            ("memory".to_string(), q("32Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("256Mi"))])),
        claims: None,
    }
}

/// Environment that makes the sidecar reach the apiserver by its service address, with no
/// cluster DNS.
///
/// With `TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV=true`, containerboot and tailscaled's
/// Secret state store build the URL as
/// `fmt.Sprintf("https://%s:%s", KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT_HTTPS)`
/// (tailscale.com v1.102.5: `cmd/containerboot/kube.go`, `newKubeClient`, and
/// `ipn/store/kubestore/store_kube.go`, `newClient`), without brackets, so an IPv6 service host
/// such as `fd00::1` gives `https://fd00::1:443`, which Go's `net/url` rejects ("invalid port
/// \":10:96::1:443\" after host" for `fd00:10:96::1`). For an IPv6 host the sidecar
/// therefore gets its own `KUBERNETES_SERVICE_HOST=[fd00::1]` (a variable the container declares
/// wins over the kubelet's service variables), which gives `https://[fd00::1]:443`. Nothing else
/// in that release reads the variable except to test that it is set (`settings.go`,
/// `hostinfo.go`). An IPv4 or unknown host leaves the kubelet's value alone.
pub(super) fn api_server_env(host: Option<&str>) -> Vec<EnvVar> {
    let mut env = Vec::new();
    if let Some(bracketed) = host.and_then(bracketed_ipv6) {
        env.push(value("KUBERNETES_SERVICE_HOST", bracketed));
    }
    env.push(value("TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV", "true"));
    env
}

/// `[addr]` for an IPv6 literal (bare or already bracketed), `None` for anything else.
pub(super) fn bracketed_ipv6(host: &str) -> Option<String> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse::<Ipv6Addr>().ok().map(|addr| format!("[{addr}]"))
}

fn value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_ref(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

/// The `tailscale up` arguments: login server, routes, exit node. Tags are not advertised: they
/// ride on the auth key the controller mints (Headscale refuses `--advertise-tags` with a key).
/// `--reset` first: containerboot runs `tailscale up` on every start (`TS_AUTH_ONCE=false`), and
/// with `--reset` the preferences become exactly these, so a replica that keeps its state (a
/// StatefulSet pod) picks up a changed spec when it restarts, including a setting turned off.
pub(super) fn extra_args(plan: &Plan<'_>) -> Vec<String> {
    let spec = plan.spec;
    let mut args = vec!["--reset".to_string()];
    let login = spec
        .control_url
        .clone()
        .or_else(|| {
            spec.credentials
                .as_ref()
                .and_then(|c| c.headscale.as_ref())
                .map(|h| h.url.clone())
        })
        .or_else(|| plan.facts.defaults.control_url.clone());
    if let Some(url) = login {
        args.push(format!("--login-server={url}"));
    }
    if spec.routes.as_ref().is_some_and(|r| r.accept) {
        args.push("--accept-routes".to_string());
    }
    if let Some(exit) = &spec.exit_node {
        if exit.advertise {
            args.push("--advertise-exit-node".to_string());
        }
        if let Some(node) = &exit.use_node {
            args.push(format!("--exit-node={node}"));
        }
    }
    args
}

fn env_vars(plan: &Plan<'_>, health_port: i32, extra: Vec<EnvVar>) -> Vec<EnvVar> {
    let spec = plan.spec;
    // Order matters: $(VAR) expands only variables defined earlier in the same container.
    let mut env = vec![
        field_ref("POD_NAME", "metadata.name"),
        field_ref("POD_UID", "metadata.uid"),
    ];
    if plan.hostname.contains(POD_INDEX_ENV) {
        env.push(field_ref(
            POD_INDEX_ENV,
            &format!("metadata.labels['{POD_INDEX_LABEL}']"),
        ));
    }
    if plan.slot {
        env.push(field_ref(
            SLOT_ENV,
            &format!("metadata.annotations['{SLOT_ANNOTATION}']"),
        ));
        let prefix = slot_secret_prefix(plan.node_name);
        env.push(value("TS_KUBE_SECRET", format!("{prefix}$({SLOT_ENV})")));
    } else {
        env.push(value("TS_KUBE_SECRET", "ts-$(POD_NAME)"));
    }
    // `tailscale up` on every start (see `extra_args`). containerboot then leaves the used key in
    // the Secret; the controller removes it once the device registered.
    env.push(value("TS_AUTH_ONCE", "false"));
    env.push(value(
        "TS_USERSPACE",
        (plan.mode == EffectiveMode::Userspace).to_string(),
    ));
    env.push(value("TS_HOSTNAME", plan.hostname.clone()));
    env.push(value("TS_EXTRA_ARGS", extra_args(plan).join(" ")));
    if plan.facts.defaults.no_logs_no_support {
        env.push(value("TS_TAILSCALED_EXTRA_ARGS", "--no-logs-no-support"));
    }
    if let Some(routes) = spec.routes.as_ref().filter(|r| !r.advertise.is_empty()) {
        env.push(value("TS_ROUTES", routes.advertise.join(",")));
    }
    env.push(value("TS_ACCEPT_DNS", "false"));
    env.extend(api_server_env(plan.facts.api_server_host.as_deref()));
    env.push(value("TS_ENABLE_HEALTH_CHECK", "true"));
    env.push(value("TS_LOCAL_ADDR_PORT", format!("[::]:{health_port}")));
    if let Some(out) = &spec.outbound {
        if let Some(p) = out.socks5_port {
            env.push(value("TS_SOCKS5_SERVER", format!("localhost:{p}")));
        }
        if let Some(p) = out.http_proxy_port {
            env.push(value("TS_OUTBOUND_HTTP_PROXY_LISTEN", format!("localhost:{p}")));
        }
    }
    if !spec.serve.is_empty() {
        env.push(value("TS_SERVE_CONFIG", format!("{SERVE_DIR}/{SERVE_FILE}")));
    }
    env.extend(extra);
    env
}

/// Runs as `uid` (and its group) with no privilege escalation, a read-only root, no capabilities
/// and the runtime's default seccomp profile: PodSecurity `restricted` for a non-root `uid`.
pub(super) fn locked_down(uid: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(uid != 0),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

fn security_context(mode: EffectiveMode, privileged: bool) -> SecurityContext {
    match mode {
        // Passes PodSecurity `restricted`.
        EffectiveMode::Userspace => locked_down(NON_ROOT_UID),
        // Kernel networking: root with NET_ADMIN (routes, netfilter) and NET_RAW.
        EffectiveMode::Tun => SecurityContext {
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            privileged: privileged.then_some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: None,
            }),
            ..Default::default()
        },
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn volumes(plan: &Plan<'_>) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: VOL_TMP.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    if !plan.spec.serve.is_empty() {
        volumes.push(Volume {
            name: VOL_SERVE.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: serve_config_map_name(plan.node_name),
                // The controller creates it; the pod must not wait on it to start.
                optional: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if plan.mode == EffectiveMode::Tun {
        volumes.push(Volume {
            name: VOL_TUN.into(),
            host_path: Some(HostPathVolumeSource {
                path: "/dev/net/tun".into(),
                type_: Some("CharDevice".into()),
            }),
            ..Default::default()
        });
    }
    if plan.own_token {
        volumes.push(token_volume());
    }
    volumes
}

/// The same projection the kubelet mounts for service-account tokens, for the sidecar alone.
fn token_volume() -> Volume {
    let token = VolumeProjection {
        service_account_token: Some(ServiceAccountTokenProjection {
            path: "token".into(),
            expiration_seconds: Some(3607),
            ..Default::default()
        }),
        ..Default::default()
    };
    let ca = VolumeProjection {
        config_map: Some(ConfigMapProjection {
            name: "kube-root-ca.crt".into(),
            items: Some(vec![KeyToPath {
                key: "ca.crt".into(),
                path: "ca.crt".into(),
                ..Default::default()
            }]),
            optional: None,
        }),
        ..Default::default()
    };
    let namespace = VolumeProjection {
        downward_api: Some(DownwardAPIProjection {
            items: Some(vec![DownwardAPIVolumeFile {
                path: "namespace".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    api_version: None,
                }),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    };
    Volume {
        name: VOL_TOKEN.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![token, ca, namespace]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
