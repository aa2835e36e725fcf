//! The error of certificate management.

use chrono::{DateTime, Utc};

use crate::tls::TlsError;

/// What went wrong managing webhook certificates. Variants name the step.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// No DNS name to issue the serving certificate for.
    #[error("no DNS names for the serving certificate")]
    NoDnsNames,
    /// A time outside what a certificate can express.
    #[error("time {at} is outside the range of X.509 validity")]
    TimeOutOfRange {
        /// The offending time.
        at: DateTime<Utc>,
    },
    /// Generating a private key failed.
    #[error("generating a private key")]
    GenerateKey {
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// The stored CA key could not be loaded.
    #[error("loading the CA private key")]
    LoadCaKey {
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// The serving certificate parameters were refused (e.g. an invalid DNS name).
    #[error("building the serving certificate parameters")]
    ServingParams {
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// Self-signing the CA certificate failed.
    #[error("signing the CA certificate")]
    SignCa {
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// Signing the serving certificate failed.
    #[error("signing the serving certificate")]
    SignServing {
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate or key did not load.
    #[error("loading a certificate")]
    LoadCert {
        /// The TLS error.
        #[source]
        source: TlsError,
    },
    /// A certificate's validity could not be read.
    #[error("reading the validity of a certificate")]
    ParseValidity,
    /// The CA expires before a serving certificate issued now would.
    #[error("the CA expires at {ca_not_after}, before a new serving certificate would")]
    CaExpiresTooSoon {
        /// The CA's notAfter.
        ca_not_after: DateTime<Utc>,
    },
    /// A DNS name is not a valid TLS server name.
    #[error("{name:?} is not a valid server name")]
    ServerName {
        /// The name.
        name: String,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("adding a CA certificate as trust anchor")]
    AddCa {
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The CA bundle could not be turned into a verifier.
    #[error("building a verifier from the CA bundle")]
    BuildVerifier {
        /// The rustls error.
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    /// The serving certificate does not verify against the CA bundle.
    #[error("verifying the serving certificate for {name:?} at {at}")]
    Verify {
        /// The DNS name checked.
        name: String,
        /// The time checked.
        at: DateTime<Utc>,
        /// The webpki error.
        #[source]
        source: rustls::Error,
    },
    /// Reading the certificate Secret failed.
    #[error("reading Secret {namespace}/{name}")]
    ReadSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing (create, replace or delete-and-recreate) the certificate Secret failed.
    #[error("writing Secret {namespace}/{name}")]
    WriteSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Other writers kept winning the race for the Secret or the webhook configuration.
    #[error("gave up on {what} after {attempts} conflicting writes")]
    Contended {
        /// `Secret` or `MutatingWebhookConfiguration`.
        what: &'static str,
        /// How many attempts were made.
        attempts: usize,
    },
    /// Reading the MutatingWebhookConfiguration failed.
    #[error("reading MutatingWebhookConfiguration {name}")]
    ReadWebhookConfig {
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Building the caBundle JSON patch failed.
    #[error("building the caBundle patch")]
    BuildPatch {
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Patching the caBundle of the MutatingWebhookConfiguration failed.
    #[error("patching the caBundle of MutatingWebhookConfiguration {name}")]
    PatchWebhookConfig {
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl CertError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CertError::NoDnsNames | CertError::ServerName { .. } | CertError::ServingParams { .. } => "config",
            CertError::TimeOutOfRange { .. } => "time",
            CertError::GenerateKey { .. }
            | CertError::LoadCaKey { .. }
            | CertError::SignCa { .. }
            | CertError::SignServing { .. } => "issue",
            CertError::LoadCert { .. }
            | CertError::ParseValidity
            | CertError::CaExpiresTooSoon { .. }
            | CertError::AddCa { .. }
            | CertError::BuildVerifier { .. }
            | CertError::Verify { .. } => "verify",
            CertError::ReadSecret { .. } => "read_secret",
            CertError::WriteSecret { .. } => "write_secret",
            CertError::Contended { .. } => "contended",
            CertError::ReadWebhookConfig { .. } => "read_webhook",
            CertError::BuildPatch { .. } | CertError::PatchWebhookConfig { .. } => "patch_webhook",
        }
    }
}
