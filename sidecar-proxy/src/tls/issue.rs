//! Issuing certificates (rcgen): a lab CA and SPIFFE workload certificates, for tests, demos
//! and `sidecar certs`.
//!
//! Files use Istio's names: a CA directory holds `ca-cert.pem` and `ca-key.pem`; a workload
//! directory holds `cert-chain.pem`, `key.pem` and `root-cert.pem` (the trust bundle: the CA's
//! certificate).
use std::{fmt, time::Duration};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::{
    mesh::identity::{SpiffeId, validate_trust_domain},
    tls::rfc3339,
};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const DEFAULT_WORKLOAD_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Backdating absorbs clock skew between the machine that issues and the peers that verify.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now (backdated against clock skew) for `duration`.
    pub fn starting_now(duration: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - BACKDATE,
            not_after: now + duration,
        }
    }

    /// Expired an hour ago.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::from_secs(2 * 3600),
            not_after: now - Duration::from_secs(3600),
        }
    }
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to {}",
            rfc3339(self.not_before.unix_timestamp()),
            rfc3339(self.not_after.unix_timestamp())
        )
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A self-signed CA for `trust_domain`, named uniquely so several can share a trust bundle.
pub fn issue_ca(trust_domain: &str, validity: Validity) -> Result<Issued> {
    validate_trust_domain(trust_domain)?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    let fingerprint: String = key.public_key_raw()[1..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = lab_name(&format!("sidecar lab CA {trust_domain} {fingerprint}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A workload certificate for `identity`, signed by `ca`, usable for both mTLS sides.
pub fn issue_workload(ca: &Issued, identity: &SpiffeId, validity: Validity) -> Result<Issued> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("cannot read the CA key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).context("cannot read the CA certificate")?;
    let key = KeyPair::generate().context("cannot generate the workload key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = lab_name(&identity.to_string());
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the workload certificate")?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn lab_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "sidecar lab");
    name.push(DnType::CommonName, common_name);
    name
}

/// The trust domain a CA made by [`issue_ca`] records in its URI SAN.
pub fn ca_trust_domain(ca_cert_pem: &str) -> Result<String> {
    let der =
        CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).context("no PEM certificate")?;
    let (_, cert) = X509Certificate::from_der(&der).context("cannot parse the certificate")?;
    let san = cert
        .subject_alternative_name()
        .context("cannot parse the subject alternative names")?;
    san.into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix("spiffe://").map(str::to_owned),
            _ => None,
        })
        .context("the CA certificate records no trust domain (no `spiffe://` URI SAN); pass --trust-domain")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_certificate_carries_its_spiffe_id_and_validity() -> Result<()> {
        let ca = issue_ca("cluster.local", Validity::starting_now(DEFAULT_CA_VALIDITY))?;
        assert_eq!(ca_trust_domain(&ca.cert_pem)?, "cluster.local");
        let id = SpiffeId::new("cluster.local", "default", "client")?;
        let validity = Validity::starting_now(Duration::from_secs(3600));
        let workload = issue_workload(&ca, &id, validity)?;
        let der = CertificateDer::from_pem_slice(workload.cert_pem.as_bytes())?;
        assert_eq!(crate::tls::spiffe_id_of(&der)?, id);
        let (_, cert) = X509Certificate::from_der(&der)?;
        assert_eq!(
            cert.validity().not_after.timestamp(),
            validity.not_after.unix_timestamp()
        );
        Ok(())
    }

    #[test]
    fn two_cas_of_one_trust_domain_get_different_names() -> Result<()> {
        let subject = |ca: &Issued| -> Result<String> {
            let der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())?;
            let (_, cert) = X509Certificate::from_der(&der)?;
            Ok(cert.subject().to_string())
        };
        let validity = Validity::starting_now(DEFAULT_CA_VALIDITY);
        let (a, b) = (issue_ca("td", validity)?, issue_ca("td", validity)?);
        assert_ne!(subject(&a)?, subject(&b)?);
        Ok(())
    }
}
