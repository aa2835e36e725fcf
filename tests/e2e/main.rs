//! The end-to-end scenarios, for every cluster: real pods on a real kubelet, the operator
//! installed with the chart, Headscale as the control server. Runs against the local real node
//! (`e2e/local/up`, started or reused) or, with `TAILNODE_E2E_EXTERNAL=1`, against whatever
//! KUBECONFIG names with images and Headscale from `TAILNODE_E2E_*` (`e2e/kind/run.sh`).
//!
//!   cargo test --features harness --test e2e [-- FILTER...]
//!
//! A custom harness (`harness = false`): the chart is installed once, the scenarios run
//! concurrently, and the release is removed at the end, before other test binaries run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

#[path = "../support/mod.rs"]
mod support;

mod blast;
mod cluster;
mod dns;
mod faults;
mod node;
mod outage;
mod policy;
mod policy_cases;
mod prefs;
mod reset;
mod routes;
mod slots;
mod tailnet;
mod upgrade;
mod workloads;

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use futures::FutureExt;

type Scenario = fn(cluster::Cluster) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// Every scenario, by name.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("userspace_pods_join_isolate_carry_traffic_and_restart", |c| {
        Box::pin(tailnet::userspace_pods(c))
    }),
    ("deleted_pods_leave_the_tailnet_statefulset_pods_stay", |c| {
        Box::pin(tailnet::deleted_pods(c))
    }),
    ("tun_mode_pod_gets_tailscale0", |c| Box::pin(node::tun_mode(c))),
    ("serve_tcp_forward_carries_traffic", |c| Box::pin(node::serve(c))),
    ("restricted_namespace_runs_the_sidecar_read_only", |c| {
        Box::pin(node::restricted_namespace(c))
    }),
    ("job_with_native_sidecar_completes", |c| {
        Box::pin(node::job_completes(c))
    }),
    ("namespace_label_opts_in_every_pod_but_opted_out_ones", |c| {
        Box::pin(node::namespace_opt_in(c))
    }),
    ("isolated_credentials_leave_the_app_without_a_token", |c| {
        Box::pin(node::isolated_credentials(c))
    }),
    ("spec_change_reaches_a_restarted_statefulset_replica", |c| {
        Box::pin(prefs::spec_change_reaches_a_stateful_replica(c))
    }),
    ("reset_on_demand_gives_a_replica_a_new_device", |c| {
        Box::pin(reset::reset_gives_a_new_device(c))
    }),
    ("policy_mode_stores_the_same_pods_as_the_webhook", |c| {
        Box::pin(policy::policy_matches_webhook(c))
    }),
    (
        "slots_keep_a_deployment_s_devices_across_replacements_and_rollouts",
        |c| Box::pin(slots::slots_keep_a_deployment_s_devices(c)),
    ),
];

/// Scenarios that run one at a time after the others (they disturb the shared operator).
const ALONE: &[(&str, Scenario)] = &[
    ("policy_mode_alone_injects_with_no_webhook_and_pods_join", |c| {
        Box::pin(policy::policy_mode_alone(c))
    }),
    ("controller_outage_keeps_pods_gated_until_it_returns", |c| {
        Box::pin(outage::controller_outage(c))
    }),
    ("helm_upgrade_and_uninstall_keep_replicas_on_the_tailnet", |c| {
        Box::pin(upgrade::upgrade_and_uninstall(c))
    }),
    ("operator_down_refuses_only_opted_in_pods", |c| {
        Box::pin(blast::operator_down(c))
    }),
    ("no_auth_key_in_debug_logs_events_or_status", |c| {
        Box::pin(blast::no_key_leaks(c))
    }),
];

/// Only on the local harness (they wire network namespaces of their own into pods), with the others.
const LOCAL: &[(&str, Scenario)] = &[
    ("subnet_routes_both_ways", |c| {
        Box::pin(routes::subnet_routes_both_ways(c))
    }),
    ("exit_node_keeps_the_cluster_reachable", |c| {
        Box::pin(routes::exit_node_keeps_the_cluster_reachable(c))
    }),
    ("magicdns_resolves_tailnet_and_cluster_names_in_app_containers", |c| {
        Box::pin(dns::magicdns_in_app_containers(c))
    }),
];

/// Alone too, and only on the local harness: they restart its processes.
const LOCAL_ALONE: &[(&str, Scenario)] = &[("apiserver_and_headscale_restarts_need_no_operator_restart", |c| {
    Box::pin(faults::control_plane_faults(c))
})];

fn main() {
    // cargo passes libtest flags (e.g. --test-threads); anything not starting with '-' filters.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    // The local-harness-only scenarios are not listed at all on another cluster.
    let local = std::env::var("TAILNODE_E2E_EXTERNAL").map_or(true, |v| v != "1");
    let chosen: Vec<&(&str, Scenario)> = SCENARIOS
        .iter()
        .chain(LOCAL.iter().filter(|_| local))
        .filter(|(name, _)| wanted(name))
        .collect();
    let local_alone = LOCAL_ALONE.iter().filter(|_| local);
    let alone: Vec<&(&str, Scenario)> = ALONE
        .iter()
        .chain(local_alone)
        .filter(|(name, _)| wanted(name))
        .collect();
    println!("\nrunning {} tests", chosen.len() + alone.len());
    if chosen.is_empty() && alone.is_empty() {
        println!("\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let failed = rt.block_on(async {
        tailnode::install_crypto_provider();
        let c = cluster::Cluster::from_env();
        let t0 = Instant::now();
        workloads::install_operator(&c).await;
        println!(
            "operator installed with the chart in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        let runs = chosen.iter().map(|(name, f)| {
            let c = c.clone();
            async move {
                let t = Instant::now();
                // Each scenario on a task of its own, so a panic fails that scenario only.
                let result = tokio::spawn(f(c)).map(|r| r.map_err(|e| e.to_string())).await;
                (*name, result, t.elapsed())
            }
        });
        let mut results = futures::future::join_all(runs).await;
        // Alone, after the others: these stop parts of the one installed operator for a while.
        for (name, f) in &alone {
            let t = Instant::now();
            let result = tokio::spawn(f(c.clone())).map(|r| r.map_err(|e| e.to_string())).await;
            results.push((*name, result, t.elapsed()));
        }
        let mut failed = Vec::new();
        for (name, result, took) in results {
            match result {
                Ok(()) => println!("test {name} ... ok ({:.1}s)", took.as_secs_f64()),
                Err(e) => {
                    println!("test {name} ... FAILED ({:.1}s)\n{e}", took.as_secs_f64());
                    failed.push(name);
                }
            }
        }
        if !cluster::keep() {
            workloads::uninstall_operator(&c).await;
        }
        failed
    });
    let passed = chosen.len() + alone.len() - failed.len();
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; 0 ignored; 0 measured; 0 filtered out\n",
        failed.len()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}
