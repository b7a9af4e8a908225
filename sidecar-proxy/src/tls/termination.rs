//! Server TLS on inbound ports with `tls` (HTTPS for an app that speaks plaintext): any client
//! gets the port's own certificate (not the workload's SPIFFE certificate), and with
//! `caCertificates` must present a client certificate leading to them (webpki). Mesh mTLS on the
//! same port is told apart by its ALPN before this is reached.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
};

use rustls::{
    ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier, sign::SingleCertAndKey,
};

use super::origination::{TlsFiles, ca_bundle, certified_key};
use crate::mesh::config::{InboundPolicy, ServerTls};

/// The server TLS configs of one config snapshot, by inbound port.
#[derive(Default, Clone)]
pub struct Terminations(BTreeMap<u16, Arc<ServerConfig>>);

impl Terminations {
    /// Builds the `tls` of every inbound port of `inbound` from `files` (read with the
    /// origination files, by `origination::read_files`).
    pub fn build(
        inbound: &InboundPolicy,
        files: &TlsFiles,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let mut built = BTreeMap::new();
        for (port, policy) in &inbound.ports {
            let Some(settings) = &policy.server_tls else {
                continue;
            };
            let config = server_config(settings, files, provider)
                .map_err(|error| format!("inbound port {port}: {error}"))?;
            built.insert(*port, config);
        }
        Ok(Terminations(built))
    }

    /// `None`: the port terminates no TLS of its own.
    pub fn get(&self, port: u16) -> Option<&Arc<ServerConfig>> {
        self.0.get(&port)
    }
}

/// Every file the inbound ports' `tls` settings name.
pub fn paths(inbound: &InboundPolicy) -> BTreeSet<&Path> {
    inbound
        .ports
        .values()
        .filter_map(|policy| policy.server_tls.as_ref())
        .flat_map(ServerTls::paths)
        .collect()
}

fn server_config(
    settings: &ServerTls,
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, String> {
    let file = |path: &Path| {
        files
            .get(path)
            .ok_or_else(|| format!("{} was not read", path.display()))
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?;
    let builder = match &settings.ca_certificates {
        Some(path) => {
            let roots = ca_bundle(file(path)?)
                .map_err(|error| format!("tls.caCertificates {}: {error}", path.display()))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|error| format!("tls.caCertificates {}: {error}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let (chain_path, key_path) = (&settings.server_certificate, &settings.private_key);
    let key = certified_key(file(chain_path)?, file(key_path)?, provider).map_err(|error| {
        format!(
            "tls.serverCertificate {}, privateKey {}: {error}",
            chain_path.display(),
            key_path.display()
        )
    })?;
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    config.alpn_protocols = settings
        .alpn
        .iter()
        .map(|alpn| alpn.id().to_vec())
        .collect();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{
        mesh::config::{PortPolicy, ServerAlpn},
        tls::{crypto_provider, server_pki::PartnerCa},
    };

    const CERT: &str = "/certs/tls.crt";
    const KEY: &str = "/certs/tls.key";
    const CA: &str = "/certs/ca.crt";

    fn inbound(port: u16, ca: Option<&str>) -> InboundPolicy {
        let tls = ServerTls {
            server_certificate: CERT.into(),
            private_key: KEY.into(),
            ca_certificates: ca.map(PathBuf::from),
            alpn: vec![ServerAlpn::Http2, ServerAlpn::Http1],
        };
        InboundPolicy {
            ports: BTreeMap::from([(
                port,
                PortPolicy {
                    server_tls: Some(tls),
                    ..PortPolicy::default()
                },
            )]),
            ..InboundPolicy::default()
        }
    }

    fn files(entries: &[(&str, &str)]) -> TlsFiles {
        entries
            .iter()
            .map(|(path, contents)| (PathBuf::from(path), contents.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn each_tls_port_gets_its_certificate_and_alpn() -> anyhow::Result<()> {
        let ca = PartnerCa::new("legacy CA")?;
        let server = ca.server(&["legacy.example"])?;
        let inbound = inbound(8443, Some(CA));
        assert_eq!(
            paths(&inbound).into_iter().collect::<Vec<_>>(),
            [Path::new(CA), Path::new(CERT), Path::new(KEY)]
        );
        let files = files(&[
            (CERT, &server.cert_pem),
            (KEY, &server.key_pem),
            (CA, ca.cert_pem()),
        ]);
        let built = Terminations::build(&inbound, &files, &crypto_provider())
            .map_err(anyhow::Error::msg)?;
        let config = built.get(8443).expect("port 8443 terminates TLS");
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(built.get(8080).is_none());
        Ok(())
    }

    #[test]
    fn a_bad_file_is_rejected_with_its_port_and_reason() -> anyhow::Result<()> {
        let ca = PartnerCa::new("legacy CA")?;
        let server = ca.server(&["legacy.example"])?;
        let other = ca.server(&["other.example"])?;
        let provider = crypto_provider();
        for (entries, ca_path, reason) in [
            (
                vec![(CERT, "garbage"), (KEY, server.key_pem.as_str())],
                None,
                "inbound port 8443: tls.serverCertificate /certs/tls.crt, privateKey /certs/tls.key: no PEM certificate found",
            ),
            (
                vec![
                    (CERT, server.cert_pem.as_str()),
                    (KEY, other.key_pem.as_str()),
                ],
                None,
                "the private key does not match the certificate",
            ),
            (
                vec![
                    (CERT, server.cert_pem.as_str()),
                    (KEY, server.key_pem.as_str()),
                ],
                Some(CA),
                "inbound port 8443: /certs/ca.crt was not read",
            ),
            (
                vec![
                    (CERT, server.cert_pem.as_str()),
                    (KEY, server.key_pem.as_str()),
                    (CA, "garbage"),
                ],
                Some(CA),
                "tls.caCertificates /certs/ca.crt: no PEM certificate found",
            ),
        ] {
            let error = Terminations::build(&inbound(8443, ca_path), &files(&entries), &provider)
                .err()
                .expect("rejected");
            assert!(error.contains(reason), "{error:?} lacks {reason:?}");
        }
        Ok(())
    }
}
