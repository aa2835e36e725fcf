//! Self-managed webhook certificates: a CA of tailnode's own signs the serving certificate; both
//! live in one `kubernetes.io/tls` Secret and the CA goes into the webhook's `caBundle`.
//!
//! This module is pure (certificates in, certificates out, `now` passed in); [`objects`] maps
//! them to and from Kubernetes objects and [`cluster`] does the reads and writes.
//!
//! Stored certificates are trusted only after webpki verifies them (key pair, names, chain,
//! validity at `now` and through their notAfter); their validity is read from the DER.

use std::time::Duration as StdDuration;

use chrono::{DateTime, TimeDelta, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};

use crate::tls::{TlsError, certified_key_from_pem, certs_from_pem, crypto_provider};

/// `Debug` that lists only the named fields, so keys never reach a log.
macro_rules! redacted_debug {
    ($ty:ident { $($field:ident),* }) => {
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($field), &self.$field))*
                    .finish_non_exhaustive()
            }
        }
    };
}

pub mod cluster;
mod der;
mod error;
pub mod objects;
mod plan;

pub use cluster::{SelfManagedConfig, ensure_self_managed, run_rotation};
pub use error::CertError;
pub use plan::{IssueReason, Issued, Plan, Stored, plan};

/// How long a generated CA is valid.
pub const CA_VALIDITY: TimeDelta = TimeDelta::days(3650);
/// How long a serving certificate is valid.
pub const SERVING_VALIDITY: TimeDelta = TimeDelta::days(365);
/// Rotate at the latest when this much validity remains.
pub const MIN_REMAINING: TimeDelta = TimeDelta::days(30);
/// Certificates start this far in the past, for clocks that lag behind ours.
const BACKDATE: TimeDelta = TimeDelta::minutes(5);
/// The CA's subject; a stored CA key is turned back into an issuer with it.
const CA_COMMON_NAME: &str = "tailnode-webhook-ca";
const SERVING_COMMON_NAME: &str = "tailnode-webhook";
/// The latest instant X.509 validity can express with rcgen (9999-12-31T23:59:59Z).
const MAX_UNIX_SECS: i64 = 253_402_300_799;

/// A CA certificate and its private key, both PEM. `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub struct CaBundle {
    /// The CA certificate.
    pub cert_pem: String,
    /// The CA private key (PKCS#8).
    pub key_pem: String,
}

/// A serving certificate, its key and when it expires. `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    /// The serving certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// Its notAfter.
    pub not_after: DateTime<Utc>,
}

/// What the webhook server needs: serving certificate and key, and the CA bundle clients trust.
/// `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingMaterial {
    /// The serving certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The CA certificate(s) clients should trust: the signing CA first, then, right after a CA
    /// rotation, the previous CA.
    pub ca_pem: String,
    /// The serving certificate's notAfter.
    pub not_after: DateTime<Utc>,
}

redacted_debug!(CaBundle { cert_pem });
redacted_debug!(ServingCert { cert_pem, not_after });
redacted_debug!(ServingMaterial {
    cert_pem,
    ca_pem,
    not_after
});

/// Seconds since the epoch, checked to fit a certificate's validity.
fn unix_secs(at: DateTime<Utc>) -> Result<u64, CertError> {
    let secs = at.timestamp();
    if !(0..=MAX_UNIX_SECS).contains(&secs) {
        return Err(CertError::TimeOutOfRange { at });
    }
    u64::try_from(secs).map_err(|_| CertError::TimeOutOfRange { at })
}

/// `at` truncated to whole seconds (certificates carry no fractions).
fn whole_seconds(at: DateTime<Utc>) -> Result<DateTime<Utc>, CertError> {
    DateTime::from_timestamp(at.timestamp(), 0).ok_or(CertError::TimeOutOfRange { at })
}

/// Sets `params`' validity to `[from, until]`.
fn set_validity(params: &mut CertificateParams, from: DateTime<Utc>, until: DateTime<Utc>) -> Result<(), CertError> {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + StdDuration::from_secs(unix_secs(from)?);
    params.not_after = epoch + StdDuration::from_secs(unix_secs(until)?);
    Ok(())
}

/// The CA's parameters without validity. The issuer of a serving certificate is rebuilt from
/// these and the stored CA key, so they must not change between releases.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn add_secs(at: DateTime<Utc>, delta: TimeDelta) -> Result<DateTime<Utc>, CertError> {
    at.checked_add_signed(delta).ok_or(CertError::TimeOutOfRange { at })
}

/// A new CA (ECDSA P-256), valid from a few minutes before `now` for [`CA_VALIDITY`].
pub fn generate_ca(now: DateTime<Utc>) -> Result<CaBundle, CertError> {
    let key = KeyPair::generate().map_err(|source| CertError::GenerateKey { source })?;
    let mut params = ca_params();
    set_validity(&mut params, add_secs(now, -BACKDATE)?, add_secs(now, CA_VALIDITY)?)?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::SignCa { source })?;
    Ok(CaBundle {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A serving certificate for `dns_names` (IP addresses become IP SANs) signed by `ca`, valid for
/// [`SERVING_VALIDITY`]. Fails, rather than return a certificate nobody could verify, when `ca`
/// was not made by [`generate_ca`] or expires before the new certificate.
pub fn issue_serving(ca: &CaBundle, dns_names: &[String], now: DateTime<Utc>) -> Result<ServingCert, CertError> {
    if dns_names.is_empty() {
        return Err(CertError::NoDnsNames);
    }
    let not_after = whole_seconds(add_secs(now, SERVING_VALIDITY)?)?;
    let ca_not_after = not_after_from_pem(&ca.cert_pem)?;
    if ca_not_after < not_after {
        return Err(CertError::CaExpiresTooSoon { ca_not_after });
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|source| CertError::LoadCaKey { source })?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let key = KeyPair::generate().map_err(|source| CertError::GenerateKey { source })?;
    let mut params =
        CertificateParams::new(dns_names.to_vec()).map_err(|source| CertError::ServingParams { source })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, SERVING_COMMON_NAME);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, add_secs(now, -BACKDATE)?, not_after)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| CertError::SignServing { source })?;
    let serving = ServingCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    };
    // The CA key must belong to the CA certificate, and the names must be valid server names.
    verify_serving(&serving.cert_pem, &serving.key_pem, &ca.cert_pem, dns_names, &[now])?;
    Ok(serving)
}

/// The notAfter of the first certificate in `pem`.
pub fn not_after_from_pem(pem: &str) -> Result<DateTime<Utc>, CertError> {
    let certs = certs_from_pem(pem.as_bytes()).map_err(|source| CertError::LoadCert { source })?;
    certs
        .first()
        .and_then(|c| der::validity(c))
        .map(|(_, not_after)| not_after)
        .ok_or(CertError::ParseValidity)
}

/// Whether a serving certificate expiring at `not_after` should be replaced at `now`: when less
/// than a third of [`SERVING_VALIDITY`], or less than [`MIN_REMAINING`], is left.
pub fn needs_rotation(not_after: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    let threshold = std::cmp::max(SERVING_VALIDITY / 3, MIN_REMAINING);
    not_after.signed_duration_since(now) < threshold
}

/// Checks that `cert_pem` (leaf first, then any intermediates) and `key_pem` belong together and
/// that the leaf verifies for every one of `dns_names` against the CAs in `ca_pem`, at every
/// instant in `at`.
pub fn verify_serving(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    dns_names: &[String],
    at: &[DateTime<Utc>],
) -> Result<(), CertError> {
    if dns_names.is_empty() {
        return Err(CertError::NoDnsNames);
    }
    let load = |source| CertError::LoadCert { source };
    let certified = certified_key_from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).map_err(load)?;
    let (leaf, intermediates) = certified.cert.split_first().ok_or(CertError::LoadCert {
        source: TlsError::NoCertificate,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_from_pem(ca_pem.as_bytes()).map_err(load)? {
        roots.add(ca).map_err(|source| CertError::AddCa { source })?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.into(), crypto_provider())
        .build()
        .map_err(|source| CertError::BuildVerifier { source })?;
    for name in dns_names {
        let server_name =
            ServerName::try_from(name.as_str()).map_err(|_| CertError::ServerName { name: name.clone() })?;
        for &instant in at {
            let unix = UnixTime::since_unix_epoch(StdDuration::from_secs(unix_secs(instant)?));
            verifier
                .verify_server_cert(leaf, intermediates, &server_name, &[], unix)
                .map_err(|source| CertError::Verify {
                    name: name.clone(),
                    at: instant,
                    source,
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
