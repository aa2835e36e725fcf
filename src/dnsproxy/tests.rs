//! The resolver end to end on loopback: a fake cluster DNS (UDP and TCP) and a fake tailscaled
//! LocalAPI on a unix socket.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tokio::net::UnixListener;

use super::message::tests::{answer, query};
use super::message::{NXDOMAIN, REFUSED, TYPE_A, answer_count, id_of, parse_query, rcode_of, reply};
use super::*;

/// A cluster DNS that says NXDOMAIN to everything, except `kubernetes.default.svc.cluster.local`.
async fn fake_upstream() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let respond = |q: &[u8]| {
        let p = parse_query(q).unwrap();
        if p.name == "kubernetes.default.svc.cluster.local" {
            let mut a = answer(&p.name, [198, 18, 0, 129]);
            a[0..2].copy_from_slice(&p.id.to_be_bytes());
            a
        } else {
            reply(q, &p, NXDOMAIN)
        }
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            udp.send_to(&respond(&buf[..n]), peer).await.unwrap();
        }
    });
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = tcp.accept().await.unwrap();
            let q = read_framed(&mut conn).await.unwrap();
            write_framed(&mut conn, &respond(&q)).await.unwrap();
        }
    });
    addr
}

/// tailscaled's LocalAPI: domain `tailnet.test`, one host `web-0` at 100.64.0.7; REFUSED for
/// anything else (as with `--accept-dns=false`).
async fn fake_tailscaled() -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let path = std::env::temp_dir().join(format!("tailnode-dnsproxy-{}-{nanos}.sock", std::process::id()));
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 1024];
            while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                raw.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8(raw).unwrap();
            assert!(head.contains("Host: local-tailscaled.sock\r\n"), "{head}");
            let body = if head.starts_with("GET /localapi/v0/status?peers=false ") {
                r#"{"CurrentTailnet":{"MagicDNSSuffix":"tailnet.test."}}"#.to_string()
            } else {
                let name = head.split("name=").nth(1).unwrap().split('&').next().unwrap();
                let mut msg = answer(name, [100, 64, 0, 7]);
                if name != "web-0.tailnet.test" {
                    msg[3] = 0x80 | REFUSED;
                }
                format!(
                    r#"{{"Bytes":"{}","Resolvers":null}}"#,
                    base64::engine::general_purpose::STANDARD.encode(msg)
                )
            };
            let response = format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
            conn.write_all(response.as_bytes()).await.unwrap();
        }
    });
    path
}

async fn start(socket: PathBuf, upstream: Vec<SocketAddr>) -> (SocketAddr, SocketAddr, CancellationToken) {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (u, t) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let config = Config {
        listen: u,
        upstream,
        socket,
        timeout: Duration::from_millis(500),
    };
    let stop = CancellationToken::new();
    tokio::spawn(serve_on(udp, tcp, config, stop.clone()));
    (u, t, stop)
}

async fn ask_udp(server: SocketAddr, q: &[u8]) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(5), forward_udp(server, q))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn answers_tailnet_names_from_tailscaled_and_the_rest_from_the_cluster() {
    let upstream = fake_upstream().await;
    let (udp, tcp, stop) = start(fake_tailscaled().await, vec![upstream]).await;

    let r = ask_udp(udp, &query(0x4242, "Web-0.Tailnet.Test", TYPE_A, true)).await;
    assert_eq!(
        (id_of(&r), rcode_of(&r), answer_count(&r)),
        (Some(0x4242), Some(0), Some(1))
    );
    assert_eq!(&r[r.len() - 4..], &[100, 64, 0, 7]);

    // A name tailscaled does not know, under its domain: NXDOMAIN, not REFUSED.
    let r = ask_udp(udp, &query(2, "nope.tailnet.test", TYPE_A, false)).await;
    assert_eq!(rcode_of(&r), Some(NXDOMAIN));

    // The cluster's names, over UDP and TCP.
    let r = ask_udp(udp, &query(3, "kubernetes.default.svc.cluster.local", TYPE_A, false)).await;
    assert_eq!((id_of(&r), answer_count(&r)), (Some(3), Some(1)));
    assert_eq!(&r[r.len() - 4..], &[198, 18, 0, 129]);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        forward_tcp(tcp, &query(4, "kubernetes.default.svc.cluster.local", TYPE_A, false)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((id_of(&r), answer_count(&r)), (Some(4), Some(1)));

    // A search-list candidate under the cluster domain goes to the cluster DNS.
    let r = ask_udp(
        udp,
        &query(5, "web-0.tailnet.test.default.svc.cluster.local", TYPE_A, false),
    )
    .await;
    assert_eq!(rcode_of(&r), Some(NXDOMAIN));
    stop.cancel();
}

#[tokio::test]
async fn without_tailscaled_everything_goes_to_the_cluster_and_without_it_servfail() {
    let gone = std::env::temp_dir().join("tailnode-dnsproxy-no-such.sock");
    let upstream = fake_upstream().await;
    let (udp, _, stop) = start(gone.clone(), vec![upstream]).await;
    let r = ask_udp(udp, &query(6, "web-0.tailnet.test", TYPE_A, false)).await;
    assert_eq!(rcode_of(&r), Some(NXDOMAIN), "the cluster DNS's answer");
    stop.cancel();

    // An upstream that never answers: SERVFAIL after the timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (udp, _, stop) = start(gone, vec![silent.local_addr().unwrap()]).await;
    let r = ask_udp(udp, &query(7, "example.com", TYPE_A, false)).await;
    assert_eq!((id_of(&r), rcode_of(&r)), (Some(7), Some(message::SERVFAIL)));
    stop.cancel();
}

#[test]
fn parses_server_addresses() {
    assert_eq!(parse_server("10.96.0.10"), Some("10.96.0.10:53".parse().unwrap()));
    assert_eq!(
        parse_server("10.96.0.10:5353"),
        Some("10.96.0.10:5353".parse().unwrap())
    );
    assert_eq!(parse_server("fd00::a"), Some("[fd00::a]:53".parse().unwrap()));
    assert_eq!(parse_server("[fd00::a]:54"), Some("[fd00::a]:54".parse().unwrap()));
    assert_eq!(parse_server("kube-dns"), None);
}
