//! HTTP/1.1 between two sidecars over one HTTP/2 connection (`h2UpgradePolicy`): the apps
//! speak HTTP/1.1 at both ends, the sidecars multiplex their requests on one mTLS connection,
//! and nobody but a mesh peer can make the inbound side turn an HTTP/2 request into HTTP/1.1.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use sidecar_proxy::{Timeouts, telemetry::metrics::Metrics, testing::*};

use super::mesh::{Hop, STRICT, handshakes, rewrite_client_config, server_workload, start_hop};

/// Requests in flight at once, each on its own client connection.
const CONCURRENT: usize = 8;

/// What an HTTP/1.1 app received (its request heads, or what a test app notes of them), in order.
#[derive(Clone, Default)]
struct Heads(Arc<Mutex<Vec<String>>>);

impl Heads {
    fn push(&self, seen: String) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(seen);
    }

    fn all(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// An HTTP/1.1 app that records each request head and answers it `200 ok` once `answer_after`
/// heads have arrived (so that that many requests are in flight together); a WebSocket
/// upgrade gets `101`, then an echo.
async fn start_recording_app(answer_after: usize) -> anyhow::Result<(SocketAddr, Heads)> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let heads = Heads::default();
    let recorded = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let recorded = recorded.clone();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut stream).await? {
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let upgrade = text.to_ascii_lowercase().contains("upgrade: websocket");
                    recorded.push(text);
                    if upgrade {
                        stream
                            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                            .await?;
                        let (mut read, mut write) = stream.split();
                        tokio::io::copy(&mut read, &mut write).await?;
                        return anyhow::Ok(());
                    }
                    let deadline = Instant::now() + PATIENCE;
                    while recorded.all().len() < answer_after && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await?;
                }
                anyhow::Ok(())
            });
        }
    });
    Ok((addr, heads))
}

/// The next request head on `stream`, read a byte at a time so that nothing after it is taken;
/// `None` at the end of the stream.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await? == 1 {
        head.push(byte[0]);
        if head.ends_with(b"\r\n\r\n") {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

/// A hop between two sidecars in front of `app`, the server's inbound section `inbound`.
struct MeshHop {
    hop: Hop,
    client_dir: PathBuf,
    _pki: Pki,
}

async fn hop_to(app: SocketAddr, inbound: impl Fn(u16) -> String) -> anyhow::Result<MeshHop> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let hop = start_hop(&server_dir, &client_dir, inbound, &["server"], app).await?;
    Ok(MeshHop {
        hop,
        client_dir,
        _pki: pki,
    })
}

/// A hop in front of the recording app answering after `answer_after` heads, the server's
/// inbound section `inbound`; and what the app received.
async fn start_recorded_hop(
    inbound: impl Fn(u16) -> String,
    answer_after: usize,
) -> anyhow::Result<(MeshHop, Heads)> {
    let (app, heads) = start_recording_app(answer_after).await?;
    Ok((hop_to(app, inbound).await?, heads))
}

/// Sends `request` (with `Connection: close`) on a connection of its own; the whole answer.
async fn exchange(proxy: SocketAddr, request: String) -> anyhow::Result<String> {
    let mut client = TcpStream::connect(proxy).await?;
    client.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut response)).await??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// [`CONCURRENT`] requests at once from the app, each on a connection of its own (as many
/// HTTP/1.1 clients do); each must get the app's `200 ok`.
async fn concurrent_gets(proxy: SocketAddr) -> anyhow::Result<()> {
    let mut gets = JoinSet::new();
    for index in 0..CONCURRENT {
        gets.spawn(async move {
            let request = format!(
                "GET /items/{index}?full=yes HTTP/1.1\r\nHost: server:9080\r\nX-Custom-Case: kept\r\nConnection: close\r\n\r\n"
            );
            let response = exchange(proxy, request).await?;
            anyhow::ensure!(
                response.starts_with("HTTP/1.1 200 OK\r\n") && response.ends_with("ok"),
                "{response}"
            );
            anyhow::Ok(())
        });
    }
    while let Some(done) = gets.join_next().await {
        done??;
    }
    Ok(())
}

fn mtls_connections_accepted(hop: &Hop) -> u64 {
    handshakes(&hop.server, "full") + handshakes(&hop.server, "resumed")
}

#[tokio::test]
async fn concurrent_http1_requests_share_one_http2_connection_and_reach_the_app_as_http1()
-> anyhow::Result<()> {
    let (MeshHop { hop, _pki, .. }, heads) = start_recorded_hop(STRICT, CONCURRENT).await?;
    concurrent_gets(hop.client.addr).await?;

    // One mTLS connection carried them all, where each used to take one (and a handshake).
    assert_eq!(mtls_connections_accepted(&hop), 1);
    let heads = heads.all();
    assert_eq!(heads.len(), CONCURRENT);
    for head in &heads {
        let lower = head.to_ascii_lowercase();
        assert!(
            head.starts_with("GET /items/") && head.contains("?full=yes HTTP/1.1\r\n"),
            "the app gets the origin-form HTTP/1.1 request line: {head}"
        );
        assert!(lower.contains("\r\nhost: server:9080\r\n"), "{head}");
        assert!(lower.contains("\r\nx-custom-case: kept\r\n"), "{head}");
        assert!(
            !lower.contains("sidecar-orig-proto"),
            "the mark reached the app: {head}"
        );
    }
    // Both sides report the app's protocol, over mTLS.
    let labels = [
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
        ("response_code", "200"),
    ];
    let served = CONCURRENT as u64;
    wait_until("both sides counted every request", || {
        metric(&hop.server.metrics, "istio_requests_total", &labels) == served
            && metric(&hop.client.metrics, "istio_requests_total", &labels) == served
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn a_websocket_upgrade_between_sidecars_stays_http1_on_its_own_connection()
-> anyhow::Result<()> {
    let (MeshHop { hop, _pki, .. }, heads) = start_recorded_hop(STRICT, CONCURRENT).await?;
    // First a plain request, so that the shared HTTP/2 connection exists.
    concurrent_gets(hop.client.addr).await?;
    let mut client = TcpStream::connect(hop.client.addr).await?;
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: server\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await?;
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(PATIENCE, client.read_exact(&mut byte)).await??;
        response.push(byte[0]);
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert_eq!(
        echo_chunk(&mut client, b"frames both ways").await?,
        b"frames both ways"
    );
    let upgrade_head = heads.all().pop().unwrap_or_default();
    assert!(
        upgrade_head.starts_with("GET /ws HTTP/1.1\r\n"),
        "{upgrade_head}"
    );
    assert_eq!(
        mtls_connections_accepted(&hop),
        2,
        "the upgrade's own connection"
    );
    Ok(())
}

/// The client's config for the server as a service with the `connectionPool` given.
fn with_connection_pool(hop: &Hop, pool: &str) -> String {
    with_identities_and_pool(hop, &["server"], pool)
}

/// [`with_connection_pool`], the server being one of the service accounts `identities`.
fn with_identities_and_pool(hop: &Hop, identities: &[&str], pool: &str) -> String {
    format!(
        "{}http:\n  services:\n    - name: server\n      addresses: [127.0.0.1]\n      ports: [{}]\n      connectionPool: {pool}\n",
        server_workload(hop.tap, identities),
        hop.tap.port()
    )
}

#[tokio::test]
async fn do_not_upgrade_keeps_one_http1_connection_per_request_in_flight() -> anyhow::Result<()> {
    let (rig, heads) = start_recorded_hop(STRICT, CONCURRENT).await?;
    let (hop, client_dir) = (&rig.hop, &rig.client_dir);
    let opt_out = with_connection_pool(hop, "{h2UpgradePolicy: DO_NOT_UPGRADE}");
    rewrite_client_config(hop, client_dir, &opt_out).await?;

    concurrent_gets(hop.client.addr).await?;
    assert_eq!(mtls_connections_accepted(hop), CONCURRENT as u64);
    // Header case survives only where HTTP/1 goes all the way.
    assert!(
        heads
            .all()
            .iter()
            .all(|head| head.contains("\r\nX-Custom-Case: kept\r\n")),
        "{:?}",
        heads.all()
    );
    Ok(())
}

/// An HTTP/2-only app answering with the version it got each request in and whether the mark
/// of a carried request reached it.
async fn start_http2_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(|request: Request<Incoming>| async move {
                let marked = request.headers().contains_key("sidecar-orig-proto");
                let answer = format!("{:?} marked={marked}", request.version());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
            });
            tokio::spawn(
                http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

/// Sends one h2c request to `proxy` marked as a carried HTTP/1.1 one; the answer's body.
async fn marked_h2c_request(proxy: SocketAddr) -> anyhow::Result<String> {
    let stream = TcpStream::connect(proxy).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get("http://server/forged")
        .header("sidecar-orig-proto", "HTTP/1.1")
        .body(Full::<Bytes>::default())?;
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request)).await??;
    anyhow::ensure!(response.status() == StatusCode::OK, "{response:?}");
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Only a mesh peer's mark is honoured: a plaintext client cannot make the inbound side hand
/// its HTTP/2 request to the app as HTTP/1.1.
#[tokio::test]
async fn a_plaintext_peers_mark_is_dropped_and_not_honoured() -> anyhow::Result<()> {
    let permissive = |_| "inbound:\n  mode: PERMISSIVE\n".to_owned();
    let MeshHop { hop, _pki, .. } = hop_to(start_http2_app().await?, permissive).await?;
    assert_eq!(
        marked_h2c_request(hop.server.addr).await?,
        "HTTP/2.0 marked=false"
    );
    Ok(())
}

/// The app's own mark never leaves its sidecar, so it cannot have its peer's sidecar turn
/// its HTTP/2 request (gRPC...) into HTTP/1.1.
#[tokio::test]
async fn an_apps_own_mark_never_leaves_its_sidecar() -> anyhow::Result<()> {
    let MeshHop { hop, _pki, .. } = hop_to(start_http2_app().await?, STRICT).await?;
    assert_eq!(
        marked_h2c_request(hop.client.addr).await?,
        "HTTP/2.0 marked=false"
    );
    assert_eq!(mtls_connections_accepted(&hop), 1);
    Ok(())
}

/// An HTTP/1.1 app (hyper's) answering each request with what it got: its method, the length
/// of its body and its `x-checksum` trailer; the answer carries a `set-cookie` header of
/// `cookie_bytes`.
async fn start_body_app(cookie_bytes: usize) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let cookie = "c".repeat(cookie_bytes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let cookie = cookie.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let cookie = cookie.clone();
                async move {
                    let method = request.method().clone();
                    let collected = request.into_body().collect().await?;
                    let checksum = collected
                        .trailers()
                        .and_then(|trailers| trailers.get("x-checksum"))
                        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
                    let answer = format!(
                        "{method} {} bytes, x-checksum={}",
                        collected.to_bytes().len(),
                        checksum.as_deref().unwrap_or("none")
                    );
                    let mut response = Response::new(Full::new(Bytes::from(answer)));
                    response
                        .headers_mut()
                        .insert("set-cookie", cookie.parse().expect("a valid header value"));
                    Ok::<_, hyper::Error>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

/// A chunked HTTP/1.1 upload with a trailer reaches the app whole when carried: every chunk
/// and the trailer (HTTP/2 DATA frames and a trailing HEADERS frame between the sidecars).
#[tokio::test]
async fn a_chunked_upload_with_a_trailer_is_carried_whole() -> anyhow::Result<()> {
    let MeshHop { hop, _pki, .. } = hop_to(start_body_app(0).await?, STRICT).await?;
    let chunk = "x".repeat(5000);
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: server\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\nConnection: close\r\n\r\n\
         1388\r\n{chunk}\r\n1388\r\n{chunk}\r\n3\r\nend\r\n0\r\nx-checksum: 7f3a\r\n\r\n"
    );
    let response = exchange(hop.client.addr, request).await?;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(
        response.ends_with("POST 10003 bytes, x-checksum=7f3a"),
        "{response}"
    );
    assert_eq!(mtls_connections_accepted(&hop), 1);
    Ok(())
}

/// A response head larger than HTTP/2's default room (16 KiB) but within HTTP/1's usual limits
/// gets back to the app when its request was carried.
#[tokio::test]
async fn a_response_with_large_headers_comes_back_whole() -> anyhow::Result<()> {
    const COOKIE: usize = 40 * 1024;
    let MeshHop { hop, _pki, .. } = hop_to(start_body_app(COOKIE).await?, STRICT).await?;
    let response = exchange(
        hop.client.addr,
        "GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n".to_owned(),
    )
    .await?;
    assert!(
        response.starts_with("HTTP/1.1 200 OK\r\n"),
        "{response:.200}"
    );
    let cookie = format!("\r\nset-cookie: {}\r\n", "c".repeat(COOKIE));
    assert!(
        response.to_ascii_lowercase().contains(&cookie),
        "{response:.200}"
    );
    assert!(
        response.ends_with("GET 0 bytes, x-checksum=none"),
        "{response:.200}"
    );
    Ok(())
}

/// HTTP/2's default header room (16 KiB) is less than HTTP/1's: a request with a large cookie
/// that the app's HTTP/1.1 would take must get through when carried too.
#[tokio::test]
async fn a_request_with_large_headers_is_carried_whole() -> anyhow::Result<()> {
    let (MeshHop { hop, _pki, .. }, heads) = start_recorded_hop(STRICT, 1).await?;
    let cookie = "c".repeat(40 * 1024);
    let request = format!(
        "GET /big HTTP/1.1\r\nHost: server\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
    );
    let response = exchange(hop.client.addr, request).await?;
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    let head = heads.all().pop().unwrap_or_default();
    assert!(head.contains(&cookie), "the cookie reached the app whole");
    assert_eq!(mtls_connections_accepted(&hop), 1, "carried");
    Ok(())
}

/// The server's inbound section: STRICT, the app's port declared `protocol`.
fn strict_port_declared(protocol: &'static str) -> impl Fn(u16) -> String {
    move |port| {
        format!(
            "inbound:\n  mode: STRICT\nhttp:\n  ports:\n    - {{port: {port}, protocol: {protocol}}}\n"
        )
    }
}

/// A port declared `http` (HTTP/1 for its app) takes carried requests as well: the peer's
/// sidecar serves HTTP/2 there because both sidecars agreed on it in the handshake.
#[tokio::test]
async fn a_port_declared_http_takes_carried_requests() -> anyhow::Result<()> {
    let (MeshHop { hop, _pki, .. }, heads) =
        start_recorded_hop(strict_port_declared("http"), CONCURRENT).await?;
    concurrent_gets(hop.client.addr).await?;
    assert_eq!(mtls_connections_accepted(&hop), 1);
    assert!(
        heads
            .all()
            .iter()
            .all(|head| head.starts_with("GET /items/") && head.contains(" HTTP/1.1\r\n")),
        "{:?}",
        heads.all()
    );
    Ok(())
}

/// A peer's sidecar that does not take carried requests (here a port declared `tcp`, relayed
/// as it is; an older sidecar chooses the same) gets HTTP/1.1 as before, one connection per
/// request in flight, and the endpoint is remembered: no later request offers it again.
#[tokio::test]
async fn a_peer_that_does_not_take_carried_requests_gets_http1() -> anyhow::Result<()> {
    let (MeshHop { hop, _pki, .. }, heads) =
        start_recorded_hop(strict_port_declared("tcp"), CONCURRENT).await?;
    concurrent_gets(hop.client.addr).await?;
    assert_eq!(mtls_connections_accepted(&hop), CONCURRENT as u64);
    // The pooled HTTP/1 connections serve the next round.
    concurrent_gets(hop.client.addr).await?;
    assert_eq!(mtls_connections_accepted(&hop), CONCURRENT as u64);
    let heads = heads.all();
    assert_eq!(heads.len(), 2 * CONCURRENT);
    assert!(
        heads.iter().all(|head| head.starts_with("GET /items/")
            && head.contains(" HTTP/1.1\r\n")
            && head.contains("\r\nX-Custom-Case: kept\r\n")),
        "{heads:?}"
    );
    Ok(())
}

/// The shared connection to a peer's sidecar is closed once no stream has been open on it for
/// the service's `idleTimeout` (Istio's meaning, for HTTP/2 as for HTTP/1), and the next
/// request opens another: it used to stay until the peer's own idle timeout of an hour.
#[tokio::test]
async fn the_shared_connection_closes_after_the_idle_timeout() -> anyhow::Result<()> {
    let (rig, _heads) = start_recorded_hop(STRICT, 1).await?;
    let (hop, client_dir) = (&rig.hop, &rig.client_dir);
    // Long enough that no pause between the requests of a round reaches it on a busy machine.
    let quick = with_connection_pool(hop, "{idleTimeout: 1s}");
    rewrite_client_config(hop, client_dir, &quick).await?;

    concurrent_gets(hop.client.addr).await?;
    assert_eq!(mtls_connections_accepted(hop), 1);
    wait_until("the idle shared connection is closed", || {
        hop.tap_closed.load(Ordering::SeqCst) == 1
    })
    .await;
    concurrent_gets(hop.client.addr).await?;
    assert_eq!(mtls_connections_accepted(hop), 2);
    Ok(())
}

/// A request waiting longer than the idle timeout for its response keeps the shared connection
/// in use: the request after it rides the same connection, and both are answered.
#[tokio::test]
async fn a_request_waiting_past_the_idle_timeout_keeps_the_shared_connection() -> anyhow::Result<()>
{
    // The app answers once both heads are in: the first waits for the second.
    let (rig, heads) = start_recorded_hop(STRICT, 2).await?;
    let (hop, client_dir) = (&rig.hop, &rig.client_dir);
    let quick = with_connection_pool(hop, "{idleTimeout: 100ms}");
    rewrite_client_config(hop, client_dir, &quick).await?;

    let first = tokio::spawn(exchange(hop.client.addr, get("/first")));
    wait_until("the first request reached the app", || {
        heads.all().len() == 1
    })
    .await;
    // Several idle timeouts with the first request in flight and nothing new.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = exchange(hop.client.addr, get("/second")).await?;
    let first = first.await??;
    for response in [&first, &second] {
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    }
    assert_eq!(mtls_connections_accepted(hop), 1);
    Ok(())
}

/// `GET path` with `Connection: close`.
fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n")
}

/// An HTTP/1.1 app answering `/stream` with a chunked body whose last chunk comes `pause`
/// after the first (a server stream, an SSE feed), anything else with `ok` at once; and what
/// it saw, in order: each request's path, and `end of /stream` once that body is sent.
async fn start_slow_body_app(pause: Duration) -> anyhow::Result<(SocketAddr, Heads)> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let events = Heads::default();
    let seen = events.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let saw = |event: &str| seen.push(event.to_owned());
                while let Some(head) = read_head(&mut stream).await? {
                    let text = String::from_utf8_lossy(&head);
                    saw(text.split(' ').nth(1).unwrap_or_default());
                    if head.starts_with(b"GET /stream ") {
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                            .await?;
                        tokio::time::sleep(pause).await;
                        stream.write_all(b"4\r\nlast\r\n0\r\n\r\n").await?;
                        saw("end of /stream");
                    } else {
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await?;
                    }
                }
                anyhow::Ok(())
            });
        }
    });
    Ok((addr, events))
}

/// A response body still streaming keeps its stream open, so the shared connection is not idle
/// and a request meanwhile rides it too: a server stream or an SSE feed must not make the next
/// request open a connection of its own (its response headers came long before).
#[tokio::test]
async fn a_response_still_streaming_keeps_the_shared_connection() -> anyhow::Result<()> {
    let (app, _events) = start_slow_body_app(Duration::from_millis(800)).await?;
    let rig = hop_to(app, STRICT).await?;
    let (hop, client_dir) = (&rig.hop, &rig.client_dir);
    let quick = with_connection_pool(hop, "{idleTimeout: 100ms}");
    rewrite_client_config(hop, client_dir, &quick).await?;

    let streaming = tokio::spawn(exchange(hop.client.addr, get("/stream")));
    // Several idle timeouts into the body.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = exchange(hop.client.addr, get("/other")).await?;
    assert!(
        other.starts_with("HTTP/1.1 200 OK\r\n") && other.ends_with("ok"),
        "{other}"
    );
    let streamed = streaming.await??;
    assert!(
        streamed.starts_with("HTTP/1.1 200 OK\r\n")
            && streamed.contains("first")
            && streamed.contains("last"),
        "{streamed}"
    );
    assert_eq!(mtls_connections_accepted(hop), 1);
    Ok(())
}

/// Requests that wait for the shared connection to open share the failure of that one try:
/// against an endpoint that never completes a handshake, one connection is tried, not one after
/// the other for each waiting request.
#[tokio::test]
async fn requests_waiting_for_a_connection_that_fails_to_open_fail_with_it() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    // Accepts and holds every connection, answering nothing: a peer that hangs.
    let blackhole = TcpListener::bind((LOCALHOST, 0)).await?;
    let blackhole_addr = blackhole.local_addr()?;
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let held = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = blackhole.accept().await {
            held.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(stream);
        }
    });
    let config = write_mesh_config(&client_dir, &server_workload(blackhole_addr, &["server"]))?;
    let metrics = Arc::new(Metrics::new(&local("client"))?);
    let mesh = watched_mesh(&config, &metrics)?;
    let quick = Timeouts {
        tls_handshake: Duration::from_millis(500),
        ..timeouts()
    };
    let client = start_outbound(|_| blackhole_addr, mesh, metrics, quick)?;

    let mut gets = JoinSet::new();
    for _ in 0..4 {
        gets.spawn(exchange(
            client.addr,
            "GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n".to_owned(),
        ));
    }
    while let Some(response) = gets.join_next().await {
        let response = response??;
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    }
    let tried = accepted
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    assert_eq!(tried, 1, "connections tried for the 4 waiting requests");
    Ok(())
}

/// A shared connection taken out of the pool by a reload (here the server's identities changed)
/// keeps its `maxConnections` permit while a response still streams on it: with a limit of one,
/// the next request waits for that stream to end rather than opening a second connection.
#[tokio::test]
async fn a_connection_out_of_the_pool_holds_its_permit_until_its_last_stream_ends()
-> anyhow::Result<()> {
    let (app, events) = start_slow_body_app(Duration::from_millis(1500)).await?;
    let rig = hop_to(app, STRICT).await?;
    let (hop, client_dir) = (&rig.hop, &rig.client_dir);
    let limited = |identities: &[&str]| {
        with_identities_and_pool(
            hop,
            identities,
            "{maxConnections: 1, h2UpgradePolicy: UPGRADE}",
        )
    };
    rewrite_client_config(hop, client_dir, &limited(&["server"])).await?;

    let streaming = tokio::spawn(exchange(hop.client.addr, get("/stream")));
    wait_until("the stream began", || events.all().len() == 1).await;
    rewrite_client_config(hop, client_dir, &limited(&["server", "other"])).await?;
    let other = exchange(hop.client.addr, get("/other")).await?;
    let streamed = streaming.await??;
    assert!(other.ends_with("ok"), "{other}");
    assert!(streamed.contains("last"), "{streamed}");
    // The second connection waited for the one permit: the app saw its request after the end.
    assert_eq!(events.all(), ["/stream", "end of /stream", "/other"]);
    assert_eq!(mtls_connections_accepted(hop), 2);
    Ok(())
}
