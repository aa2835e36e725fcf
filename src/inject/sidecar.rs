//! Builds the `tailscale` sidecar container and the volumes it needs.

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, ConfigMapVolumeSource, Container, DownwardAPIProjection, DownwardAPIVolumeFile,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PodSpec, Probe, ProjectedVolumeSource, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ClusterFacts, EffectiveMode, InjectError, env};
use crate::api::{POD_INDEX_LABEL, SIDECAR_NAME, TailscaleNodeSpec, serve_config_map_name};

/// Env var that carries a StatefulSet pod's ordinal (from the downward API).
pub(super) const POD_INDEX_ENV: &str = "TS_POD_INDEX";
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
const NON_ROOT_UID: i64 = 1000;

/// Everything the builder needs, resolved by the engine.
pub(super) struct Plan<'a> {
    pub node_name: &'a str,
    pub spec: &'a TailscaleNodeSpec,
    pub facts: &'a ClusterFacts,
    pub mode: EffectiveMode,
    pub native: bool,
    pub hostname: String,
    pub own_token: bool,
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
    if plan.native {
        spec.init_containers.get_or_insert_with(Vec::new).insert(0, container);
    } else {
        spec.containers.push(container);
    }
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes);
    Ok(())
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
    let probe = |period, failures| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
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
        image: Some(sidecar.image.unwrap_or_else(|| plan.facts.defaults.image.clone())),
        image_pull_policy: sidecar.image_pull_policy.map(|p| p.as_str().to_string()),
        env: Some(env_vars(plan, port, sidecar.env)),
        resources: sidecar.resources,
        security_context: Some(security_context(plan.mode, sidecar.privileged)),
        volume_mounts: Some(mounts),
        restart_policy: plan.native.then(|| "Always".to_string()),
        // A native sidecar gates the app on the tunnel being up; containerboot's own boot timeout
        // (60 s) restarts it first if login never completes.
        startup_probe: plan.native.then(|| probe(1, 120)),
        readiness_probe: Some(probe(5, 3)),
        ..Default::default()
    }
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
pub(super) fn extra_args(plan: &Plan<'_>) -> Vec<String> {
    let spec = plan.spec;
    let mut args = Vec::new();
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
    env.push(value("TS_KUBE_SECRET", "ts-$(POD_NAME)"));
    env.push(value("TS_AUTH_ONCE", "true"));
    env.push(value(
        "TS_USERSPACE",
        (plan.mode == EffectiveMode::Userspace).to_string(),
    ));
    env.push(value("TS_HOSTNAME", plan.hostname.clone()));
    let args = extra_args(plan);
    if !args.is_empty() {
        env.push(value("TS_EXTRA_ARGS", args.join(" ")));
    }
    if plan.facts.defaults.no_logs_no_support {
        env.push(value("TS_TAILSCALED_EXTRA_ARGS", "--no-logs-no-support"));
    }
    if let Some(routes) = spec.routes.as_ref().filter(|r| !r.advertise.is_empty()) {
        env.push(value("TS_ROUTES", routes.advertise.join(",")));
    }
    env.push(value("TS_ACCEPT_DNS", "false"));
    env.push(value("TS_KUBERNETES_READ_API_SERVER_ADDRESS_FROM_ENV", "true"));
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

fn security_context(mode: EffectiveMode, privileged: bool) -> SecurityContext {
    match mode {
        // Passes PodSecurity `restricted`.
        EffectiveMode::Userspace => SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NON_ROOT_UID),
            run_as_group: Some(NON_ROOT_UID),
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
        },
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
