//! TLS origination end to end on loopback, no root: the app's plaintext HTTP to the outbound
//! proxy (original destination fixed, as though redirected) leaves as HTTPS to a partner's
//! server, per the watched mesh config's `http.services[].tls`.
use std::{net::SocketAddr, path::Path, sync::Arc};

use bytes::Bytes;
use http::{Request, StatusCode, header::HOST};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};

use sidecar_proxy::{
    http::HttpConfig,
    mesh::{Mesh, MeshHandle},
    telemetry::metrics::Metrics,
    testing::*,
    tls::server_pki::{HttpsServer, PartnerCa, ServerOptions, TLS_ONLY, start_https},
};

/// A loopback port nothing listens on.
async fn closed_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((LOCALHOST, 0))
        .await?
        .local_addr()?
        .port())
}

/// An outbound proxy routing with the `http` section `http` (plaintext: no identity), watched
/// in `dir`, whose connections were all for `orig_dst`.
fn proxy_with(dir: &Path, http: &str, orig_dst: SocketAddr) -> anyhow::Result<Running> {
    let config = dir.join("mesh.yaml");
    replace(&config, http)?;
    let metrics = Arc::new(Metrics::new(&local("client"))?);
    let mesh = watched_mesh(&config, &metrics)?;
    start_outbound(|_| orig_dst, mesh, metrics, timeouts())
}

/// The status and body of `GET path` with `Host: host`, over HTTP/1 to the proxy.
async fn get(proxy: SocketAddr, host: &str, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let stream = TcpStream::connect(proxy).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(HOST, host)
        .body(Full::<Bytes>::default())?;
    let response = timeout(PATIENCE, sender.send_request(request)).await??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn wait_for_metric(metrics: &Metrics, name: &str, labels: &[(&str, &str)], value: u64) {
    wait_until(&format!("{name}{labels:?} = {value}"), || {
        metric(metrics, name, labels) == value
    })
    .await;
}

#[tokio::test]
async fn plaintext_requests_leave_as_https_on_the_target_port() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = PartnerCa::new("partner CA")?;
    replace(&dir.path().join("partner-ca.pem"), ca.cert_pem())?;
    let server = start_https(&ca.server(&["api.partner"])?, TLS_ONLY).await?;
    // The app dials a port where nothing listens: only the rewrite reaches the server.
    let orig_dst = SocketAddr::new(LOCALHOST, closed_port().await?);
    let proxy = proxy_with(
        dir.path(),
        &format!(
            "http:
  services:
    - name: partner
      hosts: [api.partner]
      targetPort: {}
      tls: {{mode: SIMPLE, caCertificates: partner-ca.pem}}
",
            server.addr.port()
        ),
        orig_dst,
    )?;

    for _ in 0..2 {
        let (status, body) = get(proxy.addr, "api.partner", "/hello").await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            "transport=tls alpn=http/1.1 sni=api.partner client=- scheme=- path=/hello"
        );
    }
    assert_eq!(
        HttpsServer::count(&server.tls_connections),
        1,
        "the second request reused the pooled TLS connection"
    );

    // h2c from the app leaves as h2 over TLS, with the https scheme.
    let stream = TcpStream::connect(proxy.addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get("http://api.partner/h2").body(Full::<Bytes>::default())?;
    let response = timeout(PATIENCE, sender.send_request(request)).await??;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await?.to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "transport=tls alpn=h2 sni=api.partner client=- scheme=https path=/h2"
    );
    wait_for_metric(
        &proxy.metrics,
        "istio_requests_total",
        &[
            ("destination_service_name", "partner"),
            ("response_code", "200"),
        ],
        3,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn failed_originations_answer_503_uf_and_are_counted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = PartnerCa::new("partner CA")?;
    let other_ca = PartnerCa::new("another CA")?;
    replace(&dir.path().join("partner-ca.pem"), ca.cert_pem())?;
    replace(&dir.path().join("other-ca.pem"), other_ca.cert_pem())?;
    let server = start_https(&ca.server(&["api.partner"])?, TLS_ONLY).await?;
    let (port, down) = (server.addr.port(), closed_port().await?);
    let proxy = proxy_with(
        dir.path(),
        &format!(
            "http:
  services:
    - {{name: unknown-ca, hosts: [unknown-ca], targetPort: {port},
       tls: {{mode: SIMPLE, sni: api.partner, caCertificates: other-ca.pem}}}}
    - {{name: wrong-name, hosts: [wrong-name], targetPort: {port},
       tls: {{mode: SIMPLE, sni: other.partner, caCertificates: partner-ca.pem}}}}
    - {{name: down, hosts: [down], targetPort: {down},
       tls: {{mode: SIMPLE, sni: api.partner, caCertificates: partner-ca.pem}}}}
"
        ),
        SocketAddr::new(LOCALHOST, closed_port().await?),
    )?;
    for (service, reason) in [
        ("unknown-ca", "peer_cert_unknown_ca"),
        ("wrong-name", "peer_identity_mismatch"),
        ("down", "connect_refused"),
    ] {
        let (status, body) = get(proxy.addr, service, "/").await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{service}: {body}");
        assert_eq!(body, "upstream connect failure\n");
        wait_for_metric(
            &proxy.metrics,
            "istio_requests_total",
            &[
                ("destination_service_name", service),
                ("response_code", "503"),
                ("response_flags", "UF"),
            ],
            1,
        )
        .await;
        assert_eq!(
            metric(
                &proxy.metrics,
                "sidecar_tls_origination_failures_total",
                &[("destination_service_name", service), ("reason", reason)],
            ),
            1,
            "{service}"
        );
    }
    assert_eq!(HttpsServer::count(&server.requests), 0);
    Ok(())
}

/// A snapshot that did not build a service's `tls` (only a test makes one) gives no connection
/// at all: never the plaintext one.
#[tokio::test]
async fn a_service_whose_tls_is_not_built_never_goes_plaintext() -> anyhow::Result<()> {
    let ca = PartnerCa::new("partner CA")?;
    let options = ServerOptions {
        client_ca: None,
        also_plaintext: true,
    };
    let server = start_https(&ca.server(&["web"])?, options).await?;
    let http: HttpConfig = serde_yaml::from_str(
        "services: [{name: web, hosts: [web], tls: {mode: SIMPLE, caCertificates: /ca.pem}}]",
    )?;
    let mesh = Arc::new(MeshHandle::new(Mesh::plaintext_with_routes(http)));
    let metrics = Arc::new(Metrics::new(&local("client"))?);
    let proxy = start_outbound(|_| server.addr, mesh, metrics, timeouts())?;
    let (status, _) = get(proxy.addr, "web", "/").await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(HttpsServer::count(&server.plaintext_connections), 0);
    assert_eq!(
        metric(
            &proxy.metrics,
            "sidecar_tls_origination_failures_total",
            &[("reason", "tls_handshake_failed")],
        ),
        1
    );
    Ok(())
}

/// One server that speaks both, at one address: each request shows which connection it took.
#[tokio::test]
async fn tls_and_plaintext_connections_to_one_address_are_never_mixed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = PartnerCa::new("partner CA")?;
    let ca_file = dir.path().join("partner-ca.pem");
    replace(&ca_file, ca.cert_pem())?;
    let options = ServerOptions {
        client_ca: None,
        also_plaintext: true,
    };
    let server = start_https(&ca.server(&["web"])?, options).await?;
    let plaintext = "http:\n  services: [{name: web, hosts: [web]}]\n";
    let tls = "http:\n  services: [{name: web, hosts: [web], tls: {mode: SIMPLE, caCertificates: partner-ca.pem}}]\n";
    let proxy = proxy_with(dir.path(), plaintext, server.addr)?;
    let transport = |body: &str| body.split(' ').next().unwrap_or_default().to_owned();
    let connections = || {
        (
            HttpsServer::count(&server.plaintext_connections),
            HttpsServer::count(&server.tls_connections),
        )
    };

    let (_, body) = get(proxy.addr, "web", "/").await?;
    assert_eq!(transport(&body), "transport=plaintext");

    replace(&dir.path().join("mesh.yaml"), tls)?;
    let reloads = [("result", "success")];
    wait_for_metric(
        &proxy.metrics,
        "sidecar_mesh_config_reloads_total",
        &reloads,
        1,
    )
    .await;
    for _ in 0..2 {
        let (_, body) = get(proxy.addr, "web", "/").await?;
        assert_eq!(
            transport(&body),
            "transport=tls",
            "the pooled plaintext one is not taken"
        );
    }
    assert_eq!(connections(), (1, 1), "the TLS connection is pooled");

    // A new CA bundle (the partner adds a root): the next request verifies with it. (Its
    // first load, with the config that named it, was the first certificate reload.)
    let rotated = format!("{}{}", ca.cert_pem(), PartnerCa::new("next CA")?.cert_pem());
    replace(&ca_file, &rotated)?;
    wait_for_metric(
        &proxy.metrics,
        "sidecar_certificate_reloads_total",
        &reloads,
        2,
    )
    .await;
    let (_, body) = get(proxy.addr, "web", "/").await?;
    assert_eq!(transport(&body), "transport=tls");
    assert_eq!(connections(), (1, 2), "made under the new bundle");

    replace(&dir.path().join("mesh.yaml"), plaintext)?;
    wait_for_metric(
        &proxy.metrics,
        "sidecar_mesh_config_reloads_total",
        &reloads,
        2,
    )
    .await;
    let (_, body) = get(proxy.addr, "web", "/").await?;
    assert_eq!(transport(&body), "transport=plaintext");
    assert_eq!(
        connections(),
        (2, 2),
        "the pooled TLS one is not taken either"
    );
    Ok(())
}
