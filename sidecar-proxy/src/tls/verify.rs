//! Certificate verification for mesh mTLS: the SPIFFE ID in the URI SAN first, which names the
//! peer's trust domain, then the chain against that trust domain's roots only (webpki, through
//! rustls).
use std::{collections::BTreeMap, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, VerifierBuilderError, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use thiserror::Error;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::trust::TrustBundles;
use crate::mesh::identity::{SpiffeId, SpiffeIdError};

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

/// Why a certificate's chain is not trusted for the identity it carries.
#[derive(Debug, Error)]
pub enum TrustError {
    #[error(
        "the peer is {presented}, of the trust domain {}, which has no trust bundle here",
        .presented.trust_domain()
    )]
    UnknownTrustDomain { presented: SpiffeId },
    #[error(
        "the peer claims {presented}, but its chain leads to no root of the trust bundle of {}",
        .presented.trust_domain()
    )]
    NotIssuedInTrustDomain { presented: SpiffeId },
}

impl From<TrustError> for rustls::Error {
    fn from(error: TrustError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    }
}

/// A chain that leads to no root of `presented`'s trust domain says so in words; other chain
/// errors (expired, not yet valid...) stay as they are.
fn untrusted(error: rustls::Error, presented: &SpiffeId) -> rustls::Error {
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => TrustError::NotIssuedInTrustDomain {
            presented: presented.clone(),
        }
        .into(),
        other => other,
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

/// The client side: the server must chain to a root of its own trust domain and be one of the
/// identities the mesh config expects at that destination.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Arc<TrustBundles>,
    expected: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(
        trust: Arc<TrustBundles>,
        expected: Vec<SpiffeId>,
        provider: &CryptoProvider,
    ) -> Self {
        SpiffeServerVerifier {
            trust,
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
        let presented = spiffe_id_of(end_entity)?;
        let roots = self.trust.roots(presented.trust_domain()).ok_or_else(|| {
            TrustError::UnknownTrustDomain {
                presented: presented.clone(),
            }
        })?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(|error| untrusted(error, &presented))?;
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

/// The server side: a client certificate is mandatory, must carry a SPIFFE ID (which
/// authorization then looks at) and chain to a root of that ID's trust domain: one webpki
/// verifier per trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    by_trust_domain: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    /// The subjects of every root, sent in the CertificateRequest.
    root_hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(
        trust: &TrustBundles,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, VerifierBuilderError> {
        let by_trust_domain = trust
            .iter()
            .map(|(trust_domain, roots)| {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                        .build()?;
                Ok((trust_domain.to_owned(), verifier))
            })
            .collect::<Result<BTreeMap<_, _>, VerifierBuilderError>>()?;
        let root_hints = by_trust_domain
            .values()
            .flat_map(|verifier| verifier.root_hint_subjects().iter().cloned())
            .collect();
        Ok(SpiffeClientVerifier {
            by_trust_domain,
            root_hints,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = spiffe_id_of(end_entity)?;
        let verifier = self
            .by_trust_domain
            .get(presented.trust_domain())
            .ok_or_else(|| TrustError::UnknownTrustDomain {
                presented: presented.clone(),
            })?;
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|error| untrusted(error, &presented))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::tls::issue::{Issued, Validity, issue_ca, issue_workload};

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

    fn validity() -> Validity {
        Validity::starting_now(Duration::from_secs(3600))
    }

    /// A certificate for `id`, issued by `ca`.
    fn issued_by(ca: &Issued, id: &str) -> CertificateDer<'static> {
        let id: SpiffeId = id.parse().expect("SPIFFE ID");
        let issued = issue_workload(ca, &id, validity()).expect("certificate");
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("PEM")
    }

    /// Our CA for cluster.local, a partner's for partner.example, trusted each for its own.
    struct Federation {
        local: Issued,
        partner: Issued,
        trust: Arc<TrustBundles>,
    }

    fn federation() -> Federation {
        let local = issue_ca("cluster.local", validity()).expect("CA");
        let partner = issue_ca("partner.example", validity()).expect("CA");
        let trust = TrustBundles::from_pem([
            ("cluster.local", local.cert_pem.as_bytes()),
            ("partner.example", partner.cert_pem.as_bytes()),
        ])
        .expect("bundles");
        Federation {
            local,
            partner,
            trust: Arc::new(trust),
        }
    }

    const LOCAL_ID: &str = "spiffe://cluster.local/ns/x/sa/y";
    const PARTNER_ID: &str = "spiffe://partner.example/ns/x/sa/y";

    /// The chain error of a refused certificate, in words.
    fn refusal(result: Result<(), rustls::Error>) -> String {
        match result.expect_err("refused") {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                assert!(other.0.downcast_ref::<TrustError>().is_some(), "{other:?}");
                other.0.to_string()
            }
            other => panic!("not a trust error: {other:?}"),
        }
    }

    #[test]
    fn a_client_chain_is_verified_against_its_own_trust_domain_only() {
        let federation = federation();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = SpiffeClientVerifier::new(&federation.trust, provider).expect("verifier");
        let verify = |cert: CertificateDer<'_>| {
            verifier
                .verify_client_cert(&cert, &[], UnixTime::now())
                .map(drop)
        };

        verify(issued_by(&federation.local, LOCAL_ID)).expect("ours, by our CA");
        verify(issued_by(&federation.partner, PARTNER_ID)).expect("theirs, by their CA");
        assert_eq!(
            refusal(verify(issued_by(&federation.partner, LOCAL_ID))),
            "the peer claims spiffe://cluster.local/ns/x/sa/y, but its chain leads to no root of the trust bundle of cluster.local"
        );
        assert_eq!(
            refusal(verify(issued_by(&federation.local, PARTNER_ID))),
            "the peer claims spiffe://partner.example/ns/x/sa/y, but its chain leads to no root of the trust bundle of partner.example"
        );
        assert_eq!(
            refusal(verify(issued_by(
                &federation.partner,
                "spiffe://other.example/ns/x/sa/y"
            ))),
            "the peer is spiffe://other.example/ns/x/sa/y, of the trust domain other.example, which has no trust bundle here"
        );
        assert_eq!(
            verifier.root_hint_subjects().len(),
            2,
            "both domains' roots are hinted"
        );
    }

    #[test]
    fn a_server_chain_is_verified_against_its_own_trust_domain_only() {
        let federation = federation();
        let provider = rustls::crypto::ring::default_provider();
        let expected = [LOCAL_ID, PARTNER_ID].map(|id| id.parse().expect("SPIFFE ID"));
        let verifier =
            SpiffeServerVerifier::new(federation.trust.clone(), expected.to_vec(), &provider);
        let server_name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let verify = |cert: CertificateDer<'_>| {
            verifier
                .verify_server_cert(&cert, &[], &server_name, &[], UnixTime::now())
                .map(drop)
        };

        verify(issued_by(&federation.local, LOCAL_ID)).expect("ours, by our CA");
        verify(issued_by(&federation.partner, PARTNER_ID)).expect("theirs, by their CA");
        assert!(
            refusal(verify(issued_by(&federation.partner, LOCAL_ID)))
                .ends_with("no root of the trust bundle of cluster.local")
        );
        assert!(
            refusal(verify(issued_by(&federation.local, PARTNER_ID)))
                .ends_with("no root of the trust bundle of partner.example")
        );
        assert!(
            refusal(verify(issued_by(
                &federation.local,
                "spiffe://other.example/ns/x/sa/y"
            )))
            .ends_with("which has no trust bundle here")
        );
    }
}
