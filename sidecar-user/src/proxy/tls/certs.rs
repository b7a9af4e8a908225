//! This workload's certificate, key and trust bundle, parsed from PEM and checked together.
use std::sync::Arc;

use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use thiserror::Error;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::verify::{IdentityError, spiffe_id_of};
use crate::proxy::identity::SpiffeId;

#[derive(Debug, Error)]
pub enum CertificateError {
    #[error("certificate chain: {0}")]
    Chain(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("the private key does not match the certificate: {0}")]
    KeyMismatch(rustls::Error),
    #[error("trust bundle: {0}")]
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
    pub roots: Arc<RootCertStore>,
}

impl WorkloadCertificate {
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        bundle_pem: &[u8],
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

        let mut roots = RootCertStore::empty();
        for (index, root) in certificates(bundle_pem)
            .map_err(CertificateError::Bundle)?
            .into_iter()
            .enumerate()
        {
            roots.add(root).map_err(|error| {
                CertificateError::Bundle(format!(
                    "certificate {} is not a usable root: {error}",
                    index + 1
                ))
            })?;
        }
        Ok(WorkloadCertificate {
            identity,
            not_after,
            certified_key: Arc::new(certified_key),
            roots: Arc::new(roots),
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

/// Every PEM certificate in `pem`, in order; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("invalid PEM: {error}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}
