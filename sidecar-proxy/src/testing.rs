//! Test rig: proxies on loopback ports with a fixed original destination (as though
//! redirected), echo servers, and a lab PKI in a temporary directory.
use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;
use sidecar_common::CaptureStatus;
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use super::{
    Timeouts,
    accept::connection_limit::{ConnectionLimit, WhenFull},
    accept::listener::{AcceptLoops, Accepting, bind_listeners, local_addrs},
    accept::orig_dst::ExplicitOrigDst,
    capture::CaptureProbe,
    http::Upstreams,
    inbound::InboundProxy,
    inputs::{Entrance, ProxyInputs},
    lifecycle::drain::Drain,
    mesh::identity::SpiffeId,
    mesh::reload::{MeshSource, spawn_watcher},
    mesh::{Mesh, MeshHandle},
    outbound::OutboundProxy,
    telemetry::metrics::{Direction, LocalWorkload, Metrics},
    tls,
};
use crate::tls::issue::{CERT_CHAIN, Issued, KEY, ROOT_CERT, Validity, issue_ca, issue_workload};

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const PATIENCE: Duration = Duration::from_secs(5);
pub const TRUST_DOMAIN: &str = "cluster.local";

pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: PATIENCE,
        tls_handshake: PATIENCE,
        sniff: Duration::from_millis(200),
        idle: Duration::from_secs(3600),
        request_headers: PATIENCE,
        tcp_keepalive: Some(Duration::from_secs(300)),
    }
}

pub fn local(name: &str) -> LocalWorkload {
    LocalWorkload {
        name: name.into(),
        namespace: "test-ns".into(),
    }
}

pub fn plaintext_mesh() -> Arc<MeshHandle> {
    Arc::new(MeshHandle::new(Mesh::plaintext()))
}

/// What a test listener's connections share: a cap no test reaches, keepalive on, `drain`.
pub fn accepting(metrics: &Metrics, direction: Direction, drain: &Arc<Drain>) -> Accepting {
    const CAP: usize = 1024;
    Accepting {
        limit: ConnectionLimit::new(
            CAP,
            WhenFull::RefuseNew,
            metrics.listener(direction.name(), CAP),
        ),
        tcp_keepalive: timeouts().tcp_keepalive,
        relisten: None,
        drain: drain.clone(),
    }
}

/// A pod without eBPF capture (a test's loopback): no capture program answers, no counters.
pub struct NoCapture;

impl CaptureProbe for NoCapture {
    fn status_of(&self, _socket: BorrowedFd<'_>) -> io::Result<Option<CaptureStatus>> {
        Ok(None)
    }

    fn counters(&self, bpffs_root: &Path) -> String {
        format!(
            "bpf: unavailable: no capture under {}\n",
            bpffs_root.display()
        )
    }
}

/// A proxy listening on an ephemeral loopback port.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// Its connections; `run` it to drain them.
    pub drain: Arc<Drain>,
}

/// An outbound proxy sending everything to `target(own address)`.
pub fn start_outbound(
    target: impl FnOnce(SocketAddr) -> SocketAddr,
    mesh: Arc<MeshHandle>,
    metrics: Arc<Metrics>,
    timeouts: Timeouts,
) -> anyhow::Result<Running> {
    let listeners = bind_listeners(Direction::Outbound, &[LOCALHOST], 0)?;
    let addr = listeners[0].local_addr()?;
    let drain = Arc::new(Drain::default());
    let proxy = Arc::new(OutboundProxy {
        inputs: Arc::new(ProxyInputs {
            mesh,
            metrics: metrics.clone(),
            local: local("client"),
            timeouts,
            drain: drain.clone(),
            capture: Arc::new(NoCapture),
        }),
        entrance: Entrance {
            direction: Direction::Outbound,
            orig_dst: Arc::new(ExplicitOrigDst(target(addr))),
            listen_addrs: local_addrs(&listeners)?,
        },
        upstreams: Upstreams::default(),
        app_activity: None,
    });
    tokio::spawn(proxy.clone().close_stale_connections());
    let mut loops = AcceptLoops::default();
    loops.add(
        listeners,
        proxy,
        accepting(&metrics, Direction::Outbound, &drain),
    );
    tokio::spawn(loops.run_until(std::future::pending()));
    Ok(Running {
        addr,
        metrics,
        drain,
    })
}

/// An inbound proxy whose connections were all for `app` (as sk_lookup would tell it).
pub fn start_inbound(
    app: SocketAddr,
    mesh: Arc<MeshHandle>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Running> {
    start_inbound_with_timeouts(app, mesh, metrics, timeouts())
}

/// [`start_inbound`] with `timeouts`.
pub fn start_inbound_with_timeouts(
    app: SocketAddr,
    mesh: Arc<MeshHandle>,
    metrics: Arc<Metrics>,
    timeouts: Timeouts,
) -> anyhow::Result<Running> {
    let listeners = bind_listeners(Direction::Inbound, &[LOCALHOST], 0)?;
    let addr = listeners[0].local_addr()?;
    let drain = Arc::new(Drain::default());
    let proxy = InboundProxy {
        inputs: Arc::new(ProxyInputs {
            mesh,
            metrics: metrics.clone(),
            local: local("server"),
            timeouts,
            drain: drain.clone(),
            capture: Arc::new(NoCapture),
        }),
        entrance: Entrance {
            direction: Direction::Inbound,
            orig_dst: Arc::new(ExplicitOrigDst(app)),
            listen_addrs: local_addrs(&listeners)?,
        },
        app_pool: Arc::default(),
    };
    let mut loops = AcceptLoops::default();
    loops.add(
        listeners,
        Arc::new(proxy),
        accepting(&metrics, Direction::Inbound, &drain),
    );
    tokio::spawn(loops.run_until(std::future::pending()));
    Ok(Running {
        addr,
        metrics,
        drain,
    })
}

/// Reads the whole request (until the client's FIN), then answers it and closes.
pub async fn start_echo_after_eof() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                stream.read_to_end(&mut request).await?;
                stream.write_all(&request).await?;
                stream.shutdown().await
            });
        }
    });
    Ok(addr)
}

/// Echoes each chunk as it arrives, for connections that stay open.
pub async fn start_streaming_echo() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.into_split();
                tokio::io::copy(&mut reader, &mut writer).await
            });
        }
    });
    Ok(addr)
}

/// Two connected loopback sockets: (the connecting end, the accepted end).
pub async fn socket_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    Ok((connected?, accepted?.0))
}

pub async fn round_trip(proxy: SocketAddr, request: &[u8]) -> io::Result<Vec<u8>> {
    let mut client = TcpStream::connect(proxy).await?;
    client.write_all(request).await?;
    client.shutdown().await?;
    let mut response = Vec::new();
    timeout(PATIENCE, client.read_to_end(&mut response)).await??;
    Ok(response)
}

/// Writes `chunk` on an open connection and reads the same number of bytes back.
pub async fn echo_chunk(stream: &mut TcpStream, chunk: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(chunk).await?;
    let mut back = vec![0u8; chunk.len()];
    timeout(PATIENCE, stream.read_exact(&mut back)).await??;
    Ok(back)
}

/// The connection is closed on us without a reply: a reset, or (racing it) an empty EOF.
pub async fn expect_refused(proxy: SocketAddr, request: &[u8]) -> anyhow::Result<()> {
    let mut client = TcpStream::connect(proxy).await?;
    // The proxy may already have closed: a failed write is a refusal too.
    if client.write_all(request).await.is_err() {
        return Ok(());
    }
    let mut buf = [0u8; 16];
    match timeout(PATIENCE, client.read(&mut buf)).await? {
        Ok(0) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(())
        }
        other => bail!("expected the connection to be refused, got {other:?}"),
    }
}

pub async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sum of `name`'s samples having every `label="value"` given, read with the strict parser
/// of the integration tests: a metric missing from the exposition (a misspelt name) fails the
/// test instead of reading as 0.
pub fn metric(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = metrics.render().expect("render metrics");
    sidecar_tests::prometheus::sum(&text, name, labels).unwrap_or_else(|error| panic!("{error}"))
        as u64
}

/// Each `istio_requests_total` series `reporter` (`source`, `destination`) reported: its
/// labels, and its value.
pub fn request_series(reporter: &str, metrics: &Metrics) -> Vec<(BTreeMap<String, String>, f64)> {
    let text = metrics.render().expect("render metrics");
    let samples = sidecar_tests::prometheus::parse(&text).expect("a valid exposition");
    samples
        .into_iter()
        .filter(|sample| {
            sample.name == "istio_requests_total"
                && sample.labels.get("reporter").map(String::as_str) == Some(reporter)
        })
        .map(|sample| (sample.labels, sample.value))
        .collect()
}

/// Waits until an `istio_requests_total` series has exactly `labels` (its `reporter` among
/// them, and no other label) and the value `count`.
pub async fn wait_for_series(metrics: &Metrics, labels: &BTreeMap<String, String>, count: f64) {
    let reporter = labels.get("reporter").map_or("", String::as_str);
    wait_until(&format!("{count} requests with {labels:?}"), || {
        request_series(reporter, metrics)
            .iter()
            .any(|(series, value)| series == labels && *value == count)
    })
    .await;
}

/// A CA and workload certificate directories, in a temporary directory.
pub struct Pki {
    pub dir: TempDir,
    pub ca: Issued,
}

impl Pki {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Pki {
            dir: tempfile::tempdir()?,
            ca: issue_ca(
                TRUST_DOMAIN,
                Validity::starting_now(Duration::from_secs(86400)),
            )?,
        })
    }

    pub fn id(sa: &str) -> SpiffeId {
        SpiffeId::new(TRUST_DOMAIN, "default", sa).expect("valid SPIFFE ID")
    }

    /// Issues (or re-issues, in place) the certificate of `sa` in `<dir>/<name>/`, trusting
    /// `bundle` (default: this CA).
    pub fn workload(
        &self,
        name: &str,
        sa: &str,
        validity: Validity,
        bundle: Option<&str>,
    ) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join(name);
        fs::create_dir_all(&dir)?;
        let issued = issue_workload(&self.ca, &Self::id(sa), validity)?;
        // As `sidecar certs` does: key first, each file renamed into place.
        replace(&dir.join(KEY), &issued.key_pem)?;
        replace(&dir.join(CERT_CHAIN), &issued.cert_pem)?;
        replace(&dir.join(ROOT_CERT), bundle.unwrap_or(&self.ca.cert_pem))?;
        Ok(dir)
    }
}

/// Writes `contents` to a temporary sibling and renames it over `path`.
pub fn replace(path: &Path, contents: &str) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, contents)?;
    fs::rename(temporary, path)
}

pub fn valid() -> Validity {
    Validity::starting_now(Duration::from_secs(3600))
}

/// A mesh config in `dir` naming the certificates there, plus `rest` (YAML).
pub fn write_mesh_config(dir: &Path, rest: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("mesh.yaml");
    let text = format!(
        "trustDomain: {TRUST_DOMAIN}\nidentity:\n  certificateChain: {CERT_CHAIN}\n  privateKey: {KEY}\n  trustBundle: {ROOT_CERT}\n{rest}"
    );
    replace(&path, &text)?;
    Ok(path)
}

/// Loads `config` and keeps it watched, as the proxy does.
pub fn watched_mesh(config: &Path, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<MeshHandle>> {
    let source = MeshSource::load(config, tls::crypto_provider(), metrics.clone())?;
    let handle = source.handle();
    spawn_watcher(source)?;
    Ok(handle)
}
