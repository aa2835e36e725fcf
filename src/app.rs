//! Wires the subcommands to the library: the only place that starts tasks, touches stdin/stdout,
//! and reads files named on the command line.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{Credentials, HeadscaleCredentials, OAuthCredentials, TailscaleNode};
use crate::args::{Args, Command, CredentialKind, DnsProxyArgs, InjectArgs, RunArgs};
use crate::controller::WatchBackoff;
use crate::controller::credentials::{CredentialCache, DefaultCredentials};
use crate::controller::election::Timings;
use crate::controller::fence::Fence;
use crate::controller::leader::{LeaseConfig, run_as_leader};
use crate::inject::{ClusterFacts, PodSecurityLevel, WorkloadKind};
use crate::metrics::Metrics;
use crate::tsapi::ResolvedCredentials;
use crate::webhook::{WebhookState, supports_native_sidecars};
use crate::{admin, certs, manifest, tls};

/// Runs the parsed command line.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Crd { reference } => {
            let text = if reference {
                crate::crd::reference_markdown()
            } else {
                crate::crd::crd_yaml().context("rendering the CRD")?
            };
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(())
        }
        Command::Inject(a) => inject(a),
        Command::DnsProxy(a) => dns_proxy(a),
        Command::Run(a) => {
            crate::telemetry::init(a.log_format);
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    info!("shutdown requested");
                    signals.cancel();
                });
                let client = Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API")?;
                run_operator(*a, client, shutdown).await
            })
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `tailnode dns-proxy`: one thread is plenty for a pod's DNS.
fn dns_proxy(a: DnsProxyArgs) -> anyhow::Result<()> {
    crate::telemetry::init(a.log_format);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        let config = crate::dnsproxy::Config {
            listen: a.listen,
            upstream: a.upstream,
            socket: a.socket,
            timeout: a.timeout,
        };
        crate::dnsproxy::serve(config, shutdown).await.context("serving DNS")
    })
}

fn read_input(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn inject(a: InjectArgs) -> anyhow::Result<()> {
    let input = read_input(&a.file)?;
    let nodes = match &a.node {
        Some(p) => Some(read_input(p)?),
        None => None,
    };
    let facts = ClusterFacts {
        native_sidecars: !a.no_native_sidecars,
        pod_security: a.pod_security.into(),
        defaults: a.defaults.to_defaults(),
        api_server_host: a.api_server_host.clone(),
        ..ClusterFacts::default()
    };
    let out = manifest::inject_manifests(&input, nodes.as_deref(), &facts)?;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

/// Builds the real key API for resolved credentials.
pub fn key_api_factory(
    metrics: Arc<Metrics>,
    id_tokens: Option<Arc<dyn crate::tsapi::IdTokenSource>>,
) -> crate::controller::credentials::ApiFactory {
    Arc::new(move |creds: &ResolvedCredentials| crate::tsapi::build(creds, Some(metrics.clone()), id_tokens.clone()))
}

fn default_credentials(a: &RunArgs) -> Option<DefaultCredentials> {
    let kind = a.default_credentials?;
    let secret_name = a.default_credentials_secret.clone();
    let credentials = match kind {
        CredentialKind::Oauth => Credentials {
            oauth: Some(OAuthCredentials {
                secret_name: Some(secret_name),
                api_url: a.default_api_url.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        CredentialKind::Headscale => Credentials {
            headscale: Some(HeadscaleCredentials {
                url: a.default_headscale_url.clone().unwrap_or_default(),
                api_key_secret_name: secret_name,
                api_key_key: None,
                user: a.default_headscale_user.clone(),
            }),
            ..Default::default()
        },
        CredentialKind::Authkey => Credentials {
            auth_key: Some(crate::api::AuthKeyCredentials { secret_name, key: None }),
            ..Default::default()
        },
    };
    Some(DefaultCredentials {
        namespace: a.namespace.clone(),
        credentials,
    })
}

/// Runs the webhook, controller and admin server until `shutdown` fires.
pub async fn run_operator(a: RunArgs, client: Client, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::install_crypto_provider();
    let timings = Timings::new(
        a.leader_elect_lease_duration,
        a.leader_elect_renew_deadline,
        a.leader_elect_retry_period,
    )
    .context("checking --leader-elect-lease-duration, --leader-elect-renew-deadline and --leader-elect-retry-period")?;
    let metrics = Arc::new(Metrics::default());
    let readiness = admin::Readiness::new();
    let mut tasks = tokio::task::JoinSet::new();
    let limits = a.limits.to_limits();

    if a.admin {
        let listener = tokio::net::TcpListener::bind(a.admin_addr)
            .await
            .with_context(|| format!("binding the admin address {}", a.admin_addr))?;
        let router = admin::router(metrics.clone(), readiness.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            tls::serve_http(listener, router, limits, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    if a.webhook {
        let ready = readiness.register("webhook");
        let resolver = webhook_certificates(&a, &client, &shutdown, &mut tasks).await?;
        let version = client
            .apiserver_version()
            .await
            .context("reading the apiserver version")?;
        let (nodes, node_writer) = reflector::store();
        let (namespaces, ns_writer) = reflector::store();
        // The webhook reads nodes' specs and namespaces' labels: the caches keep no managedFields
        // and no node status.
        let node_stream = reflector(
            node_writer,
            watcher(Api::<TailscaleNode>::all(client.clone()), Default::default()).modify(|n| {
                n.metadata.managed_fields = None;
                n.status = None;
            }),
        );
        let ns_stream = reflector(
            ns_writer,
            watcher(Api::<Namespace>::all(client.clone()), Default::default())
                .modify(|n| n.metadata.managed_fields = None),
        );
        for stream in [
            node_stream.backoff(WatchBackoff::default()).boxed().map(|_| ()).boxed(),
            ns_stream.backoff(WatchBackoff::default()).map(|_| ()).boxed(),
        ] {
            let stop = shutdown.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = stream.for_each(|_| async {}) => {}
                    _ = stop.cancelled() => {}
                }
                Ok(())
            });
        }
        let state = Arc::new(WebhookState {
            nodes: nodes.clone(),
            namespaces: namespaces.clone(),
            native_sidecars: supports_native_sidecars(&version.major, &version.minor),
            defaults: a.operator_defaults(),
            api_server_host: a.api_server_host.clone().filter(|h| !h.is_empty()),
            metrics: metrics.clone(),
            // Never opted in as a whole, whatever their labels say.
            protected_namespaces: vec!["kube-system".to_string(), a.namespace.clone()],
        });
        let listener = tokio::net::TcpListener::bind(a.webhook_addr)
            .await
            .with_context(|| format!("binding the webhook address {}", a.webhook_addr))?;
        let stop = shutdown.clone();
        tasks.spawn(async move {
            // Ready once both caches have synced: a cold cache would deny pods by mistake.
            let _ = nodes.wait_until_ready().await;
            let _ = namespaces.wait_until_ready().await;
            ready.set(true);
            info!("webhook caches ready");
            Ok(())
        });
        tasks.spawn(async move {
            tls::serve_https(listener, resolver, crate::webhook::router(state), limits, stop)
                .await
                .map_err(anyhow::Error::from)
        });
    }

    // Policy mode renders sidecars as the webhook would: native where the apiserver runs them.
    let native_sidecars = if a.controller && a.policy_injection {
        let version = client
            .apiserver_version()
            .await
            .context("reading the apiserver version")?;
        Some(supports_native_sidecars(&version.major, &version.minor))
    } else {
        None
    };
    if a.controller {
        let ready = readiness.register("controller");
        let config = crate::controller::Config {
            key_ttl: Duration::from_secs(a.key_ttl_seconds),
            slot_grace: a.slot_grace,
            policy_injection: a.policy_injection.then(|| ClusterFacts {
                native_sidecars: native_sidecars.unwrap_or(true),
                pod_security: PodSecurityLevel::default(),
                workload: WorkloadKind::Other,
                defaults: a.operator_defaults(),
                api_server_host: a.api_server_host.clone().filter(|h| !h.is_empty()),
                // Each node's own (`inject::policy::render`).
                namespace: None,
            }),
            default_credentials: default_credentials(&a),
        };
        let (client, metrics, stop) = (client.clone(), metrics.clone(), shutdown.clone());
        let lease = LeaseConfig {
            namespace: a.namespace.clone(),
            name: a.lease_name.clone(),
            identity: a.identity.clone(),
            timings,
        };
        let elect = a.leader_elect;
        let id_tokens: Arc<dyn crate::tsapi::IdTokenSource> = Arc::new(
            crate::controller::credentials::ServiceAccountTokens::new(client.clone(), &a.namespace, &a.service_account),
        );
        // Checked before writes that must not come from two replicas; without election, always current.
        let fence = if elect { Fence::lease(timings) } else { Fence::always() };
        tasks.spawn(async move {
            // Followers are ready too: they serve the webhook and wait for the lease.
            ready.set(true);
            if !elect {
                let cache = CredentialCache::new(key_api_factory(metrics.clone(), Some(id_tokens.clone())));
                crate::controller::run(client, metrics, cache, config, fence, stop.clone()).await;
                return Ok(());
            }
            // A replica that loses the lease (an apiserver outage longer than the renew deadline,
            // a pause) stops its controller and stands for election again, in-process: the
            // webhook it serves stays up and the pod is not restarted.
            while !stop.is_cancelled() {
                let (c, f, l) = (client.clone(), fence.clone(), lease.clone());
                let (client, metrics, config, fence) = (client.clone(), metrics.clone(), config.clone(), fence.clone());
                let id_tokens = id_tokens.clone();
                run_as_leader(c, l, f, stop.clone(), |lost| async move {
                    let cache = CredentialCache::new(key_api_factory(metrics.clone(), Some(id_tokens.clone())));
                    crate::controller::run(client, metrics, cache, config, fence, lost).await;
                })
                .await;
                if !stop.is_cancelled() {
                    warn!("leadership lost; controller stopped, standing for election again");
                }
            }
            Ok(())
        });
    }

    info!(
        webhook = a.webhook,
        controller = a.controller,
        admin = a.admin,
        "tailnode running"
    );
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "component failed");
                shutdown.cancel();
                result = Err(e);
            }
            Err(e) => {
                shutdown.cancel();
                result = Err(anyhow::anyhow!("task panicked: {e}"));
            }
        }
    }
    result
}

/// The webhook's certificate: hot-reloaded files, or self-managed in a Secret (rotated).
async fn webhook_certificates(
    a: &RunArgs,
    client: &Client,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<Arc<dyn rustls::server::ResolvesServerCert>> {
    if let (Some(cert), Some(key)) = (&a.tls_cert_file, &a.tls_key_file) {
        let (reloading, _task) = tls::watch_files(cert.clone(), key.clone(), Duration::from_secs(10), shutdown.clone())
            .await
            .context("loading the webhook certificate files")?;
        return Ok(reloading);
    }
    let svc = &a.webhook_service;
    let ns = &a.namespace;
    let mut dns_names = vec![
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
    ];
    dns_names.extend(a.webhook_extra_names.iter().cloned());
    let cfg = certs::SelfManagedConfig {
        namespace: ns.clone(),
        secret_name: a.webhook_secret.clone(),
        dns_names,
        webhook_config_name: Some(a.webhook_config.clone()),
        field_manager: crate::controller::reconcile::FIELD_MANAGER.to_string(),
    };
    let material = certs::ensure_self_managed(client.clone(), &cfg, chrono::Utc::now())
        .await
        .context("preparing the self-managed webhook certificate")?;
    let reloading = Arc::new(tls::ReloadingCert::from_pem(&material.cert_pem, &material.key_pem)?);
    let (c, r, stop) = (client.clone(), reloading.clone(), shutdown.clone());
    tasks.spawn(async move {
        certs::run_rotation(c, cfg, r, Duration::from_secs(3600), stop).await;
        Ok(())
    });
    Ok(reloading)
}
