//! Serving an axum [`Router`] over HTTPS (rustls, HTTP/1.1 and h2 by ALPN) or plain HTTP, and a
//! serving certificate that can be swapped while the server runs ([`ReloadingCert`]).
//!
//! Both servers share one accept loop: a failed accept or handshake is logged and the loop goes
//! on. [`ServerLimits`] bound what one client can hold: connections over a cap are closed before
//! their handshake, and handshakes, request headers, idle connections, requests and bodies have
//! limits. On cancellation the listener closes, open connections are asked to finish (HTTP/1.1
//! keep-alive ends, h2 sends GOAWAY) and, after [`SHUTDOWN_GRACE`], the rest are dropped.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod conn;
mod limits;

use limits::ConnectionLimiter;
pub use limits::ServerLimits;

/// How long open connections may take to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What went wrong loading a certificate or building a TLS server.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate PEM could not be parsed.
    #[error("parsing the certificate PEM")]
    ParseCert {
        /// The PEM error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate PEM holds no certificate.
    #[error("the certificate PEM holds no certificate")]
    NoCertificate,
    /// The private key PEM could not be parsed.
    #[error("parsing the private key PEM")]
    ParseKey {
        /// The PEM error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The private key is unsupported or does not match the certificate.
    #[error("loading the private key for the certificate")]
    LoadKey {
        /// The rustls error (`InconsistentKeys` when key and certificate differ).
        #[source]
        source: rustls::Error,
    },
    /// A certificate or key file could not be read.
    #[error("reading {}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The rustls server configuration could not be built.
    #[error("building the TLS server configuration")]
    BuildServerConfig {
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
}

impl TlsError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::ParseCert { .. } | TlsError::NoCertificate => "parse_cert",
            TlsError::ParseKey { .. } => "parse_key",
            TlsError::LoadKey { .. } => "load_key",
            TlsError::ReadFile { .. } => "read_file",
            TlsError::BuildServerConfig { .. } => "server_config",
        }
    }
}

/// The crypto provider every TLS object of tailnode is built with (ring), independent of the
/// process-wide default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::ParseCert { source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// A certificate chain (leaf first) and its private key (PKCS#8, SEC1 or PKCS#1 PEM), checked to
/// belong together.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    let chain = certs_from_pem(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::ParseKey { source })?;
    CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|source| TlsError::LoadKey { source })
}

/// A serving certificate that can be replaced while connections are being accepted; every new
/// handshake gets the current one.
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert").finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Starts with the given certificate chain and key.
    pub fn from_pem(cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Result<Self, TlsError> {
        let key = certified_key_from_pem(cert_pem.as_ref(), key_pem.as_ref())?;
        Ok(ReloadingCert {
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Replaces the certificate. On error the previous one stays in place.
    pub fn set(&self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Result<(), TlsError> {
        let key = Arc::new(certified_key_from_pem(cert_pem.as_ref(), key_pem.as_ref())?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

async fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|source| TlsError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

async fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((read_file(cert_path).await?, read_file(key_path).await?))
}

/// Loads a certificate and key from files and re-reads them every `interval` until `shutdown`;
/// when their content changes the new pair is served (mounted cert-manager Secrets are updated in
/// place by the kubelet). A pair that does not load (half-written, mismatched, garbage) is logged
/// and the previous certificate stays; the same broken content is not retried until it changes.
///
/// Fails when the files cannot be loaded at start.
pub async fn watch_files(
    cert_path: PathBuf,
    key_path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(Arc<ReloadingCert>, JoinHandle<()>), TlsError> {
    let pair = read_pair(&cert_path, &key_path).await?;
    let reloading = Arc::new(ReloadingCert::from_pem(&pair.0, &pair.1)?);
    let task = tokio::spawn(watch_loop(
        reloading.clone(),
        cert_path,
        key_path,
        interval,
        shutdown,
        pair,
    ));
    Ok((reloading, task))
}

async fn watch_loop(
    reloading: Arc<ReloadingCert>,
    cert_path: PathBuf,
    key_path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
    mut seen: (Vec<u8>, Vec<u8>),
) {
    let mut read_failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let pair = match read_pair(&cert_path, &key_path).await {
            Ok(pair) => pair,
            Err(error) => {
                if !read_failing {
                    warn!(%error, "reading the serving certificate files failed; keeping the current certificate");
                }
                read_failing = true;
                continue;
            }
        };
        read_failing = false;
        if pair == seen {
            continue;
        }
        match reloading.set(&pair.0, &pair.1) {
            Ok(()) => info!(cert = %cert_path.display(), "serving certificate reloaded"),
            Err(error) => warn!(
                %error,
                cert = %cert_path.display(),
                "the changed serving certificate does not load; keeping the current certificate"
            ),
        }
        seen = pair;
    }
}

/// The rustls server configuration for `resolver`, offering h2 and HTTP/1.1 by ALPN.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::BuildServerConfig { source })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` over HTTPS on `listener` with the certificate `resolver` picks, under
/// `limits`, until `shutdown` is cancelled. Fails only when the TLS configuration cannot be built.
pub async fn serve_https(
    listener: TcpListener,
    resolver: Arc<dyn ResolvesServerCert>,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> Result<(), TlsError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(resolver)?));
    serve_loop(listener, router, limits, shutdown, move |tcp| acceptor.accept(tcp)).await;
    Ok(())
}

/// Serves `router` over plain HTTP (HTTP/1.1 and h2c) on `listener`, under `limits`, until
/// `shutdown` is cancelled. For the admin port.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> Result<(), TlsError> {
    serve_loop(listener, router, limits, shutdown, |tcp| std::future::ready(Ok(tcp))).await;
    Ok(())
}

/// The accept loop: `handshake` turns each TCP stream into the I/O hyper serves. A connection over
/// a cap is closed at once, before its handshake.
async fn serve_loop<H, F, IO>(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
    handshake: H,
) where
    H: Fn(TcpStream) -> F,
    F: Future<Output = std::io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = router.layer(DefaultBodyLimit::max(limits.max_body_bytes));
    let limiter = ConnectionLimiter::new(&limits);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => match limiter.try_admit(peer.ip()) {
                    Ok(permit) => {
                        // Without it, Nagle holds the last segment of a response written in more
                        // than one write (h2 HEADERS then DATA) until the client ACKs the first:
                        // up to its delayed-ACK timeout (~40 ms) when no next request comes.
                        if let Err(error) = tcp.set_nodelay(true) {
                            debug!(%error, %peer, "setting TCP_NODELAY failed");
                        }
                        let connection = handshake(tcp);
                        let (router, stop) = (router.clone(), shutdown.clone());
                        connections.spawn(conn::serve_connection(connection, router, limits, stop, peer, permit));
                    }
                    Err(refused) => {
                        debug!(%peer, limit = refused.label(), "connection refused: over the connection limit");
                        drop(tcp);
                    }
                },
                Err(error) => {
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(
            open = connections.len(),
            "connections still open after the shutdown grace period"
        );
        connections.shutdown().await;
    }
}

#[cfg(test)]
mod tests;
