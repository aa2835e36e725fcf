//! Pure decision: keep the stored material, reissue with the stored CA, or start a new CA.

use chrono::{DateTime, Utc};

use super::{
    CaBundle, CertError, ServingMaterial, generate_ca, issue_serving, needs_rotation, not_after_from_pem,
    verify_serving,
};

/// Whatever a Secret held; every part may be missing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// `tls.crt`.
    pub cert_pem: Option<String>,
    /// `tls.key`.
    pub key_pem: Option<String>,
    /// `ca.crt`.
    pub ca_pem: Option<String>,
    /// `ca.key`.
    pub ca_key_pem: Option<String>,
}

redacted_debug!(Stored { cert_pem, ca_pem });

/// Why new material is being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// No usable serving certificate was stored (missing, invalid, wrong names).
    Missing,
    /// The stored serving certificate is close to expiry.
    Expiring,
}

impl IssueReason {
    /// A bounded label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueReason::Missing => "missing",
            IssueReason::Expiring => "expiring",
        }
    }
}

/// New material to store: what to serve, plus the CA key to keep for the next rotation.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// Serving certificate, key and CA bundle.
    pub material: ServingMaterial,
    /// The key of the first CA in `material.ca_pem`.
    pub ca_key_pem: String,
    /// Why it was issued.
    pub reason: IssueReason,
    /// Whether a new CA was generated (the caBundle changes).
    pub new_ca: bool,
}

redacted_debug!(Issued {
    material,
    reason,
    new_ca
});

/// What to do with what a Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The stored material is good; serve it.
    Keep(ServingMaterial),
    /// Store and serve new material.
    Issue(Box<Issued>),
}

/// The stored serving material, when it is complete, verifies for `dns_names` at `now`, its
/// signing CA outlives it, and it is not yet due for rotation.
fn usable(stored: &Stored, dns_names: &[String], now: DateTime<Utc>) -> Result<ServingMaterial, IssueReason> {
    let (Some(cert_pem), Some(key_pem), Some(ca_pem)) = (&stored.cert_pem, &stored.key_pem, &stored.ca_pem) else {
        return Err(IssueReason::Missing);
    };
    let not_after = not_after_from_pem(cert_pem).map_err(|_| IssueReason::Missing)?;
    let ca_not_after = first_pem_block(ca_pem)
        .and_then(|ca| not_after_from_pem(ca).ok())
        .ok_or(IssueReason::Missing)?;
    if ca_not_after < not_after {
        return Err(IssueReason::Missing);
    }
    verify_serving(cert_pem, key_pem, ca_pem, dns_names, &[now]).map_err(|_| IssueReason::Missing)?;
    if needs_rotation(not_after, now) {
        return Err(IssueReason::Expiring);
    }
    Ok(ServingMaterial {
        cert_pem: cert_pem.clone(),
        key_pem: key_pem.clone(),
        ca_pem: ca_pem.clone(),
        not_after,
    })
}

/// The first PEM block of `pem`, with its END line.
fn first_pem_block(pem: &str) -> Option<&str> {
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find("-----BEGIN CERTIFICATE-----")?;
    let end = pem.get(start..)?.find(END)? + start + END.len();
    pem.get(start..end)
}

/// Decides, purely, what to do with `stored` at `now`: keep it; or issue a serving certificate
/// with the stored CA; or, when that CA is missing, broken or expires too soon, with a new CA.
/// After a CA change the previous CA stays in the bundle while it and the stored serving
/// certificate it signed are still valid, so servers that have not reloaded yet stay trusted.
pub fn plan(stored: &Stored, dns_names: &[String], now: DateTime<Utc>) -> Result<Plan, CertError> {
    if dns_names.is_empty() {
        return Err(CertError::NoDnsNames);
    }
    let reason = match usable(stored, dns_names, now) {
        Ok(material) => return Ok(Plan::Keep(material)),
        Err(reason) => reason,
    };
    if let (Some(ca_pem), Some(ca_key_pem)) = (&stored.ca_pem, &stored.ca_key_pem)
        && let Some(ca_cert_pem) = first_pem_block(ca_pem)
    {
        let ca = CaBundle {
            cert_pem: ca_cert_pem.to_string(),
            key_pem: ca_key_pem.clone(),
        };
        if let Ok(serving) = issue_serving(&ca, dns_names, now) {
            return Ok(Plan::Issue(Box::new(Issued {
                material: ServingMaterial {
                    cert_pem: serving.cert_pem,
                    key_pem: serving.key_pem,
                    ca_pem: ca_pem.clone(),
                    not_after: serving.not_after,
                },
                ca_key_pem: ca.key_pem,
                reason,
                new_ca: false,
            })));
        }
    }
    let ca = generate_ca(now)?;
    let serving = issue_serving(&ca, dns_names, now)?;
    let mut bundle = ca.cert_pem.clone();
    if let (Some(cert_pem), Some(key_pem), Some(old_bundle)) = (&stored.cert_pem, &stored.key_pem, &stored.ca_pem)
        && let Some(old_ca) = first_pem_block(old_bundle)
        && not_after_from_pem(old_ca).is_ok_and(|ca_not_after| ca_not_after > now)
        && verify_serving(cert_pem, key_pem, old_ca, dns_names, &[now]).is_ok()
    {
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(old_ca);
        bundle.push('\n');
    }
    Ok(Plan::Issue(Box::new(Issued {
        material: ServingMaterial {
            cert_pem: serving.cert_pem,
            key_pem: serving.key_pem,
            ca_pem: bundle,
            not_after: serving.not_after,
        },
        ca_key_pem: ca.key_pem,
        reason,
        new_ca: true,
    })))
}
