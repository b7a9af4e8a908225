//! Certificate verification for mesh mTLS: the chain against the trust bundle (webpki, through
//! rustls), then the SPIFFE ID in the URI SAN.
use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use thiserror::Error;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::proxy::identity::{SpiffeId, SpiffeIdError};

/// Why a certificate's identity is not acceptable.
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot parse the certificate: {0}")]
    Parse(String),
    #[error("the certificate has no URI SAN, so no SPIFFE ID")]
    Missing,
    #[error("the certificate has {0} URI SANs; a SPIFFE certificate has exactly one")]
    Several(usize),
    #[error(transparent)]
    Invalid(#[from] SpiffeIdError),
    #[error("the peer is {presented}, expected {expected}")]
    Unexpected {
        presented: SpiffeId,
        expected: String,
    },
}

impl From<IdentityError> for rustls::Error {
    fn from(error: IdentityError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    }
}

/// The SPIFFE ID in a certificate's only URI SAN.
pub fn spiffe_id_of(der: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|error| IdentityError::Parse(error.to_string()))?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(error) => return Err(IdentityError::Parse(error.to_string())),
    };
    match uris.as_slice() {
        [] => Err(IdentityError::Missing),
        [uri] => Ok(uri.parse()?),
        several => Err(IdentityError::Several(several.len())),
    }
}

/// The client side: the server must chain to the trust bundle and be one of the identities the
/// mesh config expects at that destination.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<SpiffeId>,
        provider: &CryptoProvider,
    ) -> Self {
        SpiffeServerVerifier {
            roots,
            expected,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Mesh peers are named by SPIFFE ID, not by DNS name or IP.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = spiffe_id_of(end_entity)?;
        if !self.expected.contains(&presented) {
            let expected = self
                .expected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(IdentityError::Unexpected {
                presented,
                expected,
            }
            .into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server side: a client certificate is mandatory, must chain to the trust bundle and carry
/// a SPIFFE ID (which authorization then looks at).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
}

impl SpiffeClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let chain = WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(SpiffeClientVerifier { chain })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn certificate(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).expect("certificate").der().clone()
    }

    fn uri(text: &str) -> SanType {
        SanType::URI(text.try_into().expect("IA5 string"))
    }

    #[test]
    fn exactly_one_spiffe_uri_san_is_an_identity() {
        let id = "spiffe://td/ns/a/sa/b";
        assert_eq!(
            spiffe_id_of(&certificate(vec![uri(id)]))
                .expect("identity")
                .to_string(),
            id
        );
        let dns_only = certificate(vec![SanType::DnsName(
            "a.example".try_into().expect("name"),
        )]);
        assert!(matches!(
            spiffe_id_of(&dns_only),
            Err(IdentityError::Missing)
        ));
        let two = certificate(vec![uri(id), uri("spiffe://td/ns/a/sa/c")]);
        assert!(matches!(spiffe_id_of(&two), Err(IdentityError::Several(2))));
        let not_spiffe = certificate(vec![uri("https://a.example/")]);
        assert!(matches!(
            spiffe_id_of(&not_spiffe),
            Err(IdentityError::Invalid(_))
        ));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            spiffe_id_of(&garbage),
            Err(IdentityError::Parse(_))
        ));
    }
}
