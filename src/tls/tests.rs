use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use chrono::Utc;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;

use super::*;
use crate::certs::{CaBundle, ServingCert, generate_ca, issue_serving};

const NAME: &str = "webhook.tailnode.test";

fn router() -> Router {
    Router::new().route("/hello", get(|| async { "hello" }))
}

fn ca_and_cert() -> (CaBundle, ServingCert) {
    crate::install_crypto_provider();
    let ca = generate_ca(Utc::now()).unwrap();
    let cert = issue_serving(&ca, &[NAME.to_string()], Utc::now()).unwrap();
    (ca, cert)
}

async fn start(
    resolver: Arc<dyn ResolvesServerCert>,
) -> (SocketAddr, CancellationToken, JoinHandle<Result<(), TlsError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_https(
        listener,
        resolver,
        router(),
        ServerLimits::default(),
        shutdown.clone(),
    ));
    (addr, shutdown, task)
}

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_from_pem(ca_pem.as_bytes()).unwrap() {
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

async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_pem, alpn)));
    let tcp = TcpStream::connect(addr).await?;
    connector.connect(ServerName::try_from(NAME).unwrap(), tcp).await
}

/// The leaf certificate the server presents now.
async fn served_cert(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    let tls = tls_connect(addr, ca_pem, &[]).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    certs_from_pem(pem.as_bytes()).unwrap()[0].to_vec()
}

async fn get_http1(addr: SocketAddr, ca_pem: &str) -> reqwest::Result<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(client_config(ca_pem, &[b"http/1.1"]))
        .resolve(NAME, addr)
        .build()?;
    client
        .get(format!("https://{NAME}:{}/hello", addr.port()))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

#[tokio::test]
async fn serves_http1_and_h2_with_a_certificate_the_ca_verifies() {
    let (ca, cert) = ca_and_cert();
    let resolver = Arc::new(ReloadingCert::from_pem(&cert.cert_pem, &cert.key_pem).unwrap());
    let (addr, shutdown, server) = start(resolver).await;

    assert_eq!(get_http1(addr, &ca.cert_pem).await.unwrap(), "hello");

    let tls = tls_connect(addr, &ca.cert_pem, &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get(format!("https://{NAME}/hello"))
        .body(String::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 1024)
        .await
        .unwrap();
    assert_eq!(&body[..], b"hello");

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn failed_handshakes_do_not_stop_the_server() {
    let (ca, cert) = ca_and_cert();
    let resolver = Arc::new(ReloadingCert::from_pem(&cert.cert_pem, &cert.key_pem).unwrap());
    let (addr, shutdown, server) = start(resolver).await;

    // Garbage instead of a ClientHello.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(tcp);
    // Connect and hang up without a byte.
    drop(TcpStream::connect(addr).await.unwrap());
    // A client that does not trust the CA aborts the handshake.
    let other_ca = generate_ca(Utc::now()).unwrap();
    assert!(tls_connect(addr, &other_ca.cert_pem, &[]).await.is_err());
    assert!(get_http1(addr, &other_ca.cert_pem).await.is_err());

    assert_eq!(get_http1(addr, &ca.cert_pem).await.unwrap(), "hello");
    assert!(!server.is_finished());
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn accepted_connections_have_nagle_off() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(serve_loop(
        listener,
        router(),
        ServerLimits::default(),
        shutdown.clone(),
        move |tcp: TcpStream| {
            let _ = tx.send(tcp.nodelay().unwrap());
            std::future::ready(Ok(tcp))
        },
    ));
    let _client = TcpStream::connect(addr).await.unwrap();
    assert!(rx.recv().await.unwrap(), "TCP_NODELAY is set before the handshake");
    shutdown.cancel();
    server.await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let (ca, cert) = ca_and_cert();
    let resolver = Arc::new(ReloadingCert::from_pem(&cert.cert_pem, &cert.key_pem).unwrap());
    let (addr, shutdown, server) = start(resolver).await;
    // An h2 connection that stays open and idle.
    let tls = tls_connect(addr, &ca.cert_pem, &[b"h2"]).await.unwrap();
    let (_sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, String>(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let client_conn = tokio::spawn(conn);
    tokio::time::sleep(Duration::from_millis(50)).await;

    shutdown.cancel();
    // Well inside the grace period: the server asks the connection to go away, it does.
    tokio::time::timeout(SHUTDOWN_GRACE / 2, server)
        .await
        .expect("server stopped before the grace period ran out")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), client_conn)
        .await
        .expect("client connection closed")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[test]
fn set_keeps_the_old_certificate_when_the_new_one_is_broken() {
    let (ca, first) = ca_and_cert();
    let second = issue_serving(&ca, &[NAME.to_string()], Utc::now()).unwrap();
    let reloading = ReloadingCert::from_pem(&first.cert_pem, &first.key_pem).unwrap();
    let served = |r: &ReloadingCert| r.current().cert[0].to_vec();

    let mismatched = reloading.set(&second.cert_pem, &first.key_pem);
    assert!(matches!(mismatched, Err(TlsError::LoadKey { .. })), "{mismatched:?}");
    assert!(matches!(
        reloading.set("", &first.key_pem),
        Err(TlsError::NoCertificate)
    ));
    assert!(matches!(
        reloading.set(
            &first.cert_pem,
            "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n"
        ),
        Err(TlsError::ParseKey { .. })
    ));
    assert_eq!(served(&reloading), der(&first.cert_pem));

    reloading.set(&second.cert_pem, &second.key_pem).unwrap();
    assert_eq!(served(&reloading), der(&second.cert_pem));
    assert!(!format!("{reloading:?}").contains("PRIVATE"));
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tailnode-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn eventually_served(addr: SocketAddr, ca_pem: &str, want: &[u8]) -> bool {
    for _ in 0..100 {
        if served_cert(addr, ca_pem).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn watch_files_hot_reloads_and_keeps_the_old_certificate_on_broken_files() {
    let (ca, first) = ca_and_cert();
    let second = issue_serving(&ca, &[NAME.to_string()], Utc::now()).unwrap();
    let third = issue_serving(&ca, &[NAME.to_string()], Utc::now()).unwrap();
    let dir = TempDir::new();
    let (cert_path, key_path) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
    std::fs::write(&cert_path, &first.cert_pem).unwrap();
    std::fs::write(&key_path, &first.key_pem).unwrap();

    let shutdown = CancellationToken::new();
    let interval = Duration::from_millis(20);
    let (reloading, watcher) = watch_files(cert_path.clone(), key_path.clone(), interval, shutdown.clone())
        .await
        .unwrap();
    let (addr, server_shutdown, server) = start(reloading.clone()).await;
    assert_eq!(served_cert(addr, &ca.cert_pem).await, der(&first.cert_pem));

    // A new pair is picked up.
    std::fs::write(&key_path, &second.key_pem).unwrap();
    std::fs::write(&cert_path, &second.cert_pem).unwrap();
    assert!(eventually_served(addr, &ca.cert_pem, &der(&second.cert_pem)).await);

    // Garbage, a missing file and a mismatched pair leave the second certificate in place.
    std::fs::write(&cert_path, "garbage").unwrap();
    tokio::time::sleep(interval * 5).await;
    std::fs::remove_file(&key_path).unwrap();
    tokio::time::sleep(interval * 5).await;
    std::fs::write(&cert_path, &third.cert_pem).unwrap();
    std::fs::write(&key_path, &first.key_pem).unwrap();
    tokio::time::sleep(interval * 5).await;
    assert_eq!(served_cert(addr, &ca.cert_pem).await, der(&second.cert_pem));

    // Fixing the key completes the third pair.
    std::fs::write(&key_path, &third.key_pem).unwrap();
    assert!(eventually_served(addr, &ca.cert_pem, &der(&third.cert_pem)).await);

    shutdown.cancel();
    watcher.await.unwrap();
    server_shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn watch_files_fails_when_the_first_load_fails() {
    let dir = TempDir::new();
    let missing = watch_files(
        dir.0.join("tls.crt"),
        dir.0.join("tls.key"),
        Duration::from_secs(1),
        CancellationToken::new(),
    )
    .await;
    assert!(matches!(missing, Err(TlsError::ReadFile { .. })));
}
