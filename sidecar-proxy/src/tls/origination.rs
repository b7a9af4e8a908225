//! TLS origination for HTTP services with `tls` (Istio's DestinationRule `trafficPolicy.tls`,
//! SIMPLE or MUTUAL): the app's plaintext request leaves as HTTPS. The server's chain must lead
//! to the service's CA bundle (or, without one, to the system's roots) and name the service's
//! server name (webpki); with MUTUAL we present the service's client certificate. A failed
//! handshake is a failed connect: nothing is ever sent in plaintext instead.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore,
    crypto::CryptoProvider,
    pki_types::{PrivateKeyDer, ServerName, pem::PemObject},
    sign::{CertifiedKey, SingleCertAndKey},
};
use tokio::{net::TcpStream, time::timeout};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::trust::certificates;
use crate::{
    Timeouts,
    http::config::{HttpConfig, ServiceTls},
    io::upstream::{self, ConnectFailure, Source},
    telemetry::metrics::FailureReason,
};

/// The contents of the files the services' `tls` settings name, by path.
pub type TlsFiles = BTreeMap<PathBuf, Vec<u8>>;

/// What the app speaks, offered to the server in ALPN: it hears the same protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    Http2,
}

/// A service's `tls` ready to use: a rustls config per ALPN, and what it was built from.
pub struct TlsOrigination {
    settings: ServiceTls,
    /// The bytes its trust and its client identity come from: the files, or the system's
    /// roots. Two originations are the same only when these are too.
    material: Vec<Vec<u8>>,
    server_name: Option<ServerName<'static>>,
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
}

/// Pooled connections are reused only under an equal origination: same settings, same CA
/// bundle, same client certificate.
impl PartialEq for TlsOrigination {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.material == other.material
    }
}

impl Eq for TlsOrigination {}

/// The settings only: the material holds a private key.
impl fmt::Debug for TlsOrigination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOrigination")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsOrigination {
    fn new(
        settings: &ServiceTls,
        files: &TlsFiles,
        system_roots: &mut SystemRoots,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let file = |path: &PathBuf| {
            files
                .get(path)
                .ok_or_else(|| format!("{} was not read", path.display()))
        };
        let mut material = Vec::new();
        let roots = match &settings.ca_certificates {
            Some(path) => {
                let pem = file(path)?;
                material.push(pem.clone());
                ca_bundle(pem)
                    .map_err(|error| format!("tls.caCertificates {}: {error}", path.display()))?
            }
            None => {
                let (roots, ders) = system_roots.get()?;
                material.extend(ders.iter().cloned());
                roots
            }
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_root_certificates(roots);
        let mut config = match (&settings.client_certificate, &settings.private_key) {
            (Some(chain_path), Some(key_path)) => {
                let (chain_pem, key_pem) = (file(chain_path)?, file(key_path)?);
                material.extend([chain_pem.clone(), key_pem.clone()]);
                let key = certified_key(chain_pem, key_pem, provider).map_err(|error| {
                    format!(
                        "tls.clientCertificate {}, privateKey {}: {error}",
                        chain_path.display(),
                        key_path.display()
                    )
                })?;
                builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key)))
            }
            _ => builder.with_no_client_auth(),
        };
        // Resumed sessions skip verification: sound, as the cache belongs to this config,
        // built for one CA bundle and server name (a reload builds a new one).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http1 = Arc::new(config.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = settings
            .sni
            .as_deref()
            .map(|name| ServerName::try_from(name.to_owned()))
            .transpose()
            .map_err(|error| format!("tls.sni: {error}"))?;
        Ok(TlsOrigination {
            settings: settings.clone(),
            material,
            server_name,
            http1,
            http2: Arc::new(config),
        })
    }

    /// Connects to `addr` and completes the handshake, verifying the server; any failure is a
    /// connect failure with its reason.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        alpn: Alpn,
        timeouts: &Timeouts,
    ) -> Result<TlsStream<TcpStream>, ConnectFailure> {
        let stream = upstream::connect(addr, Source::Any, timeouts).await?;
        // Without a server name, the endpoint's IP is what its certificate must carry.
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let shown = name.to_str().into_owned();
        let config = match alpn {
            Alpn::Http1 => &self.http1,
            Alpn::Http2 => &self.http2,
        };
        let handshake = TlsConnector::from(config.clone()).connect(name, stream);
        match timeout(timeouts.tls_handshake, handshake).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(ConnectFailure {
                reason: super::failure_reason(&error),
                error: format!(
                    "TLS origination to {addr} as {shown}: {}",
                    super::describe(&error)
                ),
            }),
            Err(_elapsed) => Err(ConnectFailure {
                reason: FailureReason::TlsHandshakeTimeout,
                error: format!(
                    "TLS origination to {addr} as {shown}: no handshake within {:?}",
                    timeouts.tls_handshake
                ),
            }),
        }
    }
}

/// The originations of one config snapshot, one per distinct `tls` setting.
#[derive(Default, Clone)]
pub struct Originations(Vec<Arc<TlsOrigination>>);

impl Originations {
    /// Builds the `tls` of every service of `http` from `files` (read by [`read_files`]); the
    /// system's roots are read once, if a service needs them.
    pub fn build(
        http: &HttpConfig,
        files: &TlsFiles,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, String> {
        let mut system_roots = SystemRoots::default();
        let mut built: Vec<Arc<TlsOrigination>> = Vec::new();
        for service in &http.services {
            let Some(settings) = &service.tls else {
                continue;
            };
            if built.iter().any(|known| known.settings == *settings) {
                continue;
            }
            let origination = TlsOrigination::new(settings, files, &mut system_roots, provider)
                .map_err(|error| format!("http service {:?}: {error}", service.name))?;
            built.push(Arc::new(origination));
        }
        Ok(Originations(built))
    }

    /// The origination built for `settings`; none when this snapshot has no service with them.
    pub fn get(&self, settings: &ServiceTls) -> Option<&Arc<TlsOrigination>> {
        self.0
            .iter()
            .find(|origination| origination.settings == *settings)
    }
}

/// Every file the services' `tls` settings name.
pub fn paths(http: &HttpConfig) -> BTreeSet<&Path> {
    http.services
        .iter()
        .filter_map(|service| service.tls.as_ref())
        .flat_map(ServiceTls::paths)
        .collect()
}

/// Reads every file of `paths` (those of [`paths`] and of the inbound ports' `tls`).
pub fn read_files<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<TlsFiles, String> {
    paths
        .into_iter()
        .map(|path| {
            std::fs::read(path)
                .map(|bytes| (path.to_owned(), bytes))
                .map_err(|error| format!("cannot read {}: {error}", path.display()))
        })
        .collect()
}

pub(super) fn ca_bundle(pem: &[u8]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for (index, root) in certificates(pem)?.into_iter().enumerate() {
        roots
            .add(root)
            .map_err(|error| format!("certificate {} is not a usable root: {error}", index + 1))?;
    }
    Ok(Arc::new(roots))
}

/// A chain and its key, checked to belong together.
pub(super) fn certified_key(
    chain_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let chain = certificates(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|error| format!("no usable PEM private key: {error}"))?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|error| format!("the private key does not match the certificate: {error}"))
}

/// The system's roots (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the distribution's bundle), read
/// at most once per build.
#[derive(Default)]
struct SystemRoots(Option<(Arc<RootCertStore>, Vec<Vec<u8>>)>);

impl SystemRoots {
    fn get(&mut self) -> Result<(Arc<RootCertStore>, &[Vec<u8>]), String> {
        let (roots, ders) = match self.0.take() {
            Some(loaded) => self.0.insert(loaded),
            None => self.0.insert(Self::load()?),
        };
        Ok((roots.clone(), ders))
    }

    fn load() -> Result<(Arc<RootCertStore>, Vec<Vec<u8>>), String> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(found.certs.iter().cloned());
        if roots.is_empty() {
            let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
            let errors = if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join("; "))
            };
            return Err(format!(
                "no `tls.caCertificates`, and no system root certificate found{errors}: \
                 give the CA bundle, or the system's (SSL_CERT_FILE)"
            ));
        }
        let ders = found.certs.iter().map(|cert| cert.to_vec()).collect();
        Ok((Arc::new(roots), ders))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;
    use crate::{
        http::config::TlsMode,
        testing::{LOCALHOST, timeouts},
        tls::{
            crypto_provider,
            server_pki::{HttpsServer, PartnerCa, ServerOptions, TLS_ONLY, start_https},
        },
    };

    const CA: &str = "/partner/ca.pem";
    const CLIENT_CERT: &str = "/partner/client.pem";
    const CLIENT_KEY: &str = "/partner/client-key.pem";

    fn simple(sni: Option<&str>) -> ServiceTls {
        ServiceTls {
            mode: TlsMode::Simple,
            sni: sni.map(str::to_owned),
            ca_certificates: Some(CA.into()),
            client_certificate: None,
            private_key: None,
        }
    }

    fn mutual(sni: &str) -> ServiceTls {
        ServiceTls {
            mode: TlsMode::Mutual,
            client_certificate: Some(CLIENT_CERT.into()),
            private_key: Some(CLIENT_KEY.into()),
            ..simple(Some(sni))
        }
    }

    fn files(entries: &[(&str, &str)]) -> TlsFiles {
        entries
            .iter()
            .map(|(path, contents)| (PathBuf::from(path), contents.as_bytes().to_vec()))
            .collect()
    }

    fn origination(settings: &ServiceTls, files: &TlsFiles) -> Result<TlsOrigination, String> {
        TlsOrigination::new(
            settings,
            files,
            &mut SystemRoots::default(),
            &crypto_provider(),
        )
    }

    /// GET `path` over an originated connection: the server's report.
    async fn get(stream: TlsStream<TcpStream>, path: &str) -> anyhow::Result<String> {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header(http::header::HOST, "api.partner")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let body = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_server_is_verified_by_its_ca_and_name_and_hears_the_apps_protocol()
    -> anyhow::Result<()> {
        let ca = PartnerCa::new("partner CA")?;
        let server = start_https(&ca.server(&["api.partner"])?, TLS_ONLY).await?;
        let tls = origination(&simple(Some("api.partner")), &files(&[(CA, ca.cert_pem())]))
            .map_err(anyhow::Error::msg)?;

        let stream = tls
            .connect(server.addr, Alpn::Http1, &timeouts())
            .await
            .map_err(|failure| anyhow::anyhow!(failure.error))?;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(
            get(stream, "/hello").await?,
            "transport=tls alpn=http/1.1 sni=api.partner client=- scheme=- path=/hello"
        );
        let stream = tls
            .connect(server.addr, Alpn::Http2, &timeouts())
            .await
            .map_err(|failure| anyhow::anyhow!(failure.error))?;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        Ok(())
    }

    #[tokio::test]
    async fn each_failure_has_its_reason_and_says_where_it_went() -> anyhow::Result<()> {
        let ca = PartnerCa::new("partner CA")?;
        let other_ca = PartnerCa::new("another CA")?;
        let server = start_https(&ca.server(&["api.partner"])?, TLS_ONLY).await?;
        let down = TcpListener::bind((LOCALHOST, 0)).await?.local_addr()?;
        // Answers plaintext HTTP to whatever it is sent.
        let plaintext = TcpListener::bind((LOCALHOST, 0)).await?;
        let plaintext_addr = plaintext.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = plaintext.accept().await {
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let cases = [
            (
                other_ca.cert_pem(),
                "api.partner",
                server.addr,
                FailureReason::PeerCertUnknownCa,
                "UnknownIssuer",
            ),
            (
                ca.cert_pem(),
                "wrong.partner",
                server.addr,
                FailureReason::PeerIdentityMismatch,
                "not valid for name \"wrong.partner\"",
            ),
            (
                ca.cert_pem(),
                "api.partner",
                down,
                FailureReason::ConnectRefused,
                "refused",
            ),
            (
                ca.cert_pem(),
                "api.partner",
                plaintext_addr,
                FailureReason::TlsHandshakeFailed,
                "TLS origination to",
            ),
        ];
        for (ca_pem, sni, addr, reason, words) in cases {
            let tls = origination(&simple(Some(sni)), &files(&[(CA, ca_pem)]))
                .map_err(anyhow::Error::msg)?;
            let failure = tls
                .connect(addr, Alpn::Http1, &timeouts())
                .await
                .err()
                .unwrap_or_else(|| panic!("{sni} at {addr} accepted"));
            assert_eq!(failure.reason, reason, "{}", failure.error);
            assert!(failure.error.contains(words), "{}", failure.error);
        }
        assert_eq!(HttpsServer::count(&server.requests), 0);
        Ok(())
    }

    #[tokio::test]
    async fn without_a_server_name_the_endpoint_ip_is_verified() -> anyhow::Result<()> {
        let ca = PartnerCa::new("partner CA")?;
        let ca_file = files(&[(CA, ca.cert_pem())]);
        let by_ip = start_https(&ca.server(&["127.0.0.1"])?, TLS_ONLY).await?;
        let by_name = start_https(&ca.server(&["api.partner"])?, TLS_ONLY).await?;
        let tls = origination(&simple(None), &ca_file).map_err(anyhow::Error::msg)?;
        let stream = tls
            .connect(by_ip.addr, Alpn::Http1, &timeouts())
            .await
            .map_err(|failure| anyhow::anyhow!(failure.error))?;
        assert!(
            get(stream, "/").await?.contains("sni=-"),
            "no SNI for an IP"
        );
        let failure = tls
            .connect(by_name.addr, Alpn::Http1, &timeouts())
            .await
            .expect_err("a certificate without the IP is refused");
        assert_eq!(failure.reason, FailureReason::PeerIdentityMismatch);
        Ok(())
    }

    #[tokio::test]
    async fn mutual_presents_the_client_certificate() -> anyhow::Result<()> {
        let ca = PartnerCa::new("partner CA")?;
        let client = ca.client("partner-client")?;
        let options = ServerOptions {
            client_ca: Some(ca.cert_pem()),
            also_plaintext: false,
        };
        let server = start_https(&ca.server(&["api.partner"])?, options).await?;
        let tls = origination(
            &mutual("api.partner"),
            &files(&[
                (CA, ca.cert_pem()),
                (CLIENT_CERT, &client.cert_pem),
                (CLIENT_KEY, &client.key_pem),
            ]),
        )
        .map_err(anyhow::Error::msg)?;
        let stream = tls
            .connect(server.addr, Alpn::Http1, &timeouts())
            .await
            .map_err(|failure| anyhow::anyhow!(failure.error))?;
        assert!(
            get(stream, "/").await?.contains("client=partner-client"),
            "the server saw our certificate"
        );
        Ok(())
    }

    #[test]
    fn files_that_do_not_make_a_tls_config_are_rejected_with_the_reason() -> anyhow::Result<()> {
        let ca = PartnerCa::new("partner CA")?;
        let client = ca.client("partner-client")?;
        let other = ca.client("other")?;
        let error = |settings: &ServiceTls, entries: &[(&str, &str)]| {
            origination(settings, &files(entries)).expect_err("rejected")
        };
        assert_eq!(
            error(&simple(None), &[(CA, "not PEM")]),
            "tls.caCertificates /partner/ca.pem: no PEM certificate found"
        );
        let mismatch = error(
            &mutual("api.partner"),
            &[
                (CA, ca.cert_pem()),
                (CLIENT_CERT, &client.cert_pem),
                (CLIENT_KEY, &other.key_pem),
            ],
        );
        assert!(
            mismatch.starts_with(
                "tls.clientCertificate /partner/client.pem, privateKey /partner/client-key.pem: the private key does not match"
            ),
            "{mismatch}"
        );
        let dir = tempfile::tempdir()?;
        let http: HttpConfig = serde_yaml::from_str(&format!(
            "services: [{{name: partner, tls: {{mode: SIMPLE, caCertificates: {}}}}}]",
            dir.path().join("missing.pem").display()
        ))?;
        let error = read_files(paths(&http)).expect_err("missing");
        assert!(
            error.starts_with(&format!(
                "cannot read {}: No such file",
                dir.path().join("missing.pem").display()
            )),
            "{error}"
        );
        Ok(())
    }

    #[test]
    fn an_origination_is_the_same_only_with_the_same_settings_and_files() -> anyhow::Result<()> {
        let ca = PartnerCa::new("partner CA")?;
        let other = PartnerCa::new("another CA")?;
        let build = |settings: &ServiceTls, ca_pem: &str| {
            origination(settings, &files(&[(CA, ca_pem)])).map_err(anyhow::Error::msg)
        };
        let first = build(&simple(Some("api.partner")), ca.cert_pem())?;
        assert_eq!(first, build(&simple(Some("api.partner")), ca.cert_pem())?);
        assert_ne!(
            first,
            build(&simple(Some("api.partner")), other.cert_pem())?
        );
        assert_ne!(first, build(&simple(Some("web.partner")), ca.cert_pem())?);
        let http: HttpConfig = serde_yaml::from_str(&format!(
            "services:\n  - {{name: a, tls: {{mode: SIMPLE, sni: x.partner, caCertificates: {CA}}}}}\n  - {{name: b, tls: {{mode: SIMPLE, sni: x.partner, caCertificates: {CA}}}}}\n"
        ))?;
        let built = Originations::build(&http, &files(&[(CA, ca.cert_pem())]), &crypto_provider())
            .map_err(anyhow::Error::msg)?;
        assert_eq!(built.0.len(), 1, "equal settings share one origination");
        Ok(())
    }
}
