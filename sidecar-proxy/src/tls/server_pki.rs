//! Test rig for TLS origination: a partner's PKI (a CA, server certificates for DNS names and
//! IPs, client certificates), and an HTTPS server on loopback that answers each request with
//! what it saw: the transport, ALPN, SNI, the client certificate, the scheme and the path.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::{
    testing::LOCALHOST,
    tls::{crypto_provider, issue::Issued},
};

/// A CA outside the mesh (a partner's, or a public one).
pub struct PartnerCa(Issued);

impl PartnerCa {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = named(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(PartnerCa(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }))
    }

    pub fn cert_pem(&self) -> &str {
        &self.0.cert_pem
    }

    /// A server certificate for `names` (DNS names, or IPs).
    pub fn server(&self, names: &[&str]) -> anyhow::Result<Issued> {
        let sans = names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*name).try_into()?)),
            })
            .collect::<anyhow::Result<_>>()?;
        self.issue(names[0], sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate named `name` (its common name).
    pub fn client(&self, name: &str) -> anyhow::Result<Issued> {
        self.issue(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<Issued> {
        let issuer =
            Issuer::from_ca_cert_pem(&self.0.cert_pem, KeyPair::from_pem(&self.0.key_pem)?)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = named(common_name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// An HTTPS server on loopback, and what it has seen.
pub struct HttpsServer {
    pub addr: SocketAddr,
    pub tls_connections: Arc<AtomicUsize>,
    pub plaintext_connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
}

impl HttpsServer {
    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }
}

/// How the server treats its clients.
pub struct ServerOptions<'a> {
    /// Require a client certificate issued by this CA.
    pub client_ca: Option<&'a str>,
    /// Serve plaintext HTTP/1 too, on the same port (told apart by the first byte), to see
    /// which one a client uses.
    pub also_plaintext: bool,
}

pub const TLS_ONLY: ServerOptions<'static> = ServerOptions {
    client_ca: None,
    also_plaintext: false,
};

/// Serves `certificate` (ALPN h2 and http/1.1) until the test ends.
pub async fn start_https(
    certificate: &Issued,
    options: ServerOptions<'_>,
) -> anyhow::Result<HttpsServer> {
    let chain = CertificateDer::pem_slice_iter(certificate.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(certificate.key_pem.as_bytes())?;
    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match options.client_ca {
        Some(ca_pem) => {
            let mut roots = RootCertStore::empty();
            for root in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(root?)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let server = HttpsServer {
        addr: listener.local_addr()?,
        tls_connections: Arc::default(),
        plaintext_connections: Arc::default(),
        requests: Arc::default(),
    };
    let (tls_connections, plaintext_connections, requests) = (
        server.tls_connections.clone(),
        server.plaintext_connections.clone(),
        server.requests.clone(),
    );
    let also_plaintext = options.also_plaintext;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, requests) = (acceptor.clone(), requests.clone());
            let (tls_connections, plaintext_connections) =
                (tls_connections.clone(), plaintext_connections.clone());
            tokio::spawn(async move {
                if also_plaintext && !starts_with_tls(&stream).await {
                    plaintext_connections.fetch_add(1, Ordering::SeqCst);
                    let seen = Seen::plaintext();
                    let _ = serve(stream, false, seen, requests).await;
                    return;
                }
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                tls_connections.fetch_add(1, Ordering::SeqCst);
                let (_, connection) = stream.get_ref();
                let seen = Seen {
                    transport: "tls",
                    alpn: connection
                        .alpn_protocol()
                        .map(|alpn| String::from_utf8_lossy(alpn).into_owned()),
                    sni: connection.server_name().map(str::to_owned),
                    client: connection
                        .peer_certificates()
                        .and_then(|chain| common_name(chain.first()?)),
                };
                let http2 = seen.alpn.as_deref() == Some("h2");
                let _ = serve(stream, http2, seen, requests).await;
            });
        }
    });
    Ok(server)
}

/// A TLS record starts with 0x16 (handshake); an HTTP request with a letter.
async fn starts_with_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16)
}

fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}

/// What a connection's handshake showed.
#[derive(Clone)]
struct Seen {
    transport: &'static str,
    alpn: Option<String>,
    sni: Option<String>,
    client: Option<String>,
}

impl Seen {
    fn plaintext() -> Self {
        Seen {
            transport: "plaintext",
            alpn: None,
            sni: None,
            client: None,
        }
    }
}

async fn serve<S>(
    stream: S,
    http2: bool,
    seen: Seen,
    requests: Arc<AtomicUsize>,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        requests.fetch_add(1, Ordering::SeqCst);
        let none = || "-".to_owned();
        let body = format!(
            "transport={} alpn={} sni={} client={} scheme={} path={}",
            seen.transport,
            seen.alpn.clone().unwrap_or_else(none),
            seen.sni.clone().unwrap_or_else(none),
            seen.client.clone().unwrap_or_else(none),
            request.uri().scheme_str().unwrap_or("-"),
            request.uri().path(),
        );
        async move { Response::builder().body(Full::new(Bytes::from(body))) }
    });
    let io = TokioIo::new(stream);
    if http2 {
        http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await
            .context("HTTP/2")
    } else {
        http1::Builder::new()
            .serve_connection(io, service)
            .await
            .context("HTTP/1")
    }
}
