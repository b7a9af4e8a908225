//! This workload's certificate, key and trust bundles, parsed from PEM and checked together.
use std::sync::Arc;

use rustls::{
    crypto::CryptoProvider,
    pki_types::{PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use thiserror::Error;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{
    trust::{TrustBundles, certificates},
    verify::{IdentityError, spiffe_id_of},
};
use crate::mesh::identity::SpiffeId;

#[derive(Debug, Error)]
pub enum CertificateError {
    #[error("certificate chain: {0}")]
    Chain(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("the private key does not match the certificate: {0}")]
    KeyMismatch(rustls::Error),
    #[error("{0}")]
    Bundle(String),
    #[error("certificate identity: {0}")]
    Identity(#[from] IdentityError),
}

/// Everything a mesh handshake needs from this workload's files.
#[derive(Debug, Clone)]
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    /// The certificate's notAfter, in Unix seconds.
    pub not_after: i64,
    pub certified_key: Arc<CertifiedKey>,
    /// The roots of each trust domain whose peers are accepted (ours and federated ones).
    pub trust: Arc<TrustBundles>,
}

impl WorkloadCertificate {
    /// `bundles`: PEM roots per trust domain.
    pub fn from_pem<'a>(
        chain_pem: &[u8],
        key_pem: &[u8],
        bundles: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        provider: &CryptoProvider,
    ) -> Result<Self, CertificateError> {
        let chain = certificates(chain_pem).map_err(CertificateError::Chain)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| {
            CertificateError::Key(format!("no usable PEM private key: {error}"))
        })?;
        let certified_key = CertifiedKey::from_der(chain.clone(), key, provider)
            .map_err(CertificateError::KeyMismatch)?;

        let leaf = &chain[0];
        let identity = spiffe_id_of(leaf)?;
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|error| CertificateError::Chain(error.to_string()))?;
        let not_after = parsed.validity().not_after.timestamp();

        let trust = TrustBundles::from_pem(bundles).map_err(CertificateError::Bundle)?;
        Ok(WorkloadCertificate {
            identity,
            not_after,
            certified_key: Arc::new(certified_key),
            trust: Arc::new(trust),
        })
    }
}

/// A Unix time as RFC 3339 (UTC, seconds), for logs; a time before 1970 as its number.
pub fn rfc3339(unix_seconds: i64) -> String {
    match u64::try_from(unix_seconds) {
        Ok(seconds) => humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
        )
        .to_string(),
        Err(_) => format!("{unix_seconds} (Unix time)"),
    }
}
