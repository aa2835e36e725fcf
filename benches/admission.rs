//! Admission latency and throughput of the webhook over HTTPS, against a no-op responder on the
//! same stack.
//!
//! `cargo bench --bench admission -- [--rate R] [--requests N] [--search-seconds S]`
//! (defaults: 2000/s, 10000 requests (at most 100,000), 2 s per search step).
//!
//! Two servers run on one single-threaded runtime under `tailnode::tls::serve_https` (rustls, h2
//! by ALPN, default `ServerLimits`): the real webhook router, and a no-op router whose handler
//! reads only `request.uid` and answers "allowed". One reqwest client (HTTP/2 only, one
//! kept-alive connection per server, multiplexed as the apiserver does) sends a fixed realistic
//! Pod CREATE ([`fixture::Review`]) open-loop at a fixed rate: each request is spawned when due and
//! timed from then to its full body. With 2+ CPUs the server thread is pinned to CPU 1 and the
//! client thread to CPU 0. Each run also reports the CPU time per request of both threads (from
//! `/proc`), which other load on the machine inflates less than latency.
//!
//! 1. `N` requests at `R`/s to each server: percentiles.
//! 2. For each server, the highest offered rate whose step (≤ S seconds, ≤ 50,000 requests) is
//!    sent on time with every answer right and p99 < 5 ms: doubling from 500/s (≤ 9 rates), then
//!    bisecting (≤ 5 rates); a rate that fails is tried once more; at most 60 s per server.
//!
//! A wrong answer (not allowed, no JSONPatch, another uid) or a failed request in part 1 fails the
//! run. Everything talks to loopback only; every run is bounded in requests and time. The last
//! line is `admission rate=R n=N p50_ms=.. p99_ms=.. max_rps=.. noop_p99_ms=.. noop_max_rps=..
//! ratio=..` with `ratio = max_rps / noop_max_rps`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark code: a panic is a failed run

#[path = "admission/fixture.rs"]
mod fixture;
#[path = "admission/servers.rs"]
mod servers;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use tailnode::tls::ReloadingCert;
use tailnode::webhook::MUTATE_PATH;
use tokio_util::sync::CancellationToken;

use fixture::Review;
use servers::{Servers, cpu_time, this_task};

const DEFAULT_RATE: u64 = 2000;
const DEFAULT_REQUESTS: usize = 10_000;
const MAX_REQUESTS: usize = 100_000;
const DEFAULT_SEARCH_SECONDS: f64 = 2.0;
/// Sending stops after this, whatever is left of a run.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// A step with more requests in flight than this is overloaded and stops sending.
const MAX_IN_FLIGHT: usize = 4096;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const SEARCH_P99: Duration = Duration::from_millis(5);
const SEARCH_START: u64 = 500;
const SEARCH_DOUBLINGS: usize = 9;
const SEARCH_BISECTIONS: usize = 5;
const SEARCH_STEP_REQUESTS: usize = 50_000;
/// Time for one server's search; it stops with the best rate so far when over.
const SEARCH_BUDGET: Duration = Duration::from_secs(60);
/// Tries of a rate before it counts as failed.
const SEARCH_TRIES: usize = 2;
/// A step must be sent at no less than this share of its offered rate.
const ON_TIME: f64 = 0.95;

struct Args {
    rate: u64,
    requests: usize,
    search_seconds: f64,
    search_budget: Duration,
}

fn parse_args() -> Args {
    let usage = "usage: cargo bench --bench admission -- [--rate R] [--requests N] [--search-seconds S]";
    let all: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench. Without it, `cargo test --all-targets` runs this binary as a
    // test (with libtest flags such as --test-threads=4): a short smoke run of the same code.
    let as_test = !all.iter().any(|a| a == "--bench");
    let mut args = if as_test {
        Args {
            rate: 100,
            requests: 200,
            search_seconds: 0.5,
            search_budget: Duration::from_secs(5),
        }
    } else {
        Args {
            rate: DEFAULT_RATE,
            requests: DEFAULT_REQUESTS,
            search_seconds: DEFAULT_SEARCH_SECONDS,
            search_budget: SEARCH_BUDGET,
        }
    };
    let mut it = all.into_iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value; {usage}"));
        match arg.as_str() {
            "--rate" => args.rate = value().parse().expect("--rate: a whole number per second"),
            "--requests" => args.requests = value().parse().expect("--requests: a whole number"),
            "--search-seconds" => args.search_seconds = value().parse().expect("--search-seconds: seconds"),
            "--bench" => {}                                  // cargo bench passes it
            other if as_test && other.starts_with('-') => {} // libtest's flags
            other => panic!("unknown argument {other}; {usage}"),
        }
    }
    assert!(args.rate > 0, "--rate must be positive");
    assert!(
        args.search_seconds > 0.0 && args.search_seconds <= 10.0,
        "--search-seconds: (0, 10]"
    );
    args.requests = args.requests.clamp(1, MAX_REQUESTS);
    args
}

/// A server under test.
struct Target {
    name: &'static str,
    url: String,
    /// The answer must carry a JSONPatch.
    patched: bool,
}

/// PURE: whether `answer` allows request `uid` (and carries a JSONPatch when `patched`).
fn check(answer: &str, uid: &str, patched: bool) -> Result<(), String> {
    let has = |s: &str| answer.contains(s);
    if !has(&format!("\"uid\":\"{uid}\"")) || !has("\"allowed\":true") {
        return Err(format!("not an allowed answer for uid {uid}: {answer:.300}"));
    }
    if patched && !(has("\"patchType\":\"JSONPatch\"") && has("\"patch\":[")) {
        return Err(format!("no JSONPatch for uid {uid}: {answer:.300}"));
    }
    Ok(())
}

enum Outcome {
    Done(Duration),
    Failed(String),
}

async fn one(client: reqwest::Client, url: String, body: Bytes, uid: String, patched: bool) -> Outcome {
    let started = Instant::now();
    let response = match client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("sending: {e}")),
    };
    let status = response.status();
    let version = response.version();
    let answer = match response.bytes().await {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(format!("reading the answer: {e}")),
    };
    let elapsed = started.elapsed();
    assert_eq!(version, reqwest::Version::HTTP_2, "the client talks HTTP/2");
    assert!(
        status.is_success(),
        "status {status}: {:.300}",
        String::from_utf8_lossy(&answer)
    );
    if let Err(wrong) = check(&String::from_utf8_lossy(&answer), &uid, patched) {
        panic!("wrong answer: {wrong}");
    }
    Outcome::Done(elapsed)
}

/// What one run at a fixed rate saw.
struct Run {
    offered: u64,
    planned: usize,
    /// Latencies of the answered requests, sorted.
    latencies: Vec<Duration>,
    failed: usize,
    first_failure: Option<String>,
    /// Rate the requests were actually sent at.
    sent_rps: f64,
    overloaded: bool,
    /// CPU time per request of the server thread and of the client thread.
    server_cpu: Duration,
    client_cpu: Duration,
}

impl Run {
    fn sent(&self) -> usize {
        self.latencies.len() + self.failed
    }

    fn p(&self, q: f64) -> Duration {
        percentile(&self.latencies, q)
    }

    /// Sent in full and on time, nothing failed, p99 under `p99`.
    fn sustained(&self, p99: Duration) -> bool {
        !self.overloaded
            && self.failed == 0
            && self.sent() == self.planned
            && self.sent_rps >= self.offered as f64 * ON_TIME
            && self.p(0.99) < p99
    }

    fn line(&self) -> String {
        format!(
            "offered {}/s sent {:.0}/s n={} failed={}{}: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms; CPU/request: server {:.0} us, client {:.0} us",
            self.offered,
            self.sent_rps,
            self.sent(),
            self.failed,
            if self.overloaded { " OVERLOADED" } else { "" },
            ms(self.p(0.50)),
            ms(self.p(0.90)),
            ms(self.p(0.99)),
            ms(self.p(1.0)),
            self.server_cpu.as_secs_f64() * 1e6,
            self.client_cpu.as_secs_f64() * 1e6,
        )
    }
}

/// PURE: nearest-rank percentile of sorted latencies (zero when empty).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sends `count` requests to `target` at `rate`/s, open-loop: request k is spawned at k/rate
/// (the timer has millisecond resolution, so requests due within one millisecond leave together).
async fn run(bench: &Bench, target: &Target, rate: u64, count: usize, first: u64) -> Run {
    let (client, review) = (&bench.client, &bench.review);
    let cpu_before = (cpu_time(&bench.server_task), cpu_time(&bench.client_task));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(count);
    let mut overloaded = false;
    let start = Instant::now();
    let mut last_sent = start;
    'sending: while tasks.len() < count {
        let elapsed = start.elapsed();
        if elapsed > RUN_DEADLINE {
            break;
        }
        let due = ((elapsed.as_secs_f64() * rate as f64) as usize + 1).min(count);
        while tasks.len() < due {
            if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                overloaded = true;
                break 'sending;
            }
            let i = first + tasks.len() as u64;
            let (client, url, in_flight) = (client.clone(), target.url.clone(), in_flight.clone());
            let (body, uid, patched) = (review.body(i), Review::uid(i), target.patched);
            in_flight.fetch_add(1, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                let outcome = one(client, url, body, uid, patched).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                outcome
            }));
        }
        last_sent = Instant::now();
        if tasks.len() < count {
            tokio::time::sleep_until((start + Duration::from_secs_f64(tasks.len() as f64 / rate as f64)).into()).await;
        }
    }
    let span = (last_sent - start).as_secs_f64();
    let sent_rps = if tasks.len() > 1 && span > 0.0 {
        (tasks.len() - 1) as f64 / span
    } else {
        rate as f64
    };
    let mut latencies = Vec::with_capacity(tasks.len());
    let (mut failed, mut first_failure) = (0, None);
    for task in tasks {
        match task.await.expect("a request task panicked (wrong answer)") {
            Outcome::Done(latency) => latencies.push(latency),
            Outcome::Failed(why) => {
                failed += 1;
                first_failure.get_or_insert(why);
            }
        }
    }
    latencies.sort_unstable();
    let per_request = |before: Duration, after: Duration| {
        after.saturating_sub(before) / u32::try_from(latencies.len().max(1)).unwrap_or(u32::MAX)
    };
    let server_cpu = per_request(cpu_before.0, cpu_time(&bench.server_task));
    let client_cpu = per_request(cpu_before.1, cpu_time(&bench.client_task));
    Run {
        offered: rate,
        planned: count,
        latencies,
        failed,
        first_failure,
        sent_rps,
        overloaded,
        server_cpu,
        client_cpu,
    }
}

/// The highest offered rate `target` sustains with p99 under [`SEARCH_P99`].
async fn search(bench: &Bench, target: &Target, seconds: f64, budget: Duration, first: &mut u64) -> u64 {
    let mut step = 0;
    // A rate passes when one of two tries does: another process on the CPUs can spoil one.
    let mut try_rate = async |rate: u64| {
        for attempt in 1..=SEARCH_TRIES {
            step += 1;
            let count = ((rate as f64 * seconds) as usize).clamp(1, SEARCH_STEP_REQUESTS);
            let result = run(bench, target, rate, count, *first).await;
            *first += count as u64;
            let pass = result.sustained(SEARCH_P99);
            println!(
                "search {:<4} step {step:>2}: {} -> {}",
                target.name,
                result.line(),
                match (pass, attempt) {
                    (true, _) => "pass",
                    (false, SEARCH_TRIES) => "FAIL",
                    (false, _) => "fail, trying again",
                }
            );
            if let Some(why) = result.first_failure {
                println!("  first failure: {why}");
            }
            if pass {
                return true;
            }
        }
        false
    };
    let deadline = Instant::now() + budget;
    let spent = || {
        let spent = Instant::now() > deadline;
        if spent {
            println!("search {:<4}: time budget spent, stopping", target.name);
        }
        spent
    };
    let (mut lo, mut hi) = (0, None);
    let mut rate = SEARCH_START;
    for _ in 0..SEARCH_DOUBLINGS {
        if spent() {
            break;
        }
        if try_rate(rate).await {
            lo = rate;
            rate *= 2;
        } else {
            hi = Some(rate);
            break;
        }
    }
    if let Some(mut hi) = hi {
        for _ in 0..SEARCH_BISECTIONS {
            // Stop within 5% of the boundary.
            if hi - lo <= hi / 20 || spent() {
                break;
            }
            let mid = lo + (hi - lo) / 2;
            if try_rate(mid).await { lo = mid } else { hi = mid }
        }
    }
    lo
}

/// What every run uses.
struct Bench {
    client: reqwest::Client,
    review: Review,
    /// `/proc` entries of the server and client threads, for their CPU time.
    server_task: PathBuf,
    client_task: PathBuf,
}

async fn bench(args: Args, ca_pem: String, servers: &Servers) {
    let review = Review::new();
    println!(
        "request: Pod {} bytes (3 containers + 1 init, env, probes, resources, 4 volumes, ownerReferences, managedFields), AdmissionReview {} bytes",
        review.pod_bytes,
        review.review_bytes()
    );
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
        .no_proxy()
        .http2_prior_knowledge()
        .pool_max_idle_per_host(4)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client");
    println!("client: reqwest, HTTP/2 only (ALPN h2), TLS 1.3 (rustls), one kept-alive connection per server");
    let bench = Bench {
        client,
        review,
        server_task: servers.task.clone(),
        client_task: this_task(),
    };
    let targets = [
        Target {
            name: "real",
            url: format!("https://{}{MUTATE_PATH}", servers.real),
            patched: true,
        },
        Target {
            name: "noop",
            url: format!("https://{}{MUTATE_PATH}", servers.noop),
            patched: false,
        },
    ];
    let mut first = 0;
    // Warm up: the TLS handshake, the h2 connection, the allocator.
    for target in &targets {
        let warm = run(&bench, target, 1000, 500, first).await;
        first += 500;
        assert_eq!(warm.failed, 0, "warm-up failed: {:?}", warm.first_failure);
    }
    let mut fixed = Vec::new();
    for target in &targets {
        let result = run(&bench, target, args.rate, args.requests, first).await;
        first += args.requests as u64;
        println!("fixed  {:<4}: {}", target.name, result.line());
        assert_eq!(result.failed, 0, "{} failed: {:?}", target.name, result.first_failure);
        assert_eq!(result.sent(), args.requests, "{} ran out of time", target.name);
        fixed.push(result);
    }
    let mut max = Vec::new();
    for target in &targets {
        let best = search(&bench, target, args.search_seconds, args.search_budget, &mut first).await;
        println!(
            "search {:<4}: max {best}/s with p99 < {} ms",
            target.name,
            ms(SEARCH_P99)
        );
        max.push(best);
    }
    let ratio = if max[1] > 0 { max[0] as f64 / max[1] as f64 } else { 0.0 };
    println!(
        "admission rate={} n={} p50_ms={:.3} p99_ms={:.3} max_rps={} noop_p99_ms={:.3} noop_max_rps={} ratio={:.3}",
        args.rate,
        fixed[0].sent(),
        ms(fixed[0].p(0.50)),
        ms(fixed[0].p(0.99)),
        max[0],
        ms(fixed[1].p(0.99)),
        max[1],
        ratio,
    );
}

fn main() {
    tailnode::install_crypto_provider();
    let args = parse_args();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (client_core, server_core) = match cores.as_slice() {
        [client, server, ..] => (Some(*client), Some(*server)),
        _ => (None, None),
    };
    match (client_core, server_core) {
        (Some(c), Some(s)) => println!(
            "pinning: client on CPU {}, server on CPU {} (one thread each)",
            c.id, s.id
        ),
        _ => println!("pinning: skipped, {} CPU(s) available", cores.len()),
    }
    let now = chrono::Utc::now();
    let ca = tailnode::certs::generate_ca(now).expect("CA");
    let serving = tailnode::certs::issue_serving(&ca, &["127.0.0.1".to_string()], now).expect("serving cert");
    let resolver = Arc::new(ReloadingCert::from_pem(&serving.cert_pem, &serving.key_pem).expect("resolver"));
    let shutdown = CancellationToken::new();
    let servers = servers::start(resolver, server_core, shutdown.clone());
    if let Some(core) = client_core {
        assert!(core_affinity::set_for_current(core), "pinning the client thread");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    runtime.block_on(bench(args, ca.cert_pem.clone(), &servers));
    // Closes the client's connections, so the servers need not wait out their shutdown grace.
    drop(runtime);
    shutdown.cancel();
    servers.thread.join().expect("server thread");
}
