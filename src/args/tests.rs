use clap::Parser;

use super::*;

fn run_args(extra: &[&str]) -> RunArgs {
    let mut argv = vec!["tailnode", "run"];
    argv.extend_from_slice(extra);
    match Args::parse_from(argv).command {
        Command::Run(r) => *r,
        _ => unreachable!(),
    }
}

#[test]
fn default_headscale_url_is_the_login_server() {
    let a = run_args(&[
        "--default-credentials=headscale",
        "--default-headscale-url=http://hs.local:8080",
    ]);
    assert_eq!(
        a.operator_defaults().control_url.as_deref(),
        Some("http://hs.local:8080")
    );
    let explicit = run_args(&[
        "--default-credentials=headscale",
        "--default-headscale-url=http://hs.local:8080",
        "--control-url=https://login.example",
    ]);
    assert_eq!(
        explicit.operator_defaults().control_url.as_deref(),
        Some("https://login.example")
    );
    assert_eq!(run_args(&[]).operator_defaults().control_url, None);
    assert!(run_args(&[]).operator_defaults().no_logs_no_support);
}

#[test]
fn leader_election_timings() {
    let a = run_args(&[]);
    assert_eq!(a.leader_elect_lease_duration, Duration::from_secs(10));
    assert_eq!(a.leader_elect_renew_deadline, Duration::from_secs(7));
    assert_eq!(a.leader_elect_retry_period, Duration::from_secs(2));
    let a = run_args(&[
        "--leader-elect-lease-duration=1m",
        "--leader-elect-renew-deadline=45s",
        "--leader-elect-retry-period=500ms",
    ]);
    assert_eq!(a.leader_elect_lease_duration, Duration::from_secs(60));
    assert_eq!(a.leader_elect_renew_deadline, Duration::from_secs(45));
    assert_eq!(a.leader_elect_retry_period, Duration::from_millis(500));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    for bad in ["", "15", "s", "-1s", "1.5s", "15 s", "10d", "99999999999s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn cluster_cidrs_are_checked_and_reach_the_engine() {
    assert!(run_args(&[]).operator_defaults().cluster_cidrs.is_empty());
    let set = run_args(&["--cluster-cidrs=10.244.0.0/16, 10.96.0.0/12,fd00::/108"]);
    assert_eq!(
        set.operator_defaults().cluster_cidrs,
        ["10.244.0.0/16", "10.96.0.0/12", "fd00::/108"]
    );
    for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "example.com/8", "10.0.0.0/x"] {
        let flag = format!("--cluster-cidrs={bad}");
        assert!(Args::try_parse_from(["tailnode", "run", &flag]).is_err(), "{bad}");
    }
}

#[test]
fn cluster_dns_flags_reach_the_engine() {
    let d = run_args(&[]).operator_defaults().dns;
    assert_eq!(d, DnsDefaults::default());
    assert_eq!(d.cluster_domain, "cluster.local");
    let set = run_args(&[
        "--cluster-dns=10.96.0.10, [fd00::a]:5353,198.18.0.138:53",
        "--cluster-domain=Corp.Example.",
        "--dns-proxy-image=tailnode/tailnode:dev",
    ])
    .operator_defaults()
    .dns;
    assert_eq!(set.cluster_dns, ["10.96.0.10:53", "[fd00::a]:5353", "198.18.0.138:53"]);
    assert_eq!(set.cluster_domain, "corp.example");
    assert_eq!(set.proxy_image.as_deref(), Some("tailnode/tailnode:dev"));
    for bad in [
        "--cluster-dns=kube-dns",
        "--cluster-dns=10.0.0.1:x",
        "--cluster-domain=a..b",
        "--cluster-domain=-a",
    ] {
        assert!(Args::try_parse_from(["tailnode", "run", bad]).is_err(), "{bad}");
    }
    let proxy = Args::parse_from(["tailnode", "dns-proxy", "--upstream=10.96.0.10"]);
    let Command::DnsProxy(p) = proxy.command else {
        unreachable!()
    };
    assert_eq!(p.upstream, ["10.96.0.10:53".parse().unwrap()]);
    assert_eq!(p.listen, "127.0.0.1:53".parse().unwrap());
    assert!(
        Args::try_parse_from(["tailnode", "dns-proxy"]).is_err(),
        "--upstream is required"
    );
}

#[test]
fn server_limit_flags_default_to_the_server_defaults() {
    assert_eq!(run_args(&[]).limits.to_limits(), ServerLimits::default());
    let set = run_args(&[
        "--handshake-timeout=3s",
        "--header-read-timeout=4s",
        "--idle-timeout=5m",
        "--request-timeout=600ms",
        "--max-connections=7",
        "--max-connections-per-ip=8",
        "--max-body-bytes=9",
    ]);
    let want = ServerLimits {
        handshake_timeout: Duration::from_secs(3),
        header_read_timeout: Duration::from_secs(4),
        idle_timeout: Duration::from_secs(300),
        request_timeout: Duration::from_millis(600),
        max_connections: 7,
        max_connections_per_ip: 8,
        max_body_bytes: 9,
    };
    assert_eq!(set.limits.to_limits(), want);
    for zero in [
        "--max-connections=0",
        "--max-body-bytes=0",
        "--handshake-timeout=0s",
        "--idle-timeout=0ms",
    ] {
        assert!(Args::try_parse_from(["tailnode", "run", zero]).is_err(), "{zero}");
    }
}
