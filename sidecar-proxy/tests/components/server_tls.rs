//! Inbound ports with `tls`, `forwardTo` and `rateLimit` on loopback, no root: an HTTPS client
//! outside the mesh, the inbound proxy with a watched plaintext mesh config whose connections
//! were all for 127.0.0.5:<app port> (as though captured on the pod IP), and an app listening on
//! 127.0.0.1 only, as a legacy app that cannot be changed.
use std::{net::SocketAddr, path::Path, sync::Arc};

use bytes::Bytes;
use http::{Request, StatusCode, header::HOST};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use sidecar_proxy::{
    telemetry::metrics::{Direction, FailureReason, Metrics},
    testing::*,
    tls::{crypto_provider, issue::Issued, server_pki::PartnerCa},
};

const SERVER_NAME: &str = "legacy.example";

/// Answers every request with `200 legacy`, on 127.0.0.1 only.
async fn start_legacy_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while stream.read(&mut byte).await? == 1 {
                    head.push(byte[0]);
                    if head.ends_with(b"\r\n\r\n") {
                        head.clear();
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlegacy")
                            .await?;
                    }
                }
                anyhow::Ok(())
            });
        }
    });
    Ok(addr)
}

/// The pod IP the client meant: loopback too (no root), but not where the app listens.
fn pod_ip_of(app: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 5], app.port()))
}

/// Writes the server certificate files into `dir` (renamed into place, as Kubernetes does).
fn write_certificate(dir: &Path, issued: &Issued) -> anyhow::Result<()> {
    replace(&dir.join("tls.key"), &issued.key_pem)?;
    replace(&dir.join("tls.crt"), &issued.cert_pem)?;
    Ok(())
}

/// A plaintext mesh config with `port`'s entry `port_settings` (YAML flow mapping fields).
fn write_config(dir: &Path, port: u16, port_settings: &str) -> anyhow::Result<()> {
    let text = format!("inbound:\n  ports:\n    - {{port: {port}, {port_settings}}}\n");
    replace(&dir.join("mesh.yaml"), &text)?;
    Ok(())
}

fn start_proxy(dir: &Path, app: SocketAddr) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new(&local("server"))?);
    let mesh = watched_mesh(&dir.join("mesh.yaml"), &metrics)?;
    start_inbound(pod_ip_of(app), mesh, metrics)
}

const TLS_SETTINGS: &str =
    "tls: {serverCertificate: tls.crt, privateKey: tls.key}, forwardTo: 127.0.0.1";

fn client_config(ca: &PartnerCa, client: Option<&Issued>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?)?;
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(issued) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn connect_tls(
    proxy: SocketAddr,
    config: Arc<ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let stream = TcpStream::connect(proxy).await?;
    let name = ServerName::try_from(SERVER_NAME)?;
    Ok(timeout(PATIENCE, TlsConnector::from(config).connect(name, stream)).await??)
}

/// The serial number of the certificate the server presented.
fn served_serial(stream: &TlsStream<TcpStream>) -> anyhow::Result<String> {
    let chain = stream.get_ref().1.peer_certificates().expect("a chain");
    let (_, cert) = X509Certificate::from_der(&chain[0])?;
    Ok(cert.raw_serial_as_string())
}

/// `GET /` over HTTPS on a connection of its own: the status and body.
async fn get(proxy: SocketAddr, config: Arc<ClientConfig>) -> anyhow::Result<(StatusCode, String)> {
    let stream = connect_tls(proxy, config).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get("/")
        .header(HOST, SERVER_NAME)
        .body(Full::<Bytes>::default())?;
    let response = timeout(PATIENCE, sender.send_request(request)).await??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn destination_requests(metrics: &Metrics, code: &str, flags: &str) -> f64 {
    request_series("destination", metrics)
        .into_iter()
        .filter(|(labels, _)| {
            let is = |name: &str, value: &str| labels.get(name).map(String::as_str) == Some(value);
            is("response_code", code)
                && is("response_flags", flags)
                && is("connection_security_policy", "none")
                && is("request_protocol", "http")
        })
        .map(|(_, count)| count)
        .sum()
}

#[tokio::test]
async fn https_clients_reach_a_localhost_only_app_and_are_reported() -> anyhow::Result<()> {
    let ca = PartnerCa::new("legacy CA")?;
    let dir = tempfile::tempdir()?;
    write_certificate(dir.path(), &ca.server(&[SERVER_NAME])?)?;
    let app = start_legacy_app().await?;
    write_config(dir.path(), app.port(), TLS_SETTINGS)?;
    let proxy = start_proxy(dir.path(), app)?;
    let config = client_config(&ca, None)?;
    for _ in 0..2 {
        assert_eq!(
            get(proxy.addr, config.clone()).await?,
            (StatusCode::OK, "legacy".into())
        );
    }
    let stream = connect_tls(proxy.addr, config.clone()).await?;
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "h2 is not offered by default: the app hears what the client speaks"
    );
    wait_until("2 requests reported", || {
        destination_requests(&proxy.metrics, "200", "-") == 2.0
    })
    .await;
    // Plaintext to a `tls` port is refused, not passed to the app.
    expect_refused(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let refused = FailureReason::PlaintextRefused;
    assert_eq!(proxy.metrics.failure_count(Direction::Inbound, refused), 1);
    Ok(())
}

#[tokio::test]
async fn without_forward_to_the_app_on_localhost_is_not_reached() -> anyhow::Result<()> {
    let ca = PartnerCa::new("legacy CA")?;
    let dir = tempfile::tempdir()?;
    write_certificate(dir.path(), &ca.server(&[SERVER_NAME])?)?;
    let app = start_legacy_app().await?;
    write_config(
        dir.path(),
        app.port(),
        "tls: {serverCertificate: tls.crt, privateKey: tls.key}",
    )?;
    let proxy = start_proxy(dir.path(), app)?;
    let (status, _) = get(proxy.addr, client_config(&ca, None)?).await?;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the pod IP: nobody"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_ca_refuses_clients_without_a_certificate_it_signed() -> anyhow::Result<()> {
    let ca = PartnerCa::new("legacy CA")?;
    let clients = PartnerCa::new("client CA")?;
    let dir = tempfile::tempdir()?;
    write_certificate(dir.path(), &ca.server(&[SERVER_NAME])?)?;
    replace(&dir.path().join("client-ca.crt"), clients.cert_pem())?;
    let app = start_legacy_app().await?;
    write_config(
        dir.path(),
        app.port(),
        "tls: {serverCertificate: tls.crt, privateKey: tls.key, caCertificates: client-ca.crt}, forwardTo: 127.0.0.1",
    )?;
    let proxy = start_proxy(dir.path(), app)?;
    let signed = clients.client("partner")?;
    assert_eq!(
        get(proxy.addr, client_config(&ca, Some(&signed))?).await?,
        (StatusCode::OK, "legacy".into())
    );
    let stranger = ca.client("stranger")?;
    for client in [None, Some(&stranger)] {
        // TLS 1.3: the client learns of the refusal at its first read.
        let refused = get(proxy.addr, client_config(&ca, client)?).await;
        assert!(refused.is_err(), "{client:?} accepted");
    }
    Ok(())
}

#[tokio::test]
async fn replaced_certificates_serve_new_connections_and_a_bad_one_is_rejected()
-> anyhow::Result<()> {
    let ca = PartnerCa::new("legacy CA")?;
    let dir = tempfile::tempdir()?;
    write_certificate(dir.path(), &ca.server(&[SERVER_NAME])?)?;
    let app = start_legacy_app().await?;
    write_config(dir.path(), app.port(), TLS_SETTINGS)?;
    let proxy = start_proxy(dir.path(), app)?;
    let config = client_config(&ca, None)?;
    let first = served_serial(&connect_tls(proxy.addr, config.clone()).await?)?;

    write_certificate(dir.path(), &ca.server(&[SERVER_NAME])?)?;
    let reloaded = [("result", "success")];
    wait_until("the new certificate loaded", || {
        metric(
            &proxy.metrics,
            "sidecar_certificate_reloads_total",
            &reloaded,
        ) == 1
    })
    .await;
    let second = served_serial(&connect_tls(proxy.addr, config.clone()).await?)?;
    assert_ne!(first, second, "a new connection gets the new certificate");

    replace(&dir.path().join("tls.crt"), "not a certificate")?;
    let rejected = [("result", "failure")];
    wait_until("the bad certificate rejected", || {
        metric(
            &proxy.metrics,
            "sidecar_certificate_reloads_total",
            &rejected,
        ) == 1
    })
    .await;
    let stream = connect_tls(proxy.addr, config.clone()).await?;
    assert_eq!(served_serial(&stream)?, second, "the old one keeps serving");
    assert_eq!(get(proxy.addr, config).await?.0, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn requests_beyond_the_ports_bucket_get_429_rl() -> anyhow::Result<()> {
    let ca = PartnerCa::new("legacy CA")?;
    let dir = tempfile::tempdir()?;
    write_certificate(dir.path(), &ca.server(&[SERVER_NAME])?)?;
    let app = start_legacy_app().await?;
    let limited = format!("{TLS_SETTINGS}, rateLimit: {{requestsPerSecond: 1, burst: 2}}");
    write_config(dir.path(), app.port(), &limited)?;
    let proxy = start_proxy(dir.path(), app)?;
    let config = client_config(&ca, None)?;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(proxy.addr, config.clone()).await?.0);
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited_count = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    // Within the test's few milliseconds the bucket refills at most one token.
    assert!(
        (2..=3).contains(&ok) && ok + limited_count == 4,
        "{statuses:?}"
    );
    wait_until("the 429s counted with RL", || {
        destination_requests(&proxy.metrics, "429", "RL") == limited_count as f64
    })
    .await;

    // A reload without the limit lifts it.
    write_config(dir.path(), app.port(), TLS_SETTINGS)?;
    let reloaded = [("result", "success")];
    wait_until("the config reloaded", || {
        metric(
            &proxy.metrics,
            "sidecar_mesh_config_reloads_total",
            &reloaded,
        ) == 1
    })
    .await;
    for _ in 0..4 {
        assert_eq!(get(proxy.addr, config.clone()).await?.0, StatusCode::OK);
    }
    Ok(())
}
