//! A full mTLS hop on loopback, no root needed: app -> outbound proxy -> (tap) -> inbound
//! proxy -> app, each proxy with its own certificate files and watched mesh config, the
//! original destinations fixed as though redirected.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use sidecar_proxy::{
    Timeouts,
    telemetry::metrics::{Direction, FailureReason, Metrics, ReloadKind},
    testing::*,
    tls::issue::Validity,
};

/// The two proxies of a hop, and what crossed the wire between them.
pub struct Hop {
    pub client: Running,
    pub server: Running,
    pub server_config: PathBuf,
    /// Where the client side sends the server's traffic (through the tap).
    pub tap: SocketAddr,
    pub wire: Arc<Mutex<Vec<u8>>>,
    /// Connections through the tap that have ended, both ways.
    pub tap_closed: Arc<AtomicUsize>,
}

/// Starts the server side for `app` with the certificates in `server_dir` and the inbound
/// section `inbound(app port)`, then the client side with those in `client_dir`, expecting the
/// server to be one of the service accounts `expected`.
pub async fn start_hop(
    server_dir: &Path,
    client_dir: &Path,
    inbound: impl Fn(u16) -> String,
    expected: &[&str],
    app: SocketAddr,
) -> anyhow::Result<Hop> {
    start_hop_with(server_dir, client_dir, inbound, expected, app, timeouts()).await
}

/// [`start_hop`], both sides with `timeouts`.
async fn start_hop_with(
    server_dir: &Path,
    client_dir: &Path,
    inbound: impl Fn(u16) -> String,
    expected: &[&str],
    app: SocketAddr,
    timeouts: Timeouts,
) -> anyhow::Result<Hop> {
    let server_config = write_mesh_config(server_dir, &inbound(app.port()))?;
    let server_metrics = Arc::new(Metrics::new(&local("server"))?);
    let server_mesh = watched_mesh(&server_config, &server_metrics)?;
    let server = start_inbound_with_timeouts(app, server_mesh, server_metrics, timeouts)?;

    let (tap, wire, tap_closed) = start_tap(server.addr).await?;
    let client_config = write_mesh_config(client_dir, &server_workload(tap, expected))?;
    let client_metrics = Arc::new(Metrics::new(&local("client"))?);
    let client_mesh = watched_mesh(&client_config, &client_metrics)?;
    let client = start_outbound(|_| tap, client_mesh, client_metrics, timeouts)?;
    Ok(Hop {
        client,
        server,
        server_config,
        tap,
        wire,
        tap_closed,
    })
}

/// The client's `workloads` section: `tap` is the server, one of the service accounts `expected`.
pub fn server_workload(tap: SocketAddr, expected: &[&str]) -> String {
    let identities = expected
        .iter()
        .map(|sa| Pki::id(sa).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "workloads:\n  - name: server\n    addresses: [127.0.0.1]\n    ports: [{}]\n    identities: [{identities}]\n",
        tap.port()
    )
}

/// Rewrites the client side's mesh config in `client_dir` (after its identity block) to
/// `rest`, and waits until the client has reloaded it.
pub async fn rewrite_client_config(hop: &Hop, client_dir: &Path, rest: &str) -> anyhow::Result<()> {
    let reloads = || {
        hop.client
            .metrics
            .reload_count(ReloadKind::MeshConfig, true)
    };
    let before = reloads();
    write_mesh_config(client_dir, rest)?;
    wait_until("the client reloaded its config", || reloads() == before + 1).await;
    Ok(())
}

/// Forwards to `to`, recording what the client side sends and counting the connections
/// that ended.
async fn start_tap(
    to: SocketAddr,
) -> anyhow::Result<(SocketAddr, Arc<Mutex<Vec<u8>>>, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let wire = Arc::new(Mutex::new(Vec::new()));
    let recorded = wire.clone();
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    tokio::spawn(async move {
        while let Ok((downstream, _)) = listener.accept().await {
            let (recorded, counted) = (recorded.clone(), counted.clone());
            tokio::spawn(async move {
                let upstream = TcpStream::connect(to).await?;
                let (mut down_read, mut down_write) = downstream.into_split();
                let (mut up_read, mut up_write) = upstream.into_split();
                let forward = async {
                    let mut buf = [0u8; 4096];
                    loop {
                        let read = down_read.read(&mut buf).await?;
                        if read == 0 {
                            return up_write.shutdown().await;
                        }
                        recorded
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .extend_from_slice(&buf[..read]);
                        up_write.write_all(&buf[..read]).await?;
                    }
                };
                let backward = async {
                    tokio::io::copy(&mut up_read, &mut down_write).await?;
                    down_write.shutdown().await
                };
                // A failure either way (a reset) ends both, as a reset connection would.
                let ended = tokio::try_join!(forward, backward);
                counted.fetch_add(1, Ordering::SeqCst);
                ended
            });
        }
    });
    Ok((addr, wire, closed))
}

pub const STRICT: fn(u16) -> String = |_| "inbound:\n  mode: STRICT\n".to_owned();

fn failures(running: &Running, direction: Direction, reason: FailureReason) -> u64 {
    running.metrics.failure_count(direction, reason)
}

fn opened(running: &Running, labels: &[(&str, &str)]) -> u64 {
    metric(
        &running.metrics,
        "istio_tcp_connections_opened_total",
        labels,
    )
}

#[tokio::test]
async fn mutual_tls_hop_carries_identities_and_only_ciphertext() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let echo = start_echo_after_eof().await?;
    let hop = start_hop(&server_dir, &client_dir, STRICT, &["server"], echo).await?;

    let payload = b"a secret that must never cross the wire in clear ".repeat(100);
    assert_eq!(round_trip(hop.client.addr, &payload).await?, payload);

    let client_id = Pki::id("client").to_string();
    let server_id = Pki::id("server").to_string();
    let source_labels = [
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", client_id.as_str()),
        ("destination_principal", server_id.as_str()),
        ("destination_workload", "server"),
    ];
    let destination_labels = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", client_id.as_str()),
        ("source_workload_namespace", "default"),
        ("destination_principal", server_id.as_str()),
    ];
    assert_eq!(opened(&hop.client, &source_labels), 1);
    assert_eq!(opened(&hop.server, &destination_labels), 1);
    let received =
        |running: &Running| metric(&running.metrics, "istio_tcp_received_bytes_total", &[]);
    wait_until("both sides counted the request bytes", || {
        received(&hop.client) == payload.len() as u64
            && received(&hop.server) == payload.len() as u64
    })
    .await;

    let wire = hop
        .wire
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(wire.first(), Some(&0x16), "a TLS handshake record first");
    assert!(wire.len() > payload.len(), "the payload crossed, encrypted");
    assert!(
        !wire.windows(16).any(|w| payload.starts_with(w)),
        "plaintext payload bytes seen on the wire"
    );
    for running in [&hop.client, &hop.server] {
        assert_eq!(
            metric(&running.metrics, "sidecar_outbound_failures_total", &[])
                + metric(&running.metrics, "sidecar_inbound_failures_total", &[]),
            0
        );
    }
    Ok(())
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_accepts_both() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let echo = start_echo_after_eof().await?;
    let hop = start_hop(&server_dir, &client_dir, STRICT, &["server"], echo).await?;

    expect_refused(hop.server.addr, b"GET / HTTP/1.1\r\n\r\n").await?;
    wait_until("plaintext to STRICT is counted", || {
        failures(
            &hop.server,
            Direction::Inbound,
            FailureReason::PlaintextRefused,
        ) == 1
    })
    .await;

    // The same server switched to PERMISSIVE by a config reload.
    write_mesh_config(&server_dir, "inbound:\n  mode: PERMISSIVE\n")?;
    wait_until("the server reloaded its config", || {
        hop.server
            .metrics
            .reload_count(ReloadKind::MeshConfig, true)
            == 1
    })
    .await;
    assert_eq!(round_trip(hop.server.addr, b"plain").await?, b"plain");
    assert_eq!(round_trip(hop.client.addr, b"mutual").await?, b"mutual");
    assert_eq!(
        opened(
            &hop.server,
            &[
                ("connection_security_policy", "none"),
                ("reporter", "destination")
            ]
        ),
        1
    );
    assert_eq!(
        opened(&hop.server, &[("connection_security_policy", "mutual_tls")]),
        1
    );
    Ok(())
}

#[tokio::test]
async fn permissive_never_stalls_a_server_that_speaks_first() -> anyhow::Result<()> {
    // An app that greets before reading (as MySQL or SMTP do), behind a PERMISSIVE proxy.
    let app = TcpListener::bind((LOCALHOST, 0)).await?;
    let app_addr = app.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = app.accept().await {
            let _ = stream.write_all(b"220 ready\r\n").await;
        }
    });
    let server = start_inbound(
        app_addr,
        plaintext_mesh(),
        Arc::new(Metrics::new(&local("server"))?),
    )?;
    let mut client = TcpStream::connect(server.addr).await?;
    let mut banner = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut banner)).await??;
    assert_eq!(&banner, b"220 ready\r\n");
    Ok(())
}

/// Starts a STRICT hop with these certificates, makes one connection, and returns the hop
/// once the expected refusal is counted on `side`.
async fn expect_hop_refusal(
    server_dir: &Path,
    client_dir: &Path,
    expected: &[&str],
    side: Direction,
    reason: FailureReason,
) -> anyhow::Result<Hop> {
    let echo = start_echo_after_eof().await?;
    let hop = start_hop(server_dir, client_dir, STRICT, expected, echo).await?;
    expect_refused(hop.client.addr, b"request").await?;
    let counted_on = match side {
        Direction::Outbound => &hop.client,
        Direction::Inbound => &hop.server,
    };
    wait_until(
        &format!("{} counted on the {} side", reason.name(), side.name()),
        || failures(counted_on, side, reason) == 1,
    )
    .await;
    Ok(hop)
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused_by_the_client() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let other_ca = Pki::new()?;
    // Issued by the other CA, though it trusts ours (so only the client can object).
    let server_dir = other_ca.workload("server", "server", valid(), Some(&pki.ca.cert_pem))?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let hop = expect_hop_refusal(
        &server_dir,
        &client_dir,
        &["server"],
        Direction::Outbound,
        FailureReason::PeerCertUnknownCa,
    )
    .await?;
    // The server learns why from the client's alert.
    wait_until("the server counted the client's alert", || {
        failures(
            &hop.server,
            Direction::Inbound,
            FailureReason::TlsRejectedByPeer,
        ) == 1
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let valid_server = pki.workload("server", "server", valid(), None)?;
    let valid_client = pki.workload("client", "client", valid(), None)?;

    let expired_server = pki.workload("expired-server", "server", Validity::expired(), None)?;
    expect_hop_refusal(
        &expired_server,
        &valid_client,
        &["server"],
        Direction::Outbound,
        FailureReason::PeerCertExpired,
    )
    .await?;

    let expired_client = pki.workload("expired-client", "client", Validity::expired(), None)?;
    let hop = expect_hop_refusal(
        &valid_server,
        &expired_client,
        &["server"],
        Direction::Inbound,
        FailureReason::PeerCertExpired,
    )
    .await?;
    // TLS 1.3: the client finished its handshake before the server objected; it learns at
    // its first read, and counts that too.
    wait_until("the client counted the server's alert", || {
        failures(
            &hop.client,
            Direction::Outbound,
            FailureReason::TlsRejectedByPeer,
        ) == 1
    })
    .await;

    let now = time::OffsetDateTime::now_utc();
    let future = Validity {
        not_before: now + Duration::from_secs(3600),
        not_after: now + Duration::from_secs(7200),
    };
    let future_client = pki.workload("future-client", "client", future, None)?;
    expect_hop_refusal(
        &valid_server,
        &future_client,
        &["server"],
        Direction::Inbound,
        FailureReason::PeerCertNotYetValid,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_server_with_an_unexpected_identity_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let imposter = pki.workload("server", "imposter", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    expect_hop_refusal(
        &imposter,
        &client_dir,
        &["server"],
        Direction::Outbound,
        FailureReason::PeerIdentityMismatch,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn unauthorized_peers_are_refused_until_a_rule_allows_them() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let only_admin = |port: u16| {
        format!(
            "inbound:\n  mode: STRICT\n  ports:\n    - port: {port}\n      allow:\n        - principal: {}\n",
            Pki::id("admin")
        )
    };
    let echo = start_echo_after_eof().await?;
    let hop = start_hop(&server_dir, &client_dir, only_admin, &["server"], echo).await?;
    expect_refused(hop.client.addr, b"request").await?;
    wait_until("the denial is counted", || {
        failures(&hop.server, Direction::Inbound, FailureReason::Unauthorized) == 1
    })
    .await;

    // Allow the client's namespace, by a reload.
    let allow_namespace = format!(
        "inbound:\n  mode: STRICT\n  ports:\n    - port: {}\n      allow:\n        - principal: {}\n        - namespace: default\n",
        echo.port(),
        Pki::id("admin")
    );
    write_mesh_config(&server_dir, &allow_namespace)?;
    wait_until("the server reloaded its config", || {
        hop.server
            .metrics
            .reload_count(ReloadKind::MeshConfig, true)
            == 1
    })
    .await;
    assert_eq!(round_trip(hop.client.addr, b"allowed").await?, b"allowed");
    Ok(())
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_while_old_ones_keep_working()
-> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let echo = start_streaming_echo().await?;
    let hop = start_hop(
        &server_dir,
        &client_dir,
        STRICT,
        &["server", "server-v2"],
        echo,
    )
    .await?;

    let mut established = TcpStream::connect(hop.client.addr).await?;
    assert_eq!(echo_chunk(&mut established, b"before").await?, b"before");

    // Rotate in place: a new key and a certificate for a new identity.
    pki.workload("server", "server-v2", valid(), None)?;
    wait_until("the server reloaded its certificate", || {
        hop.server
            .metrics
            .reload_count(ReloadKind::Certificates, true)
            == 1
    })
    .await;

    let mut fresh = TcpStream::connect(hop.client.addr).await?;
    assert_eq!(echo_chunk(&mut fresh, b"fresh").await?, b"fresh");
    let v2 = Pki::id("server-v2").to_string();
    assert_eq!(
        opened(&hop.client, &[("destination_principal", v2.as_str())]),
        1
    );
    assert_eq!(echo_chunk(&mut established, b"after").await?, b"after");
    Ok(())
}

#[tokio::test]
async fn a_bundle_with_two_roots_accepts_peers_of_either_ca() -> anyhow::Result<()> {
    // CA rotation: the client still has a certificate of the old CA, the server one of the
    // new CA, and both trust both.
    let old = Pki::new()?;
    let new = Pki::new()?;
    let bundle = format!("{}{}", old.ca.cert_pem, new.ca.cert_pem);
    let client_dir = old.workload("client", "client", valid(), Some(&bundle))?;
    let server_dir = new.workload("server", "server", valid(), Some(&bundle))?;
    let echo = start_echo_after_eof().await?;
    let hop = start_hop(&server_dir, &client_dir, STRICT, &["server"], echo).await?;
    assert_eq!(
        round_trip(hop.client.addr, b"across CAs").await?,
        b"across CAs"
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_config_is_rejected_and_the_old_one_stays() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let echo = start_echo_after_eof().await?;
    let hop = start_hop(&server_dir, &client_dir, STRICT, &["server"], echo).await?;

    replace(
        &hop.server_config,
        "trustDomain: cluster.local\ninbound: {mode: LAX}\n",
    )?;
    wait_until("the rejection is counted", || {
        hop.server
            .metrics
            .reload_count(ReloadKind::MeshConfig, false)
            == 1
    })
    .await;
    // Still STRICT, still serving mTLS.
    assert_eq!(
        round_trip(hop.client.addr, b"still here").await?,
        b"still here"
    );
    expect_refused(hop.server.addr, b"plaintext").await?;
    wait_until("plaintext is still refused", || {
        failures(
            &hop.server,
            Direction::Inbound,
            FailureReason::PlaintextRefused,
        ) == 1
    })
    .await;
    Ok(())
}

/// Answers every request on a connection with `200 ok`, keeping the connection open.
async fn start_http_app() -> anyhow::Result<SocketAddr> {
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
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await?;
                    }
                }
                anyhow::Ok(())
            });
        }
    });
    Ok(addr)
}

/// Sends `GET path` on a kept-alive connection and expects the app's `200 ok`.
async fn get_ok(client: &mut TcpStream, path: &str) -> anyhow::Result<()> {
    client
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: server\r\n\r\n").as_bytes())
        .await?;
    // The head (hyper adds a `date`), then the 2-byte body.
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\nok") {
        tokio::time::timeout(PATIENCE, client.read_exact(&mut byte)).await??;
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"), "{response:?}");
    Ok(())
}

#[tokio::test]
async fn http_requests_to_a_mesh_workload_go_over_mutual_tls() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let app = start_http_app().await?;
    let hop = start_hop(&server_dir, &client_dir, STRICT, &["server"], app).await?;

    let mut client = TcpStream::connect(hop.client.addr).await?;
    for _ in 0..2 {
        get_ok(&mut client, "/secret-path").await?;
    }

    let client_id = Pki::id("client").to_string();
    let server_id = Pki::id("server").to_string();
    let labels = [
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", client_id.as_str()),
        ("destination_principal", server_id.as_str()),
        ("destination_workload", "server"),
        ("response_code", "200"),
    ];
    wait_until("both requests are counted with the mTLS identities", || {
        metric(&hop.client.metrics, "istio_requests_total", &labels) == 2
    })
    .await;
    let wire = hop
        .wire
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(wire.first(), Some(&0x16), "a TLS handshake record first");
    assert!(
        !wire.windows(12).any(|w| w == b"/secret-path"),
        "the request crossed the wire in clear"
    );
    Ok(())
}

/// What the server side reports of a request over mesh mTLS: every label Istio's dashboards
/// and Kiali read, the peer's identity among them.
#[tokio::test]
async fn http_over_mutual_tls_is_reported_by_the_destination_with_both_identities()
-> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let app = start_http_app().await?;
    let hop = start_hop(&server_dir, &client_dir, STRICT, &["server"], app).await?;
    let mut client = TcpStream::connect(hop.client.addr).await?;
    for _ in 0..2 {
        get_ok(&mut client, "/reviews").await?;
    }

    let client_id = Pki::id("client").to_string();
    let server_id = Pki::id("server").to_string();
    let expected: std::collections::BTreeMap<String, String> = [
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("source_workload_namespace", "default"),
        ("source_principal", client_id.as_str()),
        ("source_app", "unknown"),
        ("source_version", "unknown"),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "test-ns"),
        ("destination_principal", server_id.as_str()),
        ("destination_service", "unknown"),
        ("destination_service_name", "unknown"),
        ("destination_service_namespace", "unknown"),
        ("destination_app", "unknown"),
        ("destination_version", "unknown"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    wait_for_series(&hop.server.metrics, &expected, 2.0).await;
    assert_eq!(request_series("destination", &hop.server.metrics).len(), 1);
    // The client side reports the same requests as their source.
    let source = [
        ("reporter", "source"),
        ("source_principal", client_id.as_str()),
        ("destination_principal", server_id.as_str()),
        ("response_code", "200"),
    ];
    assert_eq!(
        metric(&hop.client.metrics, "istio_requests_total", &source),
        2
    );
    Ok(())
}

/// Authorization still applies to the connection, before any request: a peer the port's
/// rules do not allow gets no request to the app, and none is reported as served.
#[tokio::test]
async fn an_unauthorized_peers_http_never_reaches_the_app() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let app = TcpListener::bind((LOCALHOST, 0)).await?;
    let app_addr = app.local_addr()?;
    let admin_only = |port: u16| {
        format!(
            "inbound:\n  mode: STRICT\n  ports:\n    - port: {port}\n      allow:\n        - principal: {}\n",
            Pki::id("admin")
        )
    };
    let hop = start_hop(&server_dir, &client_dir, admin_only, &["server"], app_addr).await?;
    let mut client = TcpStream::connect(hop.client.addr).await?;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: server\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") && client.read(&mut byte).await? == 1 {
        response.push(byte[0]);
    }
    assert!(
        response.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    wait_until("the refusal is counted", || {
        failures(&hop.server, Direction::Inbound, FailureReason::Unauthorized) >= 1
    })
    .await;
    let accepted = tokio::time::timeout(Duration::from_millis(200), app.accept()).await;
    assert!(accepted.is_err(), "the app got a connection");
    assert!(request_series("destination", &hop.server.metrics).is_empty());
    Ok(())
}

/// A server that speaks first (MySQL, SMTP) behind two sidecars: neither side holds its
/// greeting back waiting for the silent client's first bytes.
#[tokio::test]
async fn a_server_that_speaks_first_over_mutual_tls_is_not_held_up() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let app = TcpListener::bind((LOCALHOST, 0)).await?;
    let app_addr = app.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = app.accept().await {
            let _ = stream.write_all(b"220 ready\r\n").await;
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        }
    });
    // Detection that waits this long for a silent client would show.
    let patient = Timeouts {
        sniff: Duration::from_secs(4),
        ..timeouts()
    };
    let hop = start_hop_with(
        &server_dir,
        &client_dir,
        STRICT,
        &["server"],
        app_addr,
        patient,
    )
    .await?;
    let started = std::time::Instant::now();
    let mut client = TcpStream::connect(hop.client.addr).await?;
    let mut banner = [0u8; 11];
    tokio::time::timeout(PATIENCE, client.read_exact(&mut banner)).await??;
    assert_eq!(&banner, b"220 ready\r\n");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the greeting took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A PERMISSIVE server and a client whose mesh config lists it or not, with the metrics a
/// test of pooled connections across reloads reads.
struct ReloadingHop {
    hop: Hop,
    client_dir: PathBuf,
    _pki: Pki,
}

impl ReloadingHop {
    async fn start() -> anyhow::Result<Self> {
        let pki = Pki::new()?;
        let server_dir = pki.workload("server", "server", valid(), None)?;
        let client_dir = pki.workload("client", "client", valid(), None)?;
        let app = start_http_app().await?;
        let permissive = |_| "inbound:\n  mode: PERMISSIVE\n".to_owned();
        let hop = start_hop(&server_dir, &client_dir, permissive, &["server"], app).await?;
        Ok(ReloadingHop {
            hop,
            client_dir,
            _pki: pki,
        })
    }

    /// Rewrites the client's mesh config, the server listed as a mesh workload or not, and
    /// waits for the reload.
    async fn list_server(&self, listed: bool) -> anyhow::Result<()> {
        let workloads = if listed {
            server_workload(self.hop.tap, &["server"])
        } else {
            String::new()
        };
        rewrite_client_config(&self.hop, &self.client_dir, &workloads).await
    }

    /// The requests the server side served over connections of `policy` (HTTP connections
    /// carry request metrics, not TCP ones).
    fn server_requests(&self, policy: &str) -> u64 {
        metric(
            &self.hop.server.metrics,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("connection_security_policy", policy),
            ],
        )
    }

    /// The connections the server side holds open: the client's pooled ones.
    fn server_connections(&self) -> u64 {
        metric(
            &self.hop.server.metrics,
            "sidecar_listener_connections",
            &[("listener", "inbound")],
        )
    }

    async fn wait_for_server_requests(&self, policy: &str, count: u64) {
        wait_until(&format!("{count} {policy} requests served"), || {
            self.server_requests(policy) == count
        })
        .await;
    }

    async fn wait_for_server_connections(&self, count: u64) {
        wait_until(&format!("{count} connections open"), || {
            self.server_connections() == count
        })
        .await;
    }
}

#[tokio::test]
async fn a_destination_listed_by_a_reload_gets_mutual_tls_from_the_next_request()
-> anyhow::Result<()> {
    let rig = ReloadingHop::start().await?;
    rig.list_server(false).await?;
    let mut app = TcpStream::connect(rig.hop.client.addr).await?;
    get_ok(&mut app, "/one").await?;
    rig.wait_for_server_requests("none", 1).await;
    rig.wait_for_server_connections(1).await;

    // The request after the reload does not ride the pooled plaintext connection, which is
    // closed: the mTLS one is the only one left open.
    rig.list_server(true).await?;
    get_ok(&mut app, "/two").await?;
    rig.wait_for_server_requests("mutual_tls", 1).await;
    rig.wait_for_server_connections(1).await;
    assert_eq!(rig.server_requests("none"), 1);
    let client_id = Pki::id("client").to_string();
    assert_eq!(
        metric(
            &rig.hop.client.metrics,
            "istio_requests_total",
            &[
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", client_id.as_str())
            ]
        ),
        1
    );
    Ok(())
}

#[tokio::test]
async fn a_destination_removed_by_a_reload_has_its_pooled_mutual_tls_connection_closed()
-> anyhow::Result<()> {
    let rig = ReloadingHop::start().await?;
    let mut app = TcpStream::connect(rig.hop.client.addr).await?;
    get_ok(&mut app, "/one").await?;
    rig.wait_for_server_requests("mutual_tls", 1).await;
    rig.wait_for_server_connections(1).await;

    // Closed by the reload itself, before any request could reuse it.
    rig.list_server(false).await?;
    rig.wait_for_server_connections(0).await;
    get_ok(&mut app, "/two").await?;
    rig.wait_for_server_requests("none", 1).await;
    assert_eq!(rig.server_requests("mutual_tls"), 1);
    Ok(())
}

pub fn handshakes(running: &Running, kind: &str) -> u64 {
    metric(
        &running.metrics,
        "sidecar_inbound_tls_handshakes_total",
        &[("kind", kind)],
    )
}

#[tokio::test]
async fn a_second_connection_resumes_and_still_proves_the_clients_identity() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let echo = start_echo_after_eof().await?;
    // Only the client's identity may use the port: the resumed handshake must still prove it.
    let only_the_client = |port: u16| {
        format!(
            "inbound:\n  mode: STRICT\n  ports:\n    - port: {port}\n      allow:\n        - principal: {}\n",
            Pki::id("client")
        )
    };
    let hop = start_hop(&server_dir, &client_dir, only_the_client, &["server"], echo).await?;
    for _ in 0..2 {
        assert_eq!(round_trip(hop.client.addr, b"twice").await?, b"twice");
    }
    wait_until("the server counted both handshakes", || {
        handshakes(&hop.server, "full") + handshakes(&hop.server, "resumed") == 2
    })
    .await;
    assert_eq!(handshakes(&hop.server, "full"), 1);
    assert_eq!(handshakes(&hop.server, "resumed"), 1);
    let client_id = Pki::id("client").to_string();
    assert_eq!(
        opened(
            &hop.server,
            &[
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", client_id.as_str()),
            ]
        ),
        2
    );
    assert_eq!(
        failures(&hop.server, Direction::Inbound, FailureReason::Unauthorized),
        0
    );
    Ok(())
}

#[tokio::test]
async fn a_policy_without_resumption_gets_full_handshakes_only() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let echo = start_echo_after_eof().await?;
    let no_resumption = |_| "sessionResumption: false\ninbound:\n  mode: STRICT\n".to_owned();
    let hop = start_hop(&server_dir, &client_dir, no_resumption, &["server"], echo).await?;
    for _ in 0..2 {
        assert_eq!(round_trip(hop.client.addr, b"twice").await?, b"twice");
    }
    wait_until("the server counted both handshakes", || {
        handshakes(&hop.server, "full") == 2
    })
    .await;
    assert_eq!(handshakes(&hop.server, "resumed"), 0);
    Ok(())
}

/// A port with `tls` still takes mesh mTLS (told apart by its ALPN), reported as mutual TLS
/// with both identities, while a client outside the mesh gets the port's own certificate.
#[tokio::test]
async fn a_server_tls_port_still_takes_mesh_mutual_tls() -> anyhow::Result<()> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

    let pki = Pki::new()?;
    let server_dir = pki.workload("server", "server", valid(), None)?;
    let client_dir = pki.workload("client", "client", valid(), None)?;
    let partner = sidecar_proxy::tls::server_pki::PartnerCa::new("legacy CA")?;
    let own = partner.server(&["legacy.example"])?;
    replace(&server_dir.join("tls.crt"), &own.cert_pem)?;
    replace(&server_dir.join("tls.key"), &own.key_pem)?;
    let app = start_http_app().await?;
    let inbound = |port: u16| {
        format!(
            "inbound:\n  ports:\n    - {{port: {port}, tls: {{serverCertificate: tls.crt, privateKey: tls.key}}}}\n"
        )
    };
    let hop = start_hop(&server_dir, &client_dir, inbound, &["server"], app).await?;

    let mut client = TcpStream::connect(hop.client.addr).await?;
    get_ok(&mut client, "/").await?;
    let client_id = Pki::id("client").to_string();
    let labels = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", client_id.as_str()),
        ("response_code", "200"),
    ];
    wait_until("the server reports the request over mutual TLS", || {
        metric(&hop.server.metrics, "istio_requests_total", &labels) == 1
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(
        partner.cert_pem().as_bytes(),
    )?)?;
    let config = rustls::ClientConfig::builder_with_provider(sidecar_proxy::tls::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = TcpStream::connect(hop.server.addr).await?;
    let name = ServerName::try_from("legacy.example")?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(PATIENCE, connector.connect(name, stream))
        .await?
        .map_err(|error| anyhow::anyhow!("the port's own certificate: {error}"))?;
    Ok(())
}
