//! Certificates outside the mesh (a partner's CA, a legacy server's), made with rcgen: the
//! mesh's own come from `sidecar certs` (`sidecar_tests::MeshPki`).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// A self-signed CA named `name`: its certificate PEM and its key.
pub fn self_signed_ca(name: &str) -> (String, KeyPair) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name = named(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), key)
}

/// The issuer of the CA `(ca_pem, ca_key)`.
pub fn issuer(ca: &(String, KeyPair)) -> Issuer<'static, KeyPair> {
    let ca_key = KeyPair::from_pem(&ca.1.serialize_pem()).expect("CA key");
    Issuer::from_ca_cert_pem(&ca.0, ca_key).expect("issuer")
}

/// A leaf signed by `issuer`: the certificate and key PEMs.
pub fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = named(common_name);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("certificate");
    (cert.pem(), key.serialize_pem())
}
