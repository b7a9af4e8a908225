//! Kubelet probes of the app under STRICT mTLS, as Istio does them: `sidecar inject` rewrites
//! an app container's `httpGet`, `tcpSocket` and `grpc` probes to `GET
//! :15020/app-health/<container>/<livez|readyz|startupz>` and hands the originals to the proxy
//! (`--app-probers`, env `SIDECAR_APP_PROBERS`: the JSON of Istio's `ISTIO_KUBE_APP_PROBERS`).
//! The proxy performs each probe against the app at the pod's address (the one the kubelet
//! dialled), from its passthrough source, so neither capture nor the inbound policy sees it:
//! the kubelet, which has no mesh certificate, keeps probing an app whose ports refuse
//! plaintext.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Bytes,
    client::conn::{http1, http2},
    header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue, USER_AGENT},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use crate::io::upstream::{self, Source};

pub const APP_HEALTH_PREFIX: &str = "/app-health/";
/// The kubelet's default `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const GRPC_SERVING: u64 = 1;

/// One original probe: exactly one action, and its timeout.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AppProbe {
    http_get: Option<HttpGet>,
    tcp_socket: Option<TcpSocket>,
    grpc: Option<Grpc>,
    timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpGet {
    #[serde(default)]
    path: Option<String>,
    port: u16,
    #[serde(default)]
    host: Option<IpAddr>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpHeader {
    name: String,
    value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpSocket {
    port: u16,
    #[serde(default)]
    host: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Grpc {
    port: u16,
    #[serde(default)]
    service: Option<String>,
}

/// The app's probes by the path the kubelet now asks the proxy.
#[derive(Debug, Clone)]
pub struct AppProbers {
    probes: HashMap<String, AppProbe>,
    tls: Arc<ClientConfig>,
}

impl AppProbers {
    /// Parses the injected JSON; every probe must have exactly one action and an
    /// `/app-health/` path.
    pub fn parse(json: &str, provider: &Arc<CryptoProvider>) -> Result<AppProbers> {
        let probes: HashMap<String, AppProbe> =
            serde_json::from_str(json).context("invalid --app-probers JSON")?;
        for (path, probe) in &probes {
            if !path.starts_with(APP_HEALTH_PREFIX) {
                bail!("invalid --app-probers: path {path:?} is not under {APP_HEALTH_PREFIX}");
            }
            let actions = [
                probe.http_get.is_some(),
                probe.tcp_socket.is_some(),
                probe.grpc.is_some(),
            ];
            if actions.iter().filter(|set| **set).count() != 1 {
                bail!(
                    "invalid --app-probers: {path} needs exactly one of httpGet, tcpSocket, grpc"
                );
            }
            if let Some(scheme) = probe.http_get.as_ref().and_then(|h| h.scheme.as_deref())
                && !scheme.eq_ignore_ascii_case("http")
                && !scheme.eq_ignore_ascii_case("https")
            {
                bail!("invalid --app-probers: {path}: scheme {scheme:?} is not HTTP or HTTPS");
            }
        }
        let tls = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS settings for HTTPS probes")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LikeTheKubelet(provider.clone())))
            .with_no_client_auth();
        Ok(AppProbers {
            probes,
            tls: Arc::new(tls),
        })
    }

    /// Answers the kubelet's `GET <path>` that arrived at `pod_ip`: 200 when the app's probe
    /// passes, 503 with the reason when it fails, 404 for a probe nobody configured.
    pub async fn check(&self, path: &str, pod_ip: IpAddr) -> Response<Full<Bytes>> {
        let Some(probe) = self.probes.get(path) else {
            return text(StatusCode::NOT_FOUND, format!("no app probe at {path}\n"));
        };
        let limit = probe
            .timeout_seconds
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        let outcome = match tokio::time::timeout(limit, self.run(probe, pod_ip, limit)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {limit:?}")),
        };
        match outcome {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        }
    }

    async fn run(&self, probe: &AppProbe, pod_ip: IpAddr, limit: Duration) -> Result<(), String> {
        if let Some(http) = &probe.http_get {
            let stream = connect(http.host, pod_ip, http.port, limit).await?;
            let app = stream.peer_addr().map_err(e)?;
            let https = http
                .scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("https"));
            if https {
                let tls = TlsConnector::from(self.tls.clone())
                    .connect(ServerName::IpAddress(app.ip().into()), stream)
                    .await
                    .map_err(|error| format!("TLS: {error}"))?;
                http_get(tls, http, app).await
            } else {
                http_get(stream, http, app).await
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            connect(tcp.host, pod_ip, tcp.port, limit).await.map(drop)
        } else if let Some(grpc) = &probe.grpc {
            let stream = connect(None, pod_ip, grpc.port, limit).await?;
            grpc_health_check(stream, grpc).await
        } else {
            Err("no probe action".into())
        }
    }
}

/// The app at the pod's own address comes from the passthrough source (inbound capture lets it
/// through, as the proxy's forwarded connections); an explicit `host` is dialled as is.
async fn connect(
    host: Option<IpAddr>,
    pod_ip: IpAddr,
    port: u16,
    limit: Duration,
) -> Result<TcpStream, String> {
    let (ip, source) = match host {
        Some(host) => (host, Source::Any),
        None => (pod_ip, Source::Passthrough),
    };
    upstream::dial(SocketAddr::new(ip, port), source, limit)
        .await
        .map_err(|failure| format!("connect {ip}:{port}: {}", failure.error))
}

/// The kubelet's rule: any status from 200 to 399 passes.
async fn http_get<S>(stream: S, probe: &HttpGet, app: SocketAddr) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(e)?;
    tokio::spawn(connection);
    let path = probe.path.as_deref().unwrap_or("/");
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(USER_AGENT, "kube-probe/sidecar")
        .header(HOST, app.to_string());
    for header in &probe.http_headers {
        let name = HeaderName::try_from(header.name.as_str()).map_err(e)?;
        let value = HeaderValue::try_from(header.value.as_str()).map_err(e)?;
        request = request.header(name, value);
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(e)?;
    let response = sender.send_request(request).await.map_err(e)?;
    let status = response.status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("GET {path}: {status}"))
    }
}

/// `grpc.health.v1.Health/Check` over h2c, as the kubelet's grpc probe: SERVING passes.
async fn grpc_health_check(stream: TcpStream, probe: &Grpc) -> Result<(), String> {
    let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(e)?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "http://localhost:{}/grpc.health.v1.Health/Check",
            probe.port
        ))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(grpc_frame(&health_check_request(
            probe.service.as_deref().unwrap_or(""),
        )))))
        .map_err(e)?;
    let response = sender.send_request(request).await.map_err(e)?;
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.map_err(e)?;
    let trailers = body.trailers().cloned().unwrap_or_default();
    let grpc_status = trailers
        .get("grpc-status")
        .or_else(|| headers.get("grpc-status"))
        .and_then(|value| value.to_str().ok())
        .unwrap_or("missing");
    if grpc_status != "0" {
        return Err(format!("grpc-status {grpc_status}"));
    }
    match serving_status(&body.to_bytes()) {
        Some(GRPC_SERVING) => Ok(()),
        Some(status) => Err(format!("health status {status}, not SERVING")),
        None => Err("malformed HealthCheckResponse".into()),
    }
}

/// `HealthCheckRequest { string service = 1; }` in protobuf's wire format (one
/// length-delimited field; no protobuf crate for a two-byte message).
fn health_check_request(service: &str) -> Vec<u8> {
    if service.is_empty() {
        return Vec::new();
    }
    let mut message = vec![0x0a];
    let mut length = service.len();
    while length >= 0x80 {
        message.push((length as u8) | 0x80);
        length >>= 7;
    }
    message.push(length as u8);
    message.extend_from_slice(service.as_bytes());
    message
}

/// gRPC's length-prefixed message: uncompressed flag, 32-bit big-endian length, message.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// Field 1 (varint) of the framed `HealthCheckResponse`; absent means 0 (UNKNOWN).
fn serving_status(frame: &[u8]) -> Option<u64> {
    let length = u32::from_be_bytes(frame.get(1..5)?.try_into().ok()?) as usize;
    let mut message = frame.get(5..5 + length)?;
    while let Some((&key, rest)) = message.split_first() {
        let (value, rest) = varint(rest)?;
        match key {
            0x08 => return Some(value),
            _ if key & 0x07 == 0 => message = rest, // another varint field
            _ => return None,
        }
    }
    Some(0)
}

fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (index, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[index + 1..]));
        }
    }
    None
}

/// The kubelet does not verify an HTTPS probe's certificate (the app's may be self-signed):
/// neither does the proxy, which still checks the handshake's signatures.
#[derive(Debug)]
struct LikeTheKubelet(Arc<CryptoProvider>);

impl ServerCertVerifier for LikeTheKubelet {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn e(error: impl std::fmt::Display) -> String {
    error.to_string()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::crypto_provider;

    #[test]
    fn health_messages_round_trip_the_wire_format() {
        assert_eq!(health_check_request(""), Vec::<u8>::new());
        assert_eq!(health_check_request("db"), vec![0x0a, 2, b'd', b'b']);
        let long = "s".repeat(200);
        assert_eq!(&health_check_request(&long)[..3], &[0x0a, 0xc8, 0x01]);
        assert_eq!(serving_status(&grpc_frame(&[0x08, 0x01])), Some(1));
        assert_eq!(serving_status(&grpc_frame(&[0x08, 0x02])), Some(2));
        assert_eq!(serving_status(&grpc_frame(&[])), Some(0));
        assert_eq!(serving_status(&[0, 0, 0, 9, 0x08]), None);
    }

    #[test]
    fn probers_are_validated() {
        let provider = crypto_provider();
        let ok = r#"{"/app-health/app/readyz":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP"},"timeoutSeconds":2},
                     "/app-health/app/livez":{"tcpSocket":{"port":8080}},
                     "/app-health/app/startupz":{"grpc":{"port":9090}}}"#;
        assert!(AppProbers::parse(ok, &provider).is_ok());
        for (bad, reason) in [
            (r#"{"/x":{"tcpSocket":{"port":1}}}"#, "not under"),
            (r#"{"/app-health/a/livez":{}}"#, "exactly one"),
            (
                r#"{"/app-health/a/livez":{"tcpSocket":{"port":1},"grpc":{"port":1}}}"#,
                "exactly one",
            ),
            (
                r#"{"/app-health/a/livez":{"httpGet":{"port":1,"scheme":"FTP"}}}"#,
                "scheme",
            ),
            (r#"{"/app-health/a/livez":{"exec":{}}}"#, "JSON"),
        ] {
            let error = format!("{:#}", AppProbers::parse(bad, &provider).unwrap_err());
            assert!(error.contains(reason), "{bad}: {error}");
        }
    }
}
