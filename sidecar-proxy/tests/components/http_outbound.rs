//! End-to-end tests of the HTTP proxy on loopback, no root: a client, the outbound proxy with
//! a fixed original destination (as though redirected), and backends with scripted behaviour.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header::HOST};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use sidecar_tests::prometheus;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use sidecar_proxy::{
    Timeouts,
    http::HttpConfig,
    mesh::{Mesh, MeshHandle},
    telemetry::metrics::{Metrics, ReloadKind},
    testing::*,
};

/// How a backend answers its `n`th request (from 0).
#[derive(Clone, Copy)]
struct Reply {
    status: u16,
    delay: Duration,
}

const OK: Reply = Reply {
    status: 200,
    delay: Duration::ZERO,
};

struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

/// An HTTP/1 server answering with its `name` as the body and in `x-backend`, echoing the
/// tracing headers it got.
async fn backend(
    name: &'static str,
    script: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> anyhow::Result<Backend> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (counter, script) = (counter.clone(), script.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let reply = script(counter.fetch_add(1, Ordering::SeqCst));
                    async move {
                        tokio::time::sleep(reply.delay).await;
                        let mut response = Response::builder()
                            .status(reply.status)
                            .header("x-backend", name);
                        for echoed in ["x-request-id", "traceparent", "x-forwarded-for"] {
                            if let Some(value) = request.headers().get(echoed) {
                                response = response.header(format!("seen-{echoed}"), value);
                            }
                        }
                        let _ = request.into_body().collect().await;
                        response.body(Full::new(Bytes::from(name)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Backend { addr, hits })
}

fn http_config(yaml: &str) -> HttpConfig {
    serde_yaml::from_str(yaml).expect("a valid http section")
}

/// An outbound proxy whose connections were all for `orig_dst`, routing with `mesh`.
fn start_proxy(
    mesh: Arc<MeshHandle>,
    orig_dst: SocketAddr,
    sniff: Duration,
) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new(&local("client"))?);
    let timeouts = Timeouts {
        sniff,
        ..timeouts()
    };
    start_outbound(|_| orig_dst, mesh, metrics, timeouts)
}

fn routed(yaml: &str, orig_dst: SocketAddr) -> anyhow::Result<Running> {
    let mesh = Arc::new(MeshHandle::new(Mesh::plaintext_with_routes(http_config(
        yaml,
    ))));
    start_proxy(mesh, orig_dst, Duration::from_millis(200))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(proxy: SocketAddr, request: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
    let stream = TcpStream::connect(proxy).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = timeout(PATIENCE, sender.send_request(request)).await??;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header(HOST, host)
        .body(Full::default())
        .expect("a valid request")
}

/// The value of the one sample named `name` whose labels include `labels`.
fn sample(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
    let samples = prometheus::parse(&metrics.render()?).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        samples.iter().any(|s| s.name == name),
        "no metric {name} in the exposition"
    );
    let matching: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    match matching.as_slice() {
        [] => Ok(0.0),
        [one] => Ok(one.value),
        more => anyhow::bail!("{} series of {name} match {labels:?}: {more:?}", more.len()),
    }
}

async fn wait_for_requests(metrics: &Metrics, labels: &[(&str, &str)], count: f64) {
    wait_until(&format!("{count} requests with {labels:?}"), || {
        sample(metrics, "istio_requests_total", labels).is_ok_and(|value| value == count)
    })
    .await;
}

#[tokio::test]
async fn header_and_path_routes_pick_their_backend() -> anyhow::Result<()> {
    let (v1, v2) = (backend("v1", |_| OK).await?, backend("v2", |_| OK).await?);
    let proxy = routed(
        &format!(
            "
services:
  - {{name: v1, endpoints: ['{}']}}
  - {{name: v2, endpoints: ['{}']}}
routes:
  - name: canary
    match: {{hosts: [reviews], headers: [{{name: x-canary, exact: 'yes'}}]}}
    destinations: [{{service: v2}}]
  - name: api
    match: {{hosts: [reviews], path: {{prefix: /api/}}}}
    destinations: [{{service: v2}}]
  - name: rest
    match: {{hosts: [reviews], path: {{prefix: /}}}}
    destinations: [{{service: v1}}]
",
            v1.addr, v2.addr
        ),
        v1.addr,
    )?;
    assert_eq!(send(proxy.addr, get("reviews", "/")).await?.body, "v1");
    assert_eq!(
        send(proxy.addr, get("reviews:9080", "/api/x")).await?.body,
        "v2"
    );
    let canary = Request::get("/")
        .header(HOST, "reviews")
        .header("X-Canary", "yes")
        .body(Full::default())?;
    let answer = send(proxy.addr, canary).await?;
    assert_eq!(answer.body, "v2");
    // Tracing and forwarding headers were added on the way.
    assert_eq!(answer.headers["seen-x-request-id"].len(), 36);
    assert!(
        answer.headers["seen-traceparent"]
            .to_str()?
            .starts_with("00-")
    );
    assert_eq!(answer.headers["seen-x-forwarded-for"], "127.0.0.1");
    Ok(())
}

#[tokio::test]
async fn a_weighted_split_lands_within_tolerance() -> anyhow::Result<()> {
    let (a, b) = (backend("a", |_| OK).await?, backend("b", |_| OK).await?);
    let proxy = routed(
        &format!(
            "
services: [{{name: a, endpoints: ['{}']}}, {{name: b, endpoints: ['{}']}}]
routes: [{{name: split, destinations: [{{service: a, weight: 75}}, {{service: b, weight: 25}}]}}]
",
            a.addr, b.addr
        ),
        a.addr,
    )?;
    let total = 400;
    for _ in 0..total {
        send(proxy.addr, get("svc", "/")).await?;
    }
    let to_b = b.hits.load(Ordering::SeqCst);
    assert_eq!(to_b + a.hits.load(Ordering::SeqCst), total);
    // Binomial(400, 0.25): mean 100, standard deviation ~8.7; 5 sigma either side.
    assert!((57..=143).contains(&to_b), "{to_b} of {total} went to b");
    Ok(())
}

#[tokio::test]
async fn a_retry_turns_a_flaky_503_into_200_and_is_counted() -> anyhow::Result<()> {
    let flaky = backend("flaky", |n| Reply {
        status: if n == 0 { 503 } else { 200 },
        delay: Duration::ZERO,
    })
    .await?;
    let proxy = routed(
        &format!(
            "
services: [{{name: flaky, endpoints: ['{}']}}]
routes:
  - name: retried
    destinations: [{{service: flaky}}]
    retries: {{attempts: 2, retryOn: [5xx]}}
",
            flaky.addr
        ),
        flaky.addr,
    )?;
    let answer = send(proxy.addr, get("flaky", "/")).await?;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(flaky.hits.load(Ordering::SeqCst), 2);
    assert_eq!(proxy.metrics.http.retry_count("flaky", "5xx"), 1);
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "200"), ("response_flags", "-")],
        1.0,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn a_route_timeout_gives_504_with_ut() -> anyhow::Result<()> {
    let slow = backend("slow", |_| Reply {
        status: 200,
        delay: Duration::from_secs(3),
    })
    .await?;
    let proxy = routed(
        &format!(
            "
services: [{{name: slow, endpoints: ['{}']}}]
routes: [{{name: bounded, destinations: [{{service: slow}}], timeout: 200ms}}]
",
            slow.addr
        ),
        slow.addr,
    )?;
    let started = Instant::now();
    let answer = send(proxy.addr, get("slow", "/")).await?;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "504"), ("response_flags", "UT")],
        1.0,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn the_circuit_breaker_gives_503_with_uo() -> anyhow::Result<()> {
    let slow = backend("slow", |_| Reply {
        status: 200,
        delay: Duration::from_millis(500),
    })
    .await?;
    let proxy = routed(
        &format!(
            "
services:
  - name: slow
    hosts: [slow]
    endpoints: ['{}']
    connectionPool: {{maxConnections: 1, maxPendingRequests: 0}}
",
            slow.addr
        ),
        slow.addr,
    )?;
    let first = tokio::spawn(send(proxy.addr, get("slow", "/")));
    wait_until("the first request holds the one connection", || {
        slow.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = send(proxy.addr, get("slow", "/")).await?;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.await??.status, StatusCode::OK);
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "503"), ("response_flags", "UO")],
        1.0,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn no_route_and_connect_failure_are_flagged() -> anyhow::Result<()> {
    let closed = TcpListener::bind((LOCALHOST, 0)).await?.local_addr()?;
    let proxy = routed(
        &format!(
            "
services: [{{name: gone, endpoints: ['{closed}']}}]
routes: [{{name: only-api, match: {{hosts: [gone], path: {{exact: /api}}}}, destinations: [{{service: gone}}]}}]
"
        ),
        closed,
    )?;
    assert_eq!(
        send(proxy.addr, get("gone", "/other")).await?.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(proxy.addr, get("gone", "/api")).await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "404"), ("response_flags", "NR")],
        1.0,
    )
    .await;
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "503"), ("response_flags", "UF")],
        1.0,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn metrics_after_n_requests_show_exactly_n_with_istio_labels() -> anyhow::Result<()> {
    let reviews = backend("reviews", |_| OK).await?;
    let proxy = routed(
        &format!(
            "
services:
  - name: reviews
    namespace: bookinfo
    hosts: [reviews.bookinfo.svc.cluster.local]
    endpoints: ['{}']
    workload: reviews-v1
    app: reviews
    version: v1
",
            reviews.addr
        ),
        reviews.addr,
    )?;
    let n = 7;
    for _ in 0..n {
        let answer = send(
            proxy.addr,
            get("reviews.bookinfo.svc.cluster.local", "/p?id=1"),
        )
        .await?;
        assert_eq!(answer.body, "reviews");
    }
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "test-ns"),
        ("source_principal", "unknown"),
        ("source_app", "unknown"),
        ("source_version", "unknown"),
        ("destination_workload", "reviews-v1"),
        ("destination_workload_namespace", "bookinfo"),
        ("destination_principal", "unknown"),
        ("destination_service", "reviews.bookinfo.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "bookinfo"),
        ("destination_app", "reviews"),
        ("destination_version", "v1"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "none"),
    ];
    wait_for_requests(&proxy.metrics, &labels, f64::from(n)).await;
    let samples = prometheus::parse(&proxy.metrics.render()?).map_err(anyhow::Error::msg)?;
    let requests: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "istio_requests_total")
        .collect();
    assert_eq!(requests.len(), 1, "one series: {requests:?}");
    assert_eq!(
        requests[0].labels.len(),
        labels.len(),
        "exactly Istio's labels"
    );
    for histogram in [
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ] {
        assert_eq!(
            sample(&proxy.metrics, &format!("{histogram}_count"), &labels)?,
            f64::from(n)
        );
    }
    assert_eq!(
        sample(&proxy.metrics, "istio_response_bytes_sum", &labels)?,
        f64::from(n) * "reviews".len() as f64
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_config_is_rejected_and_the_old_one_keeps_serving() -> anyhow::Result<()> {
    let (old, new) = (backend("old", |_| OK).await?, backend("new", |_| OK).await?);
    let section = |target: SocketAddr, service: &str| {
        format!(
            "http:\n  services: [{{name: web, endpoints: ['{target}']}}]\n  routes: [{{name: all, destinations: [{{service: {service}}}]}}]\n"
        )
    };
    let pki = Pki::new()?;
    let dir = pki.workload("client", "client", valid(), None)?;
    let config = write_mesh_config(&dir, &section(old.addr, "web"))?;
    let metrics = Arc::new(Metrics::new(&local("client"))?);
    let mesh = watched_mesh(&config, &metrics)?;
    let proxy = start_proxy(mesh, old.addr, Duration::from_millis(200))?;
    assert_eq!(send(proxy.addr, get("web", "/")).await?.body, "old");

    // A route naming a service that does not exist.
    write_mesh_config(&dir, &section(new.addr, "missing"))?;
    wait_until("the bad config is rejected", || {
        metrics.reload_count(ReloadKind::MeshConfig, false) == 1
    })
    .await;
    assert_eq!(send(proxy.addr, get("web", "/")).await?.body, "old");

    write_mesh_config(&dir, &section(new.addr, "web"))?;
    wait_until("the good config is taken", || {
        metrics.reload_count(ReloadKind::MeshConfig, true) == 1
    })
    .await;
    assert_eq!(send(proxy.addr, get("web", "/")).await?.body, "new");
    Ok(())
}

#[tokio::test]
async fn a_server_speaks_first_protocol_is_not_held_up_by_detection() -> anyhow::Result<()> {
    let server = TcpListener::bind((LOCALHOST, 0)).await?;
    let server_addr = server.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = server.accept().await {
            tokio::spawn(async move {
                stream
                    .write_all(b"220 smtp.example ESMTP ready\r\n")
                    .await?;
                let mut command = [0u8; 6];
                stream.read_exact(&mut command).await?;
                stream.write_all(b"250 ok\r\n").await
            });
        }
    });
    let detection_timeout = Duration::from_secs(5);
    let mesh = Arc::new(MeshHandle::new(Mesh::plaintext()));
    let proxy = start_proxy(mesh, server_addr, detection_timeout)?;

    let started = Instant::now();
    let mut client = TcpStream::connect(proxy.addr).await?;
    let mut banner = [0u8; 30];
    timeout(PATIENCE, client.read_exact(&mut banner)).await??;
    let waited = started.elapsed();
    assert_eq!(&banner, b"220 smtp.example ESMTP ready\r\n");
    assert!(
        waited < Duration::from_millis(500),
        "the greeting took {waited:?}; detection waits up to {detection_timeout:?}"
    );
    client.write_all(b"HELO\r\n").await?;
    let mut reply = [0u8; 8];
    timeout(PATIENCE, client.read_exact(&mut reply)).await??;
    assert_eq!(&reply, b"250 ok\r\n");
    Ok(())
}

/// Reads one request head from `stream`.
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            anyhow::bail!("closed mid-head");
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8(head)?)
}

#[tokio::test]
async fn header_case_is_preserved_and_upgrades_pass_through() -> anyhow::Result<()> {
    let server = TcpListener::bind((LOCALHOST, 0)).await?;
    let server_addr = server.local_addr()?;
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = server.accept().await {
            let heads_tx = heads_tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await?;
                let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
                let _ = heads_tx.send(head);
                if upgrade {
                    stream
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                        .await?;
                    let (mut reader, mut writer) = stream.split();
                    tokio::io::copy(&mut reader, &mut writer).await?;
                } else {
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\nX-Server-Header: Yes\r\nContent-Length: 2\r\n\r\nok")
                        .await?;
                }
                anyhow::Ok(())
            });
        }
    });
    let proxy = routed("services: []\n", server_addr)?;

    let mut client = TcpStream::connect(proxy.addr).await?;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nX-MixedCase-Header: 1\r\n\r\n")
        .await?;
    let head = timeout(PATIENCE, heads.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no request"))?;
    assert!(head.contains("X-MixedCase-Header: 1"), "{head}");
    let response = read_head(&mut client).await?;
    assert!(response.contains("X-Server-Header: Yes"), "{response}");

    let mut client = TcpStream::connect(proxy.addr).await?;
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await?;
    let response = timeout(PATIENCE, read_head(&mut client)).await??;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    client.write_all(b"frames both ways").await?;
    let mut echoed = [0u8; 16];
    timeout(PATIENCE, client.read_exact(&mut echoed)).await??;
    assert_eq!(&echoed, b"frames both ways");
    Ok(())
}

#[tokio::test]
async fn a_request_on_a_connection_the_server_just_closed_is_retried() -> anyhow::Result<()> {
    // Each connection answers its first request with keep-alive, then takes the next request
    // and closes without answering: the keep-alive race of istio#13205, made certain.
    let server = TcpListener::bind((LOCALHOST, 0)).await?;
    let server_addr = server.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = server.accept().await {
            tokio::spawn(async move {
                read_head(&mut stream).await?;
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await?;
                read_head(&mut stream).await?;
                anyhow::Ok(())
            });
        }
    });
    let proxy = routed("services: []\n", server_addr)?;
    for _ in 0..3 {
        let answer = send(proxy.addr, get("app", "/")).await?;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(
        proxy
            .metrics
            .http
            .retry_count("unknown", "stale-connection"),
        2
    );
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "200"), ("response_flags", "-")],
        3.0,
    )
    .await;
    Ok(())
}

#[test]
fn the_http_section_rejects_bad_input_with_the_reason() {
    let error = |yaml: &str| {
        serde_yaml::from_str::<HttpConfig>(yaml)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(
        error("routes: [{name: r, destinations: [{service: nope}]}]")
            .contains("\"nope\" is not defined")
    );
    assert!(
        error("routes: [{name: r, match: {path: {regex: '('}}, destinations: []}]")
            .contains("invalid regex")
    );
    assert!(
        error("services: [{name: s, connectionPool: {idleTimeout: forever}}]")
            .contains("invalid duration")
    );
    assert!(error("ports: [{port: 80, protocol: smtp}]").contains("unknown variant `smtp`"));
    assert!(error("services: [{name: s, lb: x}]").contains("unknown field `lb`"));
    let config: HttpConfig =
        serde_yaml::from_str("ports: [{port: 3306, protocol: tcp}]").expect("valid");
    assert_eq!(
        config.port_protocol(3306),
        sidecar_proxy::http::PortProtocol::Tcp
    );
    assert_eq!(
        config.port_protocol(80),
        sidecar_proxy::http::PortProtocol::Detect
    );
}

#[test]
fn a_bad_http_section_is_reported_with_file_line_and_reason() {
    let text = "\
trustDomain: cluster.local
identity: {certificateChain: c, privateKey: k, trustBundle: b}
http:
  services:
    - name: web
  routes:
    - name: canary
      destinations: [{service: web-v3}]
";
    let path = std::path::Path::new("/etc/sidecar/mesh.yaml");
    let error = sidecar_proxy::mesh::config::MeshConfig::parse(text.as_bytes(), path)
        .expect_err("an unknown service");
    assert_eq!(error.location.map(|(line, _)| line), Some(4), "{error}");
    let shown = error.to_string();
    assert!(
        shown.starts_with("mesh config /etc/sidecar/mesh.yaml line 4 column "),
        "{shown}"
    );
    assert!(
        shown.contains("route \"canary\": destination service \"web-v3\" is not defined"),
        "{shown}"
    );

    let error = sidecar_proxy::mesh::config::MeshConfig::parse(
        text.replace("{service: web-v3}", "{service: web}")
            .replace(
                "    - name: web\n",
                "    - name: web\n      connectionPool: {maxConnections: 0}\n",
            )
            .as_bytes(),
        path,
    )
    .expect_err("no connections allowed");
    assert_eq!(error.location.map(|(line, _)| line), Some(5), "{error}");
    assert!(
        error
            .to_string()
            .contains("maxConnections must be at least 1"),
        "{error}"
    );
}

#[tokio::test]
async fn h2c_requests_are_routed_as_http2() -> anyhow::Result<()> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let backend_addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let version = format!("{:?}", request.version());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        version,
                    ))))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    let proxy = routed("services: []\n", backend_addr)?;
    let stream = TcpStream::connect(proxy.addr).await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(connection);
    for _ in 0..3 {
        let request = Request::get("http://grpc.local/pkg.Service/Method")
            .header("content-type", "application/grpc")
            .body(Full::<Bytes>::default())?;
        let response = timeout(PATIENCE, sender.send_request(request)).await??;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await?.to_bytes();
        assert_eq!(&body[..], b"HTTP/2.0");
    }
    wait_for_requests(
        &proxy.metrics,
        &[("request_protocol", "grpc"), ("response_code", "200")],
        3.0,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn failing_endpoints_are_ejected_until_none_is_healthy() -> anyhow::Result<()> {
    let closed = TcpListener::bind((LOCALHOST, 0)).await?.local_addr()?;
    let proxy = routed(
        &format!(
            "
services:
  - name: down
    hosts: [down]
    endpoints: ['{closed}']
    outlierDetection: {{consecutiveFailures: 2, ejectionTime: 1m}}
"
        ),
        closed,
    )?;
    for _ in 0..2 {
        assert_eq!(
            send(proxy.addr, get("down", "/")).await?.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(
        send(proxy.addr, get("down", "/")).await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    wait_for_requests(&proxy.metrics, &[("response_flags", "UF")], 2.0).await;
    wait_for_requests(&proxy.metrics, &[("response_flags", "UH")], 1.0).await;
    Ok(())
}

#[tokio::test]
async fn idle_upstream_connections_are_reused_then_closed_at_the_idle_timeout() -> anyhow::Result<()>
{
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let backend_addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (accepted_count, closed_count) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted_count.fetch_add(1, Ordering::SeqCst);
            let closed_count = closed_count.clone();
            tokio::spawn(async move {
                while read_head(&mut stream).await.is_ok() {
                    stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await?;
                }
                closed_count.fetch_add(1, Ordering::SeqCst);
                anyhow::Ok(())
            });
        }
    });
    let proxy = routed(
        &format!(
            "services: [{{name: app, hosts: [app], endpoints: ['{backend_addr}'], connectionPool: {{idleTimeout: 300ms}}}}]\n"
        ),
        backend_addr,
    )?;
    for _ in 0..3 {
        assert_eq!(
            send(proxy.addr, get("app", "/")).await?.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one pooled connection for sequential requests"
    );
    wait_until("the idle connection is closed by the proxy", || {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        send(proxy.addr, get("app", "/")).await?.status,
        StatusCode::OK
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn a_client_leaving_before_the_response_is_recorded_with_dc() -> anyhow::Result<()> {
    let slow = backend("slow", |_| Reply {
        status: 200,
        delay: Duration::from_millis(300),
    })
    .await?;
    let proxy = routed("services: []\n", slow.addr)?;
    let mut client = TcpStream::connect(proxy.addr).await?;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        .await?;
    wait_until("the request reaches the backend", || {
        slow.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(client);
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "0"), ("response_flags", "DC")],
        1.0,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn invalid_http_is_answered_400_and_counted() -> anyhow::Result<()> {
    let app = backend("app", |_| OK).await?;
    let proxy = routed("services: []\n", app.addr)?;
    let mut client = TcpStream::connect(proxy.addr).await?;
    client
        .write_all(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n")
        .await?;
    let mut response = String::new();
    timeout(PATIENCE, client.read_to_string(&mut response)).await??;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    wait_until("the protocol error is counted", || {
        proxy.metrics.failure_count(
            sidecar_proxy::telemetry::metrics::Direction::Outbound,
            sidecar_proxy::telemetry::metrics::FailureReason::HttpProtocolError,
        ) == 1
    })
    .await;
    assert_eq!(app.hits.load(Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn a_route_rate_limit_answers_429_with_rl_beyond_its_burst() -> anyhow::Result<()> {
    let web = backend("web", |_| OK).await?;
    let proxy = routed(
        &format!(
            "
services: [{{name: web, endpoints: ['{}']}}]
routes: [{{name: limited, destinations: [{{service: web}}], rateLimit: {{requestsPerSecond: 1, burst: 2}}}}]
",
            web.addr
        ),
        web.addr,
    )?;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(send(proxy.addr, get("web", "/")).await?.status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(
        web.hits.load(Ordering::SeqCst),
        2,
        "the refused one never left"
    );
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "429"), ("response_flags", "RL")],
        1.0,
    )
    .await;
    Ok(())
}

#[tokio::test]
async fn injected_faults_delay_or_answer_and_a_reload_removes_them() -> anyhow::Result<()> {
    let web = backend("web", |_| OK).await?;
    let section = |fault: &str| {
        format!(
            "http:\n  services: [{{name: web, endpoints: ['{}']}}]\n  routes:\n    - {{name: faulty, destinations: [{{service: web}}]{fault}}}\n",
            web.addr
        )
    };
    let pki = Pki::new()?;
    let dir = pki.workload("client", "client", valid(), None)?;
    let abort = ", fault: {abort: {percentage: {value: 100}, httpStatus: 418}}";
    let config = write_mesh_config(&dir, &section(abort))?;
    let metrics = Arc::new(Metrics::new(&local("client"))?);
    let mesh = watched_mesh(&config, &metrics)?;
    let proxy = start_proxy(mesh, web.addr, Duration::from_millis(200))?;

    assert_eq!(
        send(proxy.addr, get("web", "/")).await?.status,
        StatusCode::IM_A_TEAPOT
    );
    assert_eq!(web.hits.load(Ordering::SeqCst), 0);
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "418"), ("response_flags", "FI")],
        1.0,
    )
    .await;

    let delay = ", fault: {delay: {percentage: {value: 100}, fixedDelay: 300ms}}";
    write_mesh_config(&dir, &section(delay))?;
    wait_until("the delay config is taken", || {
        metrics.reload_count(ReloadKind::MeshConfig, true) == 1
    })
    .await;
    let started = Instant::now();
    assert_eq!(
        send(proxy.addr, get("web", "/")).await?.status,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "200"), ("response_flags", "DI")],
        1.0,
    )
    .await;

    write_mesh_config(&dir, &section(""))?;
    wait_until("the config without faults is taken", || {
        metrics.reload_count(ReloadKind::MeshConfig, true) == 2
    })
    .await;
    assert_eq!(
        send(proxy.addr, get("web", "/")).await?.status,
        StatusCode::OK
    );
    wait_for_requests(
        &proxy.metrics,
        &[("response_code", "200"), ("response_flags", "-")],
        1.0,
    )
    .await;
    Ok(())
}

#[test]
fn rate_limits_and_faults_reject_bad_values_with_the_reason() {
    let error = |route_extra: &str| {
        serde_yaml::from_str::<HttpConfig>(&format!(
            "services: [{{name: s}}]\nroutes: [{{name: r, destinations: [{{service: s}}]{route_extra}}}]"
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    assert!(error(", rateLimit: {requestsPerSecond: 0}").contains("must be above 0"));
    assert!(error(", rateLimit: {requestsPerSecond: 5, burst: 0}").contains("must be above 0"));
    assert!(
        error(", fault: {abort: {percentage: {value: 120}, httpStatus: 503}}")
            .contains("not between 0 and 100")
    );
    assert!(
        error(", fault: {abort: {percentage: {value: 10}, httpStatus: 99}}")
            .contains("not an HTTP status")
    );
    assert!(
        error(", fault: {delay: {percentage: {value: 10}, fixedDelay: soon}}")
            .contains("invalid duration")
    );
    assert_eq!(error(", rateLimit: {requestsPerSecond: 5}"), "");
}

/// A proxy to `app` whose detection waits for the client as long as the test does, so a
/// connection opened before its first request is still told HTTP.
fn patient_proxy(app: SocketAddr) -> anyhow::Result<Running> {
    let mesh = Arc::new(MeshHandle::new(Mesh::plaintext_with_routes(http_config(
        "services: []\n",
    ))));
    start_proxy(mesh, app, PATIENCE)
}

type Http1Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1 connection to `proxy`: its sender, and its end (the server closing it).
async fn http1_connection(
    proxy: SocketAddr,
) -> anyhow::Result<(Http1Sender, tokio::task::JoinHandle<hyper::Result<()>>)> {
    let stream = TcpStream::connect(proxy).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    Ok((sender, tokio::spawn(connection)))
}

/// Starts draining `proxy` (for at most 30 s); the handle completes once it has drained.
fn start_draining(proxy: &Running) -> tokio::task::JoinHandle<()> {
    let drain = proxy.drain.clone();
    tokio::spawn(async move {
        drain
            .run(Duration::from_secs(30), std::future::pending())
            .await;
    })
}

fn closes(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONNECTION)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"close"))
}

async fn ended<T>(what: &str, task: tokio::task::JoinHandle<T>) -> T {
    timeout(PATIENCE, task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end"))
        .unwrap_or_else(|error| panic!("{what}: {error}"))
}

#[tokio::test]
async fn draining_closes_http1_connections_once_their_request_in_flight_is_answered()
-> anyhow::Result<()> {
    let slow = Reply {
        status: 200,
        delay: Duration::from_millis(500),
    };
    // The second request is the slow one, in flight when the drain starts.
    let app = backend("app", move |n| if n == 1 { slow } else { OK }).await?;
    let proxy = patient_proxy(app.addr)?;

    let (mut idle, idle_closed) = http1_connection(proxy.addr).await?;
    let answer = timeout(PATIENCE, idle.send_request(get("app", "/"))).await??;
    assert!(!closes(answer.headers()));
    answer.into_body().collect().await?;
    let (mut busy, busy_closed) = http1_connection(proxy.addr).await?;
    let in_flight = tokio::spawn(busy.send_request(get("app", "/slow")));
    wait_until("the slow request reached the app", || {
        app.hits.load(Ordering::SeqCst) == 2
    })
    .await;
    let (mut fresh, fresh_closed) = http1_connection(proxy.addr).await?;

    let drained = start_draining(&proxy);
    // Idle between requests: closed at once.
    ended("the idle connection", idle_closed).await?;
    // Opened but not used yet: its first request is served, and it closes after.
    let answer = timeout(PATIENCE, fresh.send_request(get("app", "/"))).await??;
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(closes(answer.headers()), "{:?}", answer.headers());
    answer.into_body().collect().await?;
    ended("the fresh connection", fresh_closed).await?;
    // Opened while draining: served the same way.
    let late = send(proxy.addr, get("app", "/")).await?;
    assert_eq!(late.status, StatusCode::OK);
    assert!(closes(&late.headers), "{:?}", late.headers);
    // In flight: answered, then closed.
    assert!(!drained.is_finished(), "a request is still in flight");
    let answer = ended("the slow request", in_flight).await?;
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(closes(answer.headers()), "{:?}", answer.headers());
    assert_eq!(&answer.into_body().collect().await?.to_bytes()[..], b"app");
    ended("the busy connection", busy_closed).await?;
    ended("the drain", drained).await;
    Ok(())
}

#[tokio::test]
async fn draining_sends_http2_goaway_and_finishes_the_streams_in_flight() -> anyhow::Result<()> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let app_addr = listener.local_addr()?;
    let slow_started = Arc::new(tokio::sync::Notify::new());
    let started = slow_started.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let started = started.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let started = started.clone();
                    async move {
                        if request.uri().path() == "/slow" {
                            started.notify_one();
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"h2"),
                        )))
                    }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    let proxy = patient_proxy(app_addr)?;
    let stream = TcpStream::connect(proxy.addr).await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await?;
    let closed = tokio::spawn(connection);
    let request = |path: &str| {
        Request::get(format!("http://app{path}"))
            .body(Full::<Bytes>::default())
            .expect("a valid request")
    };
    let answer = timeout(PATIENCE, sender.send_request(request("/"))).await??;
    assert_eq!(answer.status(), StatusCode::OK);
    let in_flight = tokio::spawn(sender.send_request(request("/slow")));
    timeout(PATIENCE, slow_started.notified()).await?;

    let drained = start_draining(&proxy);
    // GOAWAY: the client takes no new stream on this connection...
    let deadline = Instant::now() + PATIENCE;
    while timeout(PATIENCE, sender.send_request(request("/")))
        .await?
        .is_ok()
    {
        assert!(Instant::now() < deadline, "no GOAWAY");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...while the stream in flight completes; then the connection closes.
    let answer = ended("the slow stream", in_flight).await?;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(&answer.into_body().collect().await?.to_bytes()[..], b"h2");
    ended("the connection", closed).await?;
    ended("the drain", drained).await;
    Ok(())
}

#[tokio::test]
async fn an_upgraded_connection_holds_the_drain_until_it_ends() -> anyhow::Result<()> {
    let server = TcpListener::bind((LOCALHOST, 0)).await?;
    let server_addr = server.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = server.accept().await {
            tokio::spawn(async move {
                read_head(&mut stream).await?;
                stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await?;
                let (mut reader, mut writer) = stream.split();
                tokio::io::copy(&mut reader, &mut writer).await?;
                anyhow::Ok(())
            });
        }
    });
    let proxy = patient_proxy(server_addr)?;
    let mut client = TcpStream::connect(proxy.addr).await?;
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await?;
    let response = timeout(PATIENCE, read_head(&mut client)).await??;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");

    let drained = start_draining(&proxy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!drained.is_finished(), "the upgraded connection is open");
    client.write_all(b"still carried").await?;
    let mut echoed = [0u8; 13];
    timeout(PATIENCE, client.read_exact(&mut echoed)).await??;
    assert_eq!(&echoed, b"still carried");
    drop(client);
    ended("the drain", drained).await;
    Ok(())
}
