//! Limits that keep slow or hostile clients from holding a server open: timeouts for the TLS
//! handshake, the request headers, idle connections and whole requests; caps on open connections
//! in total and per client IP; a cap on the request body.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Every limit of a server, with defaults fit for an admission webhook behind the apiserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a client may take to send the headers of a request: from the end of the handshake
    /// to the first request, and (HTTP/1.1) from one response to the next request's headers.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open without a request in flight. An apiserver that keeps
    /// sending requests on an HTTP/2 connection keeps it open.
    pub idle_timeout: Duration,
    /// How long a request may take from its headers to its response (body upload included);
    /// answered 408 when over.
    pub request_timeout: Duration,
    /// Open connections in total; more are closed at once, before the TLS handshake.
    pub max_connections: usize,
    /// Open connections from one client IP; more are closed at once, before the TLS handshake.
    pub max_connections_per_ip: usize,
    /// Largest request body in bytes; larger ones are answered 413.
    pub max_body_bytes: usize,
}

impl ServerLimits {
    /// Default [`ServerLimits::handshake_timeout`].
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default [`ServerLimits::header_read_timeout`].
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default [`ServerLimits::idle_timeout`] (Go's `IdleConnTimeout`, which the apiserver's
    /// clients use, so they usually close first).
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
    /// Default [`ServerLimits::request_timeout`]: the longest webhook timeout the apiserver allows.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default [`ServerLimits::max_connections`].
    pub const MAX_CONNECTIONS: usize = 512;
    /// Default [`ServerLimits::max_connections_per_ip`].
    pub const MAX_CONNECTIONS_PER_IP: usize = 64;
    /// Default [`ServerLimits::max_body_bytes`]: 3 MiB, the apiserver's own limit for a request
    /// (an AdmissionReview carries the object).
    pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            handshake_timeout: Self::HANDSHAKE_TIMEOUT,
            header_read_timeout: Self::HEADER_READ_TIMEOUT,
            idle_timeout: Self::IDLE_TIMEOUT,
            request_timeout: Self::REQUEST_TIMEOUT,
            max_connections: Self::MAX_CONNECTIONS,
            max_connections_per_ip: Self::MAX_CONNECTIONS_PER_IP,
            max_body_bytes: Self::MAX_BODY_BYTES,
        }
    }
}

/// Which cap refused a connection; a bounded log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// [`ServerLimits::max_connections`].
    Total,
    /// [`ServerLimits::max_connections_per_ip`].
    PerIp,
}

impl Refused {
    /// A bounded label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerIp => "per_ip",
        }
    }
}

/// PURE: open connections per client IP, with a cap. Only IPs with open connections are kept.
#[derive(Debug, Default)]
pub(crate) struct PerIpCounts {
    open: HashMap<IpAddr, usize>,
}

impl PerIpCounts {
    /// Counts one more connection from `ip`, unless it already has `max` open.
    pub(crate) fn try_add(&mut self, ip: IpAddr, max: usize) -> bool {
        let open = self.open.entry(ip).or_insert(0);
        if *open >= max {
            if *open == 0 {
                self.open.remove(&ip);
            }
            return false;
        }
        *open += 1;
        true
    }

    /// Counts one connection from `ip` fewer.
    pub(crate) fn remove(&mut self, ip: IpAddr) {
        if let Some(open) = self.open.get_mut(&ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.open.remove(&ip);
            }
        }
    }

    /// Open connections from `ip`.
    #[cfg(test)]
    pub(crate) fn get(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).copied().unwrap_or(0)
    }

    /// IPs with open connections.
    #[cfg(test)]
    pub(crate) fn ips(&self) -> usize {
        self.open.len()
    }
}

/// Admits connections under both caps; each admitted one holds a [`ConnectionPermit`].
#[derive(Debug, Clone)]
pub(crate) struct ConnectionLimiter {
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<PerIpCounts>>,
    max_per_ip: usize,
}

/// An admitted connection; dropping it frees its place.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    _total: OwnedSemaphorePermit,
    per_ip: Arc<Mutex<PerIpCounts>>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.per_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.ip);
    }
}

impl ConnectionLimiter {
    /// A limiter for `limits`' connection caps.
    pub(crate) fn new(limits: &ServerLimits) -> Self {
        ConnectionLimiter {
            total: Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS))),
            per_ip: Arc::default(),
            max_per_ip: limits.max_connections_per_ip,
        }
    }

    /// Admits a connection from `ip`, or says which cap refuses it.
    pub(crate) fn try_admit(&self, ip: IpAddr) -> Result<ConnectionPermit, Refused> {
        let ip = ip.to_canonical();
        let total = self.total.clone().try_acquire_owned().map_err(|_| Refused::Total)?;
        let admitted = self
            .per_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_add(ip, self.max_per_ip);
        if !admitted {
            return Err(Refused::PerIp);
        }
        Ok(ConnectionPermit {
            _total: total,
            per_ip: self.per_ip.clone(),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn per_ip_counts_cap_each_ip_and_forget_closed_ones() {
        let mut counts = PerIpCounts::default();
        assert!(counts.try_add(A, 2));
        assert!(counts.try_add(A, 2));
        assert!(!counts.try_add(A, 2));
        assert!(counts.try_add(B, 2));
        assert_eq!((counts.get(A), counts.get(B)), (2, 1));
        counts.remove(A);
        assert!(counts.try_add(A, 2));
        counts.remove(A);
        counts.remove(A);
        counts.remove(B);
        counts.remove(B);
        assert_eq!(counts.ips(), 0);
        assert!(!counts.try_add(A, 0));
        assert_eq!(counts.ips(), 0);
    }

    fn limiter(total: usize, per_ip: usize) -> ConnectionLimiter {
        ConnectionLimiter::new(&ServerLimits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            ..ServerLimits::default()
        })
    }

    #[test]
    fn limiter_refuses_over_either_cap_and_frees_places_on_drop() {
        let limiter = limiter(3, 2);
        let a1 = limiter.try_admit(A).unwrap();
        let a2 = limiter.try_admit(A).unwrap();
        assert_eq!(limiter.try_admit(A).unwrap_err(), Refused::PerIp);
        let b1 = limiter.try_admit(B).unwrap();
        assert_eq!(limiter.try_admit(B).unwrap_err(), Refused::Total);
        drop(a1);
        // The freed total place goes to B, which is under its own cap.
        let b2 = limiter.try_admit(B).unwrap();
        assert_eq!(limiter.try_admit(A).unwrap_err(), Refused::Total);
        drop((a2, b1, b2));
        assert_eq!(limiter.per_ip.lock().unwrap().ips(), 0);
        assert_eq!(limiter.total.available_permits(), 3);
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_the_ipv4_address() {
        let limiter = limiter(10, 1);
        let _a = limiter.try_admit(A).unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(limiter.try_admit(mapped).unwrap_err(), Refused::PerIp);
    }

    #[test]
    fn defaults_allow_an_apiserver_sized_review() {
        let limits = ServerLimits::default();
        assert_eq!(limits.max_body_bytes, 3 * 1024 * 1024);
        assert!(limits.header_read_timeout < limits.idle_timeout);
        assert!(limits.max_connections_per_ip <= limits.max_connections);
    }
}
