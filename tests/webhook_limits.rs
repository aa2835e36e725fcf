//! The HTTPS server under `ServerLimits`, without a cluster: stalled handshakes and headers are
//! dropped, connection floods are refused before their handshake without blocking other clients,
//! oversized bodies get 413, and HTTP/2 keep-alive still carries sequential requests.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use chrono::Utc;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tailnode::certs::{CaBundle, generate_ca, issue_serving};
use tailnode::tls::{ReloadingCert, ServerLimits, certs_from_pem, crypto_provider, serve_https};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

const NAME: &str = "webhook.tailnode.test";
/// Loopback addresses that count as different client IPs (Linux routes all of 127/8 to `lo`).
const IP_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const IP_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const IP_C: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Long enough that no test waits for it: when it matters, something else must act first.
const LONG: Duration = Duration::from_secs(30);
const SHORT: Duration = Duration::from_millis(300);
/// How long a test waits for a positive signal before it fails.
const PATIENCE: Duration = Duration::from_secs(3);

struct Server {
    addr: SocketAddr,
    ca: CaBundle,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), tailnode::tls::TlsError>>,
}

impl Server {
    async fn start(limits: ServerLimits) -> Server {
        tailnode::install_crypto_provider();
        let ca = generate_ca(Utc::now()).unwrap();
        let cert = issue_serving(&ca, &[NAME.to_string()], Utc::now()).unwrap();
        let resolver = Arc::new(ReloadingCert::from_pem(&cert.cert_pem, &cert.key_pem).unwrap());
        let listener = tokio::net::TcpListener::bind((IP_A, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let router = Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route("/len", post(|body: Bytes| async move { body.len().to_string() }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    "slow"
                }),
            );
        let task = tokio::spawn(serve_https(listener, resolver, router, limits, shutdown.clone()));
        Server {
            addr,
            ca,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        assert!(!self.task.is_finished(), "the server kept running");
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs_from_pem(self.ca.cert_pem.as_bytes()).unwrap() {
            roots.add(ca).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// A TCP connection from `ip`.
    async fn tcp_from(&self, ip: IpAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
        socket.connect(self.addr).await.unwrap()
    }

    async fn tls(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(self.client_config(alpn)));
        let tcp = self.tcp_from(IP_A).await;
        connector
            .connect(ServerName::try_from(NAME).unwrap(), tcp)
            .await
            .unwrap()
    }

    /// An HTTP client whose connections come from `ip`.
    fn client(&self, ip: IpAddr) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .tls_backend_preconfigured(self.client_config(&[b"http/1.1"]))
            .resolve(NAME, self.addr)
            .local_address(ip)
            .pool_max_idle_per_host(0)
            .timeout(PATIENCE)
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("https://{NAME}:{}{path}", self.addr.port())
    }

    async fn hello_from(&self, ip: IpAddr) -> reqwest::Result<String> {
        self.client(ip)
            .get(self.url("/hello"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }
}

/// Reads until the peer closes (EOF or a reset); how long that took from `since`, or `None` when
/// the connection is still open after `wait`.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin), since: Instant, wait: Duration) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.ok().map(|()| since.elapsed())
}

fn limits(f: impl FnOnce(&mut ServerLimits)) -> ServerLimits {
    let mut limits = ServerLimits {
        handshake_timeout: LONG,
        header_read_timeout: LONG,
        idle_timeout: LONG,
        request_timeout: LONG,
        ..ServerLimits::default()
    };
    f(&mut limits);
    limits
}

#[tokio::test]
async fn a_client_stalled_in_the_tls_handshake_is_dropped_after_the_handshake_timeout() {
    let server = Server::start(limits(|l| l.handshake_timeout = SHORT)).await;

    // Connects and sends nothing.
    let since = Instant::now();
    let mut silent = server.tcp_from(IP_A).await;
    // Sends the first bytes of a ClientHello record and stalls.
    let mut partial = server.tcp_from(IP_A).await;
    partial.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();

    for stream in [&mut silent, &mut partial] {
        let closed = closed_within(stream, since, PATIENCE).await.expect("dropped");
        assert!(
            closed >= SHORT,
            "dropped by the handshake timeout, not before: {closed:?}"
        );
    }
    assert_eq!(server.hello_from(IP_A).await.unwrap(), "hello");
    server.stop().await;
}

#[tokio::test]
async fn a_client_stalled_in_the_request_headers_is_dropped_after_the_header_timeout() {
    let server = Server::start(limits(|l| l.header_read_timeout = SHORT)).await;

    // HTTP/1.1: half the headers of the first request.
    let since = Instant::now();
    let mut h1 = server.tls(&[b"http/1.1"]).await;
    h1.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // HTTP/1.1: a full request on a keep-alive connection, then half the next one's headers.
    let mut keep_alive = server.tls(&[b"http/1.1"]).await;
    keep_alive
        .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"hello") {
        let mut buf = [0u8; 1024];
        let n = keep_alive.read(&mut buf).await.unwrap();
        assert_ne!(
            n,
            0,
            "the first request is answered: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200"));
    keep_alive.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
    // HTTP/2: half the connection preface.
    let mut h2 = server.tls(&[b"h2"]).await;
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    h2.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Nothing at all after the handshake.
    let mut silent = server.tls(&[b"h2", b"http/1.1"]).await;

    for (name, stream) in [
        ("h1", &mut h1),
        ("keep-alive", &mut keep_alive),
        ("h2", &mut h2),
        ("silent", &mut silent),
    ] {
        let closed = closed_within(stream, since, PATIENCE).await;
        let closed = closed.unwrap_or_else(|| panic!("{name}: dropped"));
        assert!(
            closed >= SHORT,
            "{name}: dropped by the timeout, not before: {closed:?}"
        );
    }
    assert_eq!(server.hello_from(IP_A).await.unwrap(), "hello");
    server.stop().await;
}

#[tokio::test]
async fn a_flood_over_the_per_ip_cap_is_refused_at_once_and_others_are_still_served() {
    let (per_ip, flood) = (4, 64);
    let server = Server::start(limits(|l| {
        l.max_connections_per_ip = per_ip;
        l.max_connections = 32;
    }))
    .await;

    // Stalled clients that never start TLS; the handshake timeout is far away.
    let mut stalled = Vec::new();
    for _ in 0..flood {
        stalled.push(server.tcp_from(IP_A).await);
    }
    let since = Instant::now();
    let waits = stalled
        .iter_mut()
        .map(|stream| closed_within(stream, since, Duration::from_secs(1)));
    let closed = futures::future::join_all(waits).await;
    let refused = closed.iter().filter(|c| c.is_some()).count();
    assert_eq!(refused, flood - per_ip, "all over the cap are closed, the rest stay");

    // Another client is served at once; the flooding IP is refused at once.
    assert_eq!(server.hello_from(IP_B).await.unwrap(), "hello");
    let mut more = server.tcp_from(IP_A).await;
    assert!(closed_within(&mut more, Instant::now(), PATIENCE).await.is_some());

    // Once the stalled clients go, their IP is served again.
    drop(stalled);
    let deadline = Instant::now() + PATIENCE;
    while server.hello_from(IP_A).await.is_err() {
        assert!(Instant::now() < deadline, "the flooding IP is served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn the_total_cap_refuses_every_ip_until_a_place_frees() {
    let server = Server::start(limits(|l| {
        l.max_connections_per_ip = 2;
        l.max_connections = 4;
    }))
    .await;
    let mut held = Vec::new();
    for ip in [IP_A, IP_A, IP_C, IP_C] {
        held.push(server.tcp_from(ip).await);
    }
    let mut refused = server.tcp_from(IP_B).await;
    assert!(closed_within(&mut refused, Instant::now(), PATIENCE).await.is_some());

    held.pop();
    let deadline = Instant::now() + PATIENCE;
    while server.hello_from(IP_B).await.is_err() {
        assert!(Instant::now() < deadline, "a freed place admits another IP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(held);
    server.stop().await;
}

async fn post_len(server: &Server, len: usize) -> (u16, String) {
    let response = server
        .client(IP_A)
        .post(server.url("/len"))
        .body(vec![b'x'; len])
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn an_oversized_body_gets_413() {
    let server = Server::start(limits(|l| l.max_body_bytes = 1024)).await;
    assert_eq!(post_len(&server, 1024).await, (200, "1024".to_string()));
    assert_eq!(post_len(&server, 1025).await.0, 413);

    // Without a Content-Length: the body is cut off as it is read.
    let mut h1 = server.tls(&[b"http/1.1"]).await;
    let chunk = vec![b'x'; 2000];
    h1.write_all(b"POST /len HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n7d0\r\n")
        .await
        .unwrap();
    h1.write_all(&chunk).await.unwrap();
    h1.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let mut status = [0u8; 12];
    h1.read_exact(&mut status).await.unwrap();
    assert_eq!(&status, b"HTTP/1.1 413");
    server.stop().await;
}

#[tokio::test]
async fn the_default_body_cap_admits_what_the_apiserver_sends() {
    let server = Server::start(ServerLimits::default()).await;
    // Over axum's own 2 MB default, under the apiserver's 3 MiB.
    let big = 5 * 1024 * 1024 / 2;
    assert_eq!(post_len(&server, big).await, (200, big.to_string()));
    assert_eq!(post_len(&server, 3 * 1024 * 1024 + 1).await.0, 413);
    server.stop().await;
}

#[tokio::test]
async fn http2_keep_alive_carries_sequential_requests_and_closes_when_idle() {
    let server = Server::start(limits(|l| {
        l.idle_timeout = SHORT;
        l.header_read_timeout = SHORT;
    }))
    .await;
    let tls = server.tls(&[b"h2"]).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);

    let started = Instant::now();
    for path in ["/hello", "/hello", "/slow", "/hello", "/hello", "/hello"] {
        // Spaced under the idle timeout, together well over it; /slow outlasts it in flight.
        tokio::time::sleep(SHORT / 2).await;
        let request = hyper::Request::get(format!("https://{NAME}{path}"))
            .body(String::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
    }
    assert!(
        started.elapsed() > SHORT * 3,
        "the connection outlived the idle timeout"
    );

    // Without requests, the server closes it.
    tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_request_over_the_request_timeout_gets_408() {
    let server = Server::start(limits(|l| l.request_timeout = Duration::from_millis(200))).await;
    let slow = server.client(IP_A).get(server.url("/slow")).send().await.unwrap();
    assert_eq!(slow.status().as_u16(), 408);
    assert_eq!(server.hello_from(IP_A).await.unwrap(), "hello");
    server.stop().await;
}
