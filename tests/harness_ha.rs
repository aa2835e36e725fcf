//! One leader at a time, live (issue 12, item 3). Two operator processes (the chart's two
//! replicas: the `tailnode` binary, each with its own identity) run against the harness for about
//! two minutes while the leader is, in turn, killed with SIGKILL, frozen with SIGSTOP for 20 s,
//! and partitioned from the apiserver for 20 s. Meanwhile a Deployment is scaled up and down and
//! bare pods are created every second, so the leader keeps writing (state Secrets, Roles, gates).
//!
//! The verdict comes from what reached the apiserver, not from the replicas: each replica talks
//! to the apiserver through a proxy of this test whose connections leave from an address of its
//! own (127.0.0.2, 127.0.0.3), so the apiserver's audit log (`e2e/local/up` enables it) says who
//! wrote what. The Lease writes that succeeded give who held the lease when; every other write
//! to the test's namespace must come from the holder of that moment. The webhook is reached
//! through a round-robin balancer over both replicas that, like a Service's endpoints, drops a
//! replica whose `/readyz` fails; the apiserver does not retry a refused or hung call, so some
//! admissions fail during a failover: they are counted, and every pod the Deployment asked for
//! must exist in the end. Last line:
//! `ha samples=.. dual_leader_samples=0 failover_s=.. admissions_failed_during_failover=.. deployment_pods_missing=0`
//! (`failover_s`: the longest of the three, from the fault to the other replica's Lease write).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::operator::{Operator, prepare, spawn_process, wait_ready};
use support::*;
use tailnode::api::TailscaleNode;
use tailnode::tsapi::fake::{FakeConfig, FakeTailscale};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

const LEASE: &str = "tailnode-controller";

/// A TCP proxy to the apiserver for one replica. Its upstream connections leave from `src`; a
/// partition stops forwarding and holds every connection open, as a network that drops packets
/// would, until it heals.
struct ApiProxy {
    port: u16,
    cut: watch::Sender<bool>,
}

async fn api_proxy(listen: IpAddr, upstream: SocketAddr, src: Ipv4Addr) -> ApiProxy {
    let listener = TcpListener::bind((listen, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cut, rx) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                if !*rx.borrow() {
                    let sock = TcpSocket::new_v4().unwrap();
                    sock.bind(SocketAddr::new(IpAddr::V4(src), 0)).unwrap();
                    let Ok(mut up) = sock.connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut up) => return,
                        _ = rx.wait_for(|c| *c) => {}
                    }
                }
                let _ = rx.wait_for(|c| !*c).await;
            });
        }
    });
    ApiProxy { port, cut }
}

/// The webhook's "Service": round robin over the replicas whose `/readyz` answered within half a
/// second at the last look (every 500 ms). No retry: a refused or hung connection fails the call.
async fn webhook_balancer(backends: Vec<(u16, u16)>) -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ready: Arc<Vec<AtomicBool>> = Arc::new(backends.iter().map(|_| AtomicBool::new(true)).collect());
    let probe = ready.clone();
    let admins: Vec<u16> = backends.iter().map(|b| b.1).collect();
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        loop {
            for (i, admin) in admins.iter().enumerate() {
                let ok = http
                    .get(format!("http://127.0.0.1:{admin}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                probe[i].store(ok, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let n = backends.len();
            let start = next.fetch_add(1, Ordering::Relaxed);
            let pick = (0..n)
                .map(|k| (start + k) % n)
                .find(|i| ready[*i].load(Ordering::Relaxed))
                .unwrap_or(start % n);
            let to = backends[pick].0;
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    port
}

/// One operator replica: its identity, its own source address towards the apiserver, ports.
struct Replica {
    identity: String,
    src: Ipv4Addr,
    proxy: ApiProxy,
    kubeconfig: PathBuf,
    webhook_port: u16,
    admin_port: u16,
    child: Option<Child>,
}

impl Replica {
    fn start(&mut self, h: &Harness, op: &Operator) {
        let flags = [
            format!("--identity={}", self.identity),
            format!("--webhook-addr=127.0.0.1:{}", self.webhook_port),
            format!("--admin-addr=127.0.0.1:{}", self.admin_port),
        ];
        let log = format!("ha-{}", self.identity);
        let binary = env!("CARGO_BIN_EXE_tailnode");
        self.child = Some(spawn_process(h, op, binary, &self.kubeconfig, &flags, &log));
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap().success();
        assert!(ok, "kill {sig} {pid}");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// Waits until the Lease names a holder other than `from`; returns the time since `since`.
async fn failover(leases: &Api<Lease>, from: &str, since: Instant) -> Duration {
    let moved = eventually(Duration::from_secs(60), || async {
        holder(leases).await.filter(|h| h != from).map(|_| ())
    })
    .await;
    assert!(moved.is_some(), "the lease never moved away from {from}");
    since.elapsed()
}

fn stamp(e: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(e["stageTimestamp"].as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Reads an audit log: (writes checked, writes by a replica that did not hold the lease then).
fn judge(
    text: &str,
    replicas: &[(String, Ipv4Addr)],
    lease_ns: &str,
    ns: &str,
    since: DateTime<Utc>,
) -> (usize, Vec<String>) {
    let who = |e: &Value| -> Option<String> {
        let ip = e["sourceIPs"][0].as_str()?;
        replicas
            .iter()
            .find(|(_, src)| src.to_string() == ip)
            .map(|(id, _)| id.clone())
    };
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete" && stamp(e).is_some_and(|t| t >= since))
        .filter(|e| e["responseStatus"]["code"].as_i64().is_some_and(|c| c < 300))
        .collect();
    // Who held the lease from when: every successful write of it, with the holder it wrote.
    let mut holders: Vec<(DateTime<Utc>, String)> = events
        .iter()
        .filter(|e| {
            e["objectRef"]["resource"] == "leases"
                && e["objectRef"]["namespace"] == lease_ns
                && e["objectRef"]["name"] == LEASE
        })
        .filter_map(|e| {
            let h = e["requestObject"]["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or_default();
            Some((stamp(e)?, h.to_string()))
        })
        .collect();
    holders.sort();
    let managed = [
        "secrets",
        "configmaps",
        "pods",
        "roles",
        "rolebindings",
        "tailscalenodes",
    ];
    let mut checked = 0;
    let mut dual = Vec::new();
    for e in &events {
        let r = &e["objectRef"];
        if r["namespace"] != ns || !managed.iter().any(|m| r["resource"] == *m) {
            continue;
        }
        let (Some(writer), Some(t)) = (who(e), stamp(e)) else {
            continue;
        };
        checked += 1;
        let held = holders.iter().rev().find(|(at, _)| *at <= t).map(|(_, h)| h.as_str());
        if held != Some(writer.as_str()) {
            dual.push(format!(
                "{t} {writer} {} {}/{} while the lease was {held:?}",
                e["verb"], r["resource"], r["name"]
            ));
        }
    }
    (checked, dual)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_at_a_time_through_kill_freeze_and_partition() {
    let h = harness();
    let client = h.client().await;
    install_crd(&client).await;
    let op = prepare(h).await;
    let ns = TestNamespace::new(&client, "ha", json!({op.selector.0.clone(): op.selector.1.clone()})).await;
    let fake = FakeTailscale::start(FakeConfig {
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        client_tags: vec!["tag:k8s".into()],
    })
    .await;
    ns.create::<Secret>(json!({"metadata": {"name": "oauth"},
        "stringData": {"client_id": "cid", "client_secret": "csecret"}}))
        .await;
    ns.create::<TailscaleNode>(json!({"apiVersion": "tailnode.dev/v1alpha1", "kind": "TailscaleNode",
        "metadata": {"name": "web"}, "spec": {"tags": ["tag:k8s"],
            "credentials": {"oauth": {"secretName": "oauth", "apiURL": fake.url()}}}}))
        .await;

    // Each replica reaches the apiserver through its own proxy, from its own address.
    let kubeconfig = std::fs::read_to_string(&h.kubeconfig).unwrap();
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("the harness kubeconfig names its server")
        .to_string();
    let upstream: SocketAddr = server.parse().expect("server address");
    let mut replicas = Vec::new();
    for (i, name) in ["replica-a", "replica-b"].iter().enumerate() {
        let src = Ipv4Addr::new(127, 0, 0, 2 + i as u8);
        let proxy = api_proxy(upstream.ip(), upstream, src).await;
        let path = h.dir.join(format!("ha-{name}.kubeconfig"));
        let own = kubeconfig.replace(&server, &format!("{}:{}", upstream.ip(), proxy.port));
        std::fs::write(&path, own).unwrap();
        replicas.push(Replica {
            identity: name.to_string(),
            src,
            proxy,
            kubeconfig: path,
            webhook_port: free_port(),
            admin_port: free_port(),
            child: None,
        });
    }
    let lb = webhook_balancer(replicas.iter().map(|r| (r.webhook_port, r.admin_port)).collect()).await;
    let hooks = Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(client.clone());
    let url = json!([{"op": "replace", "path": "/webhooks/0/clientConfig/url",
        "value": format!("https://127.0.0.1:{lb}/mutate")}]);
    hooks
        .patch(
            &op.webhook_config,
            &PatchParams::default(),
            &Patch::<()>::Json(serde_json::from_value(url).unwrap()),
        )
        .await
        .unwrap();
    let since = Utc::now();
    for r in &mut replicas {
        r.start(h, &op);
        let mut me = op.clone();
        me.admin_url = format!("http://127.0.0.1:{}", r.admin_port);
        wait_ready(h, &me).await;
    }
    let leases = Api::<Lease>::namespaced(client.clone(), &op.namespace);
    let first = eventually(Duration::from_secs(30), || holder(&leases)).await;
    assert!(first.is_some(), "neither replica took the lease");

    // Load: a Deployment scaled up and down, and a bare pod a second (each deleted 5 s later).
    ns.create::<Deployment>(json!({"metadata": {"name": "web"}, "spec": {"replicas": 3,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web", "tailnode.dev/node": "web"}},
            "spec": {"nodeSelector": {"tailnode-e2e/never": "true"}, "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "app", "image": "localhost/busybox:e2e"}]}}}}))
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, failed, created) = (stop.clone(), failed.clone(), created.clone());
        let pods = ns.api::<Pod>();
        let deploys = ns.api::<Deployment>();
        tokio::spawn(async move {
            let mut n = 0usize;
            let sizes = [3, 6, 2, 5, 4];
            while !stop.load(Ordering::Relaxed) && n < 600 {
                let pod: Pod = serde_json::from_value(json!({"metadata": {"name": format!("p-{n}"),
                    "labels": {"tailnode.dev/node": "web"}}, "spec": {"nodeSelector": {"tailnode-e2e/never": "true"},
                    "terminationGracePeriodSeconds": 0, "containers": [{"name": "app", "image": "localhost/busybox:e2e"}]}}))
                .unwrap();
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => created.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                if n >= 5 {
                    let _ = pods.delete(&format!("p-{}", n - 5), &DeleteParams::default()).await;
                }
                if n.is_multiple_of(5) {
                    let scale = json!({"spec": {"replicas": sizes[(n / 5) % sizes.len()]}});
                    let _ = deploys
                        .patch("web", &PatchParams::default(), &Patch::Merge(&scale))
                        .await;
                }
                n += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // The faults, each on whoever leads at that moment.
    let names: Vec<String> = replicas.iter().map(|r| r.identity.clone()).collect();
    let index = |id: &str| names.iter().position(|n| n == id).unwrap();
    let mut failovers = Vec::new();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let leader = index(&holder(&leases).await.unwrap());
    let t = Instant::now();
    replicas[leader].kill();
    let took = failover(&leases, &replicas[leader].identity.clone(), t).await;
    failovers.push(("kill", took));
    replicas[leader].start(h, &op);

    tokio::time::sleep(Duration::from_secs(10)).await;
    let leader = index(&holder(&leases).await.unwrap());
    let t = Instant::now();
    replicas[leader].signal("-STOP");
    let took = failover(&leases, &replicas[leader].identity.clone(), t).await;
    failovers.push(("freeze", took));
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(t.elapsed())).await;
    replicas[leader].signal("-CONT");

    tokio::time::sleep(Duration::from_secs(10)).await;
    let leader = index(&holder(&leases).await.unwrap());
    let t = Instant::now();
    replicas[leader].proxy.cut.send_replace(true);
    let took = failover(&leases, &replicas[leader].identity.clone(), t).await;
    failovers.push(("partition", took));
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(t.elapsed())).await;
    replicas[leader].proxy.cut.send_replace(false);
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    // Every pod the Deployment asks for exists.
    let deploys = ns.api::<Deployment>();
    let pods = ns.api::<Pod>();
    let missing = |want: i32, have: usize| (want as usize).saturating_sub(have);
    let settled = eventually(Duration::from_secs(60), || async {
        let want = deploys.get("web").await.ok()?.spec.replicas?;
        let have = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count();
        (missing(want, have) == 0).then_some(())
    })
    .await;
    let want = deploys.get("web").await.unwrap().spec.replicas.unwrap();
    let have = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .len();
    let deployment_missing = if settled.is_some() { 0 } else { missing(want, have) };

    // Clean up while both replicas run (the node's finalizer needs a leader), then judge.
    let gone = ns.delete_node("web").await;
    for r in &mut replicas {
        r.kill();
    }
    let ids: Vec<(String, Ipv4Addr)> = replicas.iter().map(|r| (r.identity.clone(), r.src)).collect();
    // The apiserver's audit log, with its rotated backup (audit-<time>.log) should it have rotated.
    let mut audit = String::new();
    for entry in std::fs::read_dir(h.dir.join("logs")).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("audit") {
            audit.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            audit.push('\n');
        }
    }
    assert!(!audit.trim().is_empty(), "the apiserver wrote no audit log");
    let (samples, dual) = judge(&audit, &ids, &op.namespace, &ns.name, since);
    for (kind, took) in &failovers {
        println!(
            "ha {kind}: the other replica held the lease {:.1}s after the fault",
            took.as_secs_f64()
        );
    }
    let worst = failovers.iter().map(|(_, t)| t.as_secs_f64()).fold(0.0, f64::max);
    println!(
        "pods created {} (refused {}), Deployment wants {want}",
        created.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    println!(
        "ha samples={samples} dual_leader_samples={} failover_s={worst:.1} admissions_failed_during_failover={} deployment_pods_missing={deployment_missing}",
        dual.len(),
        failed.load(Ordering::Relaxed)
    );
    assert!(
        dual.is_empty(),
        "writes from a replica that did not hold the lease:\n{}",
        dual.join("\n")
    );
    assert!(
        samples > 0,
        "no write by either replica reached the audit log: nothing was judged"
    );
    assert_eq!(deployment_missing, 0, "pods the Deployment asked for are missing");
    assert!(gone, "the TailscaleNode was not cleaned up");
    ns.cleanup().await;
}

/// The judge itself, on a made-up audit log: a write by the holder passes, a write by the
/// replica that lost the lease (even moments after) is caught, failed writes and other
/// namespaces do not count.
#[test]
fn the_audit_judge_catches_a_write_from_a_former_leader() {
    let at = |s: u32| format!("2026-11-29T10:00:{s:02}.000000Z");
    let lease = |s: u32, ip: &str, holder: &str| {
        json!({"stage": "ResponseComplete", "stageTimestamp": at(s), "sourceIPs": [ip], "verb": "update",
            "responseStatus": {"code": 200}, "requestObject": {"spec": {"holderIdentity": holder}},
            "objectRef": {"resource": "leases", "namespace": "op", "name": LEASE}})
    };
    let write = |s: u32, ip: &str, ns: &str, code: i64| {
        json!({"stage": "ResponseComplete", "stageTimestamp": at(s), "sourceIPs": [ip], "verb": "patch",
            "responseStatus": {"code": code}, "objectRef": {"resource": "secrets", "namespace": ns, "name": "ts-x"}})
    };
    let (a, b) = ("127.0.0.2", "127.0.0.3");
    let log = [
        lease(1, a, "replica-a"),
        write(2, a, "app", 200),
        lease(3, a, "replica-a"),
        lease(20, b, "replica-b"),
        write(21, b, "app", 201),
        write(22, a, "app", 200),
        write(23, a, "app", 409),
        write(24, a, "elsewhere", 200),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let ids = [
        ("replica-a".to_string(), Ipv4Addr::new(127, 0, 0, 2)),
        ("replica-b".to_string(), Ipv4Addr::new(127, 0, 0, 3)),
    ];
    let since = DateTime::parse_from_rfc3339(&at(0)).unwrap().with_timezone(&Utc);
    let (checked, dual) = judge(&log, &ids, "op", "app", since);
    assert_eq!(checked, 3);
    assert_eq!(dual.len(), 1, "{dual:?}");
    assert!(
        dual[0].contains("replica-a") && dual[0].contains("replica-b"),
        "{dual:?}"
    );
}
