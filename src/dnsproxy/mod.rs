//! `tailnode dns-proxy`: the resolver of pods whose TailscaleNode turns `dns.magicDNS` on, run
//! in the injected `tailscale-dns` container (the sidecar image is Tailscale's own, so this code
//! lives in tailnode's image). It answers on 127.0.0.1:53, UDP and TCP, the pod's only nameserver:
//! names under the tailnet's MagicDNS domain (learned from tailscaled's status) and short
//! single-label names from tailscaled's LocalAPI, everything else from the cluster DNS.
//!
//! [`message`] and [`route`] are pure; [`localapi`] and this module are the I/O shell.

pub mod localapi;
pub mod message;
pub mod route;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::route::{Lookup, Route};

/// How long a known MagicDNS domain is used before it is asked for again.
const SUFFIX_TTL: Duration = Duration::from_secs(30);
/// How soon tailscaled is asked again when it did not tell the domain (not up yet).
const SUFFIX_RETRY: Duration = Duration::from_secs(2);
/// UDP queries answered at once; more are dropped (the client retries).
const MAX_UDP_IN_FLIGHT: usize = 256;
/// TCP connections served at once.
const MAX_TCP_CONNECTIONS: usize = 64;
/// How long a TCP connection may sit between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// A failure that stops the resolver.
#[derive(Debug, thiserror::Error)]
pub enum DnsProxyError {
    /// The listen address could not be bound (another server on port 53 in the pod, or
    /// `net.ipv4.ip_unprivileged_port_start` above 53 for a non-root resolver).
    #[error("binding {proto} {addr}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// PURE: a DNS server address: `IP` (port 53), `IP:port`, `[IPv6]:port` or a bare IPv6 address.
pub fn parse_server(text: &str) -> Option<SocketAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    text.parse::<SocketAddr>().ok()
}

/// The resolver's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to answer (UDP and TCP).
    pub listen: SocketAddr,
    /// The cluster DNS server(s), tried in order.
    pub upstream: Vec<SocketAddr>,
    /// tailscaled's LocalAPI socket.
    pub socket: PathBuf,
    /// Per-query timeout for tailscaled and each upstream server.
    pub timeout: Duration,
}

/// The resolver's state: settings and the MagicDNS domain last learned.
struct Resolver {
    config: Config,
    suffix: Mutex<(Option<String>, Option<Instant>)>,
}

/// Serves DNS until `shutdown` fires.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), DnsProxyError> {
    let listen = config.listen;
    let udp = UdpSocket::bind(listen).await.map_err(|source| DnsProxyError::Bind {
        proto: "udp",
        addr: listen,
        source,
    })?;
    let tcp = TcpListener::bind(listen).await.map_err(|source| DnsProxyError::Bind {
        proto: "tcp",
        addr: listen,
        source,
    })?;
    info!(listen = %listen, upstream = ?config.upstream, socket = %config.socket.display(), "dns proxy listening");
    serve_on(udp, tcp, config, shutdown).await;
    Ok(())
}

/// Serves DNS on bound sockets until `shutdown` fires.
async fn serve_on(udp: UdpSocket, tcp: TcpListener, config: Config, shutdown: CancellationToken) {
    let resolver = Arc::new(Resolver {
        config,
        suffix: Mutex::new((None, None)),
    });
    tokio::select! {
        () = serve_udp(Arc::new(udp), resolver.clone()) => {}
        () = serve_tcp(tcp, resolver) => {}
        () = shutdown.cancelled() => info!("dns proxy stopping"),
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, resolver: Arc<Resolver>) {
    let permits = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("udp queries in flight at the limit; dropping one");
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, resolver) = (socket.clone(), resolver.clone());
        tokio::spawn(async move {
            if let Some(reply) = resolver.answer(&query, false).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                debug!(error = %e, "udp reply failed");
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(listener: TcpListener, resolver: Arc<Resolver>) {
    let permits = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("tcp connections at the limit; closing one");
            continue;
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let _ = serve_tcp_conn(conn, &resolver).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_conn(mut conn: TcpStream, resolver: &Resolver) -> std::io::Result<()> {
    loop {
        let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await else {
            return Ok(());
        };
        let Some(reply) = resolver.answer(&query, true).await else {
            return Ok(());
        };
        write_framed(&mut conn, &reply).await?;
    }
}

async fn read_framed(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = conn.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    conn.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_framed(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("dns message over 64 KiB"))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    conn.write_all(&framed).await
}

impl Resolver {
    /// The reply to one query, or `None` when there is nothing to say (too short to answer).
    async fn answer(&self, query_buf: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let query = match message::parse_query(query_buf) {
            Ok(q) => q,
            Err(message::MessageError::Short) => return None,
            // Other opcodes, several questions: the cluster DNS decides.
            Err(_) => {
                return self
                    .forward(query_buf, tcp)
                    .await
                    .or_else(|| message::format_error(query_buf));
            }
        };
        let route = route::route(&query.name, query.qtype, self.suffix().await.as_deref());
        if route != Route::Upstream {
            let lookup = self.lookup(&query).await;
            if let Some(reply) = route::reply(query_buf, &query, route, &lookup) {
                return Some(reply);
            }
        }
        match self.forward(query_buf, tcp).await {
            Some(reply) => Some(reply),
            None => Some(message::reply(query_buf, &query, message::SERVFAIL)),
        }
    }

    /// Asks tailscaled.
    async fn lookup(&self, query: &message::Query) -> Lookup {
        let Some(qtype) = message::type_name(query.qtype) else {
            return Lookup::UnsupportedType;
        };
        let path = localapi::dns_query_path(&query.name, qtype);
        match localapi::get(&self.config.socket, &path, self.config.timeout).await {
            Ok(body) => match localapi::parse_dns_query(&body) {
                Ok(answer) => Lookup::Answer(answer),
                Err(e) => {
                    warn!(error = e.kind(), "tailscaled dns-query answer unreadable");
                    Lookup::Unavailable
                }
            },
            Err(e) => {
                debug!(error = e.kind(), "tailscaled dns-query failed");
                Lookup::Unavailable
            }
        }
    }

    /// The tailnet's MagicDNS domain, asked of tailscaled at most every few seconds.
    async fn suffix(&self) -> Option<String> {
        let now = Instant::now();
        let (known, checked) = match self.suffix.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let ttl = if known.is_some() { SUFFIX_TTL } else { SUFFIX_RETRY };
        if checked.is_some_and(|at| now.duration_since(at) < ttl) {
            return known;
        }
        let learned = match localapi::get(&self.config.socket, localapi::STATUS_PATH, self.config.timeout).await {
            Ok(body) => localapi::parse_suffix(&body).unwrap_or_else(|e| {
                warn!(error = e.kind(), "tailscaled status unreadable");
                None
            }),
            Err(e) => {
                debug!(error = e.kind(), "tailscaled status failed");
                None
            }
        };
        // A tailscaled that is restarting keeps the last known domain.
        let current = learned.or(known);
        if let Ok(mut s) = self.suffix.lock() {
            *s = (current.clone(), Some(now));
        }
        current
    }

    /// Asks the cluster DNS, each server in turn; `None` when none answered.
    async fn forward(&self, query_buf: &[u8], tcp: bool) -> Option<Vec<u8>> {
        for server in &self.config.upstream {
            let result = if tcp {
                tokio::time::timeout(self.config.timeout, forward_tcp(*server, query_buf)).await
            } else {
                tokio::time::timeout(self.config.timeout, forward_udp(*server, query_buf)).await
            };
            match result {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => debug!(error = %e, "upstream dns failed"),
                Err(_) => debug!("upstream dns timed out"),
            }
        }
        None
    }
}

async fn forward_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let any: IpAddr = if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let id = message::id_of(query);
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A stray datagram with another id is not our answer.
        if message::id_of(&buf[..n]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(server).await?;
    write_framed(&mut conn, query).await?;
    read_framed(&mut conn).await
}

#[cfg(test)]
mod tests;
