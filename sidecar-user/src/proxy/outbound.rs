//! The outbound listener: accept a captured connection, find where it was going, connect
//! there, and relay both ways.
use std::{
    fmt::Display,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;
use rustix::{io::Errno, net::sockopt};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::timeout,
};
use tracing::{debug, info, warn};

use super::{
    copy::{Transferred, copy_counted},
    metrics::{FailureReason, Metrics},
    orig_dst::OriginalDst,
};

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Binds the outbound port on each address. An IPv6 address is skipped with a warning when
/// the host has IPv6 disabled; anything else that fails to bind is an error, as is binding
/// nothing at all.
pub async fn bind_listeners(ips: &[IpAddr], port: u16) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(ips.len());
    for &ip in ips {
        let addr = SocketAddr::new(ip, port);
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                info!(addr = %listener.local_addr()?, "listening on outbound port");
                listeners.push(listener);
            }
            Err(error) if ip.is_ipv6() && ipv6_unavailable(&error) => {
                warn!(%addr, %error, "IPv6 is disabled on this host; not listening on it");
            }
            Err(error) => bail!("cannot listen on {addr}: {error}"),
        }
    }
    if listeners.is_empty() {
        bail!("no outbound listener could be bound on {ips:?} port {port}");
    }
    Ok(listeners)
}

/// EADDRNOTAVAIL: `::1` is missing (disable_ipv6); EAFNOSUPPORT: no IPv6 in the kernel.
fn ipv6_unavailable(error: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(error),
        Some(Errno::ADDRNOTAVAIL | Errno::AFNOSUPPORT)
    )
}

pub struct OutboundProxy {
    listeners: Vec<TcpListener>,
    connections: Arc<ConnectionHandler>,
}

impl OutboundProxy {
    pub fn new(
        listeners: Vec<TcpListener>,
        orig_dst: Arc<dyn OriginalDst>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
    ) -> io::Result<Self> {
        let listen_addrs = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<io::Result<_>>()?;
        let connections = Arc::new(ConnectionHandler {
            orig_dst,
            metrics,
            connect_timeout,
            listen_addrs,
        });
        Ok(OutboundProxy {
            listeners,
            connections,
        })
    }

    /// Accepts on every listener until `shutdown` completes. Connections in flight are left to
    /// the runtime, which closes them when it is dropped.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let mut accept_loops = JoinSet::new();
        for listener in self.listeners {
            accept_loops.spawn(accept_loop(listener, self.connections.clone()));
        }
        tokio::select! {
            () = shutdown => info!("shutting down: no longer accepting connections"),
            Some(ended) = accept_loops.join_next() => {
                // An accept loop only ends by panicking; a proxy missing a listener must not
                // keep looking healthy.
                warn!(error = ?ended.err(), "an accept loop ended unexpectedly; stopping");
            }
        }
        accept_loops.shutdown().await;
    }
}

async fn accept_loop(listener: TcpListener, connections: Arc<ConnectionHandler>) {
    loop {
        match listener.accept().await {
            Ok((app, peer)) => {
                tokio::spawn(connections.clone().handle(app, peer));
            }
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

struct ConnectionHandler {
    orig_dst: Arc<dyn OriginalDst>,
    metrics: Arc<Metrics>,
    connect_timeout: Duration,
    /// The proxy's own listeners, to recognise a connection aimed back at the proxy.
    listen_addrs: Vec<SocketAddr>,
}

impl ConnectionHandler {
    async fn handle(self: Arc<Self>, mut app: TcpStream, peer: SocketAddr) {
        let mut log = AccessLog {
            src: peer,
            orig_dst: None,
            orig_dst_source: self.orig_dst.mode().name(),
            started: Instant::now(),
        };

        let orig_dst = match self.orig_dst.lookup(&app) {
            Ok(addr) => addr,
            Err(error) => return self.refuse(app, &log, FailureReason::OrigDstUnknown, error),
        };
        log.orig_dst = Some(orig_dst);

        if self.is_own_listener(orig_dst, &app) {
            let error = format!("{orig_dst} is this proxy's outbound listener");
            return self.refuse(app, &log, FailureReason::Loop, error);
        }

        let mut upstream = match timeout(self.connect_timeout, TcpStream::connect(orig_dst)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(error)) => {
                let reason = if error.kind() == io::ErrorKind::ConnectionRefused {
                    FailureReason::ConnectRefused
                } else {
                    FailureReason::ConnectError
                };
                return self.refuse(app, &log, reason, error);
            }
            Err(_elapsed) => {
                let error = format!("no answer within {:?}", self.connect_timeout);
                return self.refuse(app, &log, FailureReason::ConnectTimeout, error);
            }
        };

        // Relayed small writes must not wait for Nagle: the app already chose its batching.
        for stream in [&app, &upstream] {
            if let Err(error) = stream.set_nodelay(true) {
                debug!(%error, "cannot set TCP_NODELAY");
            }
        }

        let counters = self.metrics.outbound();
        counters.opened.inc();
        let (transferred, result) = copy_counted(
            &mut app,
            &mut upstream,
            counters.received_bytes.clone(),
            counters.sent_bytes.clone(),
        )
        .await;
        counters.closed.inc();

        match result {
            Ok(()) => log.completed(transferred),
            Err(error) => {
                // One side failed (usually a reset): pass the abort on rather than let the
                // other side mistake a truncated stream for a complete one.
                reset(app);
                reset(upstream);
                log.aborted(transferred, &error);
            }
        }
    }

    /// A connection whose original destination is one of our listeners would loop forever
    /// (each hop accepted again by us). Loopback and unspecified addresses reach the listener
    /// whatever its bound address, as does the address the connection arrived on.
    fn is_own_listener(&self, orig_dst: SocketAddr, accepted: &TcpStream) -> bool {
        if !self
            .listen_addrs
            .iter()
            .any(|l| l.port() == orig_dst.port())
        {
            return false;
        }
        let ip = orig_dst.ip().to_canonical();
        ip.is_loopback()
            || ip.is_unspecified()
            || self.listen_addrs.iter().any(|l| l.ip() == ip)
            || accepted
                .local_addr()
                .is_ok_and(|local| local.ip().to_canonical() == ip)
    }

    /// Never drop silently: count, log why, and reset so the app fails fast as on a refused
    /// connect instead of waiting on a half-open one.
    fn refuse(&self, app: TcpStream, log: &AccessLog, reason: FailureReason, error: impl Display) {
        self.metrics.record_failure(reason);
        log.refused(reason, &error);
        reset(app);
    }
}

/// Closes with RST instead of FIN: a zero linger makes close() abort the connection.
fn reset(stream: TcpStream) {
    if let Err(error) = sockopt::set_socket_linger(&stream, Some(Duration::ZERO)) {
        debug!(%error, "cannot set SO_LINGER; closing with FIN instead of RST");
    }
    drop(stream);
}

/// The one structured line each connection leaves, on target `access`.
struct AccessLog {
    src: SocketAddr,
    orig_dst: Option<SocketAddr>,
    orig_dst_source: &'static str,
    started: Instant,
}

impl AccessLog {
    fn duration_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn completed(&self, transferred: Transferred) {
        info!(
            target: "access",
            src = %self.src,
            orig_dst = self.orig_dst.map(tracing::field::display),
            orig_dst_source = self.orig_dst_source,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            duration_ms = self.duration_ms(),
            "connection complete"
        );
    }

    fn aborted(&self, transferred: Transferred, error: &io::Error) {
        info!(
            target: "access",
            src = %self.src,
            orig_dst = self.orig_dst.map(tracing::field::display),
            orig_dst_source = self.orig_dst_source,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            duration_ms = self.duration_ms(),
            error = %error,
            "connection aborted"
        );
    }

    fn refused(&self, reason: FailureReason, error: &dyn Display) {
        let headline = match reason {
            FailureReason::OrigDstUnknown => "original destination unknown; connection reset",
            FailureReason::Loop => "refusing to proxy to itself (loop); connection reset",
            FailureReason::ConnectRefused | FailureReason::ConnectError => {
                "upstream connect failed; connection reset"
            }
            FailureReason::ConnectTimeout => "upstream connect timed out; connection reset",
        };
        warn!(
            target: "access",
            src = %self.src,
            orig_dst = self.orig_dst.map(tracing::field::display),
            orig_dst_source = self.orig_dst_source,
            bytes_sent = 0u64,
            bytes_received = 0u64,
            duration_ms = self.duration_ms(),
            reason = reason.name(),
            error = %error,
            "{headline}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::{
        metrics::{TcpCounters, TcpLabels},
        orig_dst::ExplicitOrigDst,
    };

    const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const PATIENCE: Duration = Duration::from_secs(5);

    /// A proxy on an ephemeral loopback port sending everything to `target`.
    async fn start_proxy(
        target: impl FnOnce(SocketAddr) -> SocketAddr,
    ) -> anyhow::Result<(SocketAddr, Arc<Metrics>)> {
        start_proxy_with_timeout(target, PATIENCE).await
    }

    async fn start_proxy_with_timeout(
        target: impl FnOnce(SocketAddr) -> SocketAddr,
        connect_timeout: Duration,
    ) -> anyhow::Result<(SocketAddr, Arc<Metrics>)> {
        let listeners = bind_listeners(&[LOCALHOST], 0).await?;
        let proxy_addr = listeners[0].local_addr()?;
        let metrics = Arc::new(Metrics::new(&TcpLabels::outbound("client", "test-ns"))?);
        let orig_dst = Arc::new(ExplicitOrigDst(target(proxy_addr)));
        let proxy = OutboundProxy::new(listeners, orig_dst, metrics.clone(), connect_timeout)?;
        tokio::spawn(proxy.serve(pending()));
        Ok((proxy_addr, metrics))
    }

    /// Reads the whole request (until the client's FIN), then answers it and closes.
    async fn start_echo_after_eof() -> io::Result<SocketAddr> {
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

    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn round_trip(proxy: SocketAddr, request: &[u8]) -> io::Result<Vec<u8>> {
        let mut client = TcpStream::connect(proxy).await?;
        client.write_all(request).await?;
        client.shutdown().await?;
        let mut response = Vec::new();
        timeout(PATIENCE, client.read_to_end(&mut response)).await??;
        Ok(response)
    }

    /// After a reset, reading yields ConnectionReset (or, racing the RST, an empty EOF).
    async fn expect_reset(proxy: SocketAddr) -> anyhow::Result<()> {
        let mut client = TcpStream::connect(proxy).await?;
        let mut buf = [0u8; 16];
        match timeout(PATIENCE, client.read(&mut buf)).await? {
            Ok(0) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            other => bail!("expected a reset, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn client_half_close_still_gets_the_full_response() -> anyhow::Result<()> {
        let echo = start_echo_after_eof().await?;
        let (proxy, _metrics) = start_proxy(|_| echo).await?;
        // Large enough to span many reads and socket buffers.
        let request: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        // The server answers only after the client's FIN, so this proves FIN (not RST) reached it.
        assert_eq!(round_trip(proxy, &request).await?, request);
        Ok(())
    }

    #[tokio::test]
    async fn server_closing_first_reaches_the_client_as_eof() -> anyhow::Result<()> {
        let server = TcpListener::bind((LOCALHOST, 0)).await?;
        let server_addr = server.local_addr()?;
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = server.accept().await {
                let _ = stream.write_all(b"banner").await;
                // Dropped here: a clean close with nothing unread, so the server sends FIN.
            }
        });
        let (proxy, _metrics) = start_proxy(|_| server_addr).await?;

        let mut client = TcpStream::connect(proxy).await?;
        let mut received = Vec::new();
        timeout(PATIENCE, client.read_to_end(&mut received)).await??;
        assert_eq!(received, b"banner");
        Ok(())
    }

    #[tokio::test]
    async fn refused_upstream_resets_the_client_and_is_counted() -> anyhow::Result<()> {
        let closed = TcpListener::bind((LOCALHOST, 0)).await?.local_addr()?;
        let (proxy, metrics) = start_proxy(|_| closed).await?;
        expect_reset(proxy).await?;
        wait_until("the refusal is counted", || {
            metrics.failures(FailureReason::ConnectRefused) == 1
        })
        .await;
        assert_eq!(metrics.outbound().opened.get(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn unanswered_upstream_times_out_and_is_counted() -> anyhow::Result<()> {
        // A listener that never accepts: once its queue is full, further SYNs go unanswered.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((LOCALHOST, 0).into())?;
        let silent = socket.listen(0)?;
        let silent_addr = silent.local_addr()?;
        let mut queued = Vec::new();
        while let Ok(connected) =
            timeout(Duration::from_millis(200), TcpStream::connect(silent_addr)).await
        {
            queued.push(connected?);
            assert!(queued.len() < 16, "the listen queue never filled up");
        }

        let (proxy, metrics) =
            start_proxy_with_timeout(|_| silent_addr, Duration::from_millis(300)).await?;
        let started = Instant::now();
        expect_reset(proxy).await?;
        assert!(started.elapsed() < PATIENCE);
        wait_until("the timeout is counted", || {
            metrics.failures(FailureReason::ConnectTimeout) == 1
        })
        .await;
        Ok(())
    }

    #[tokio::test]
    async fn connection_to_the_proxy_itself_is_refused_as_a_loop() -> anyhow::Result<()> {
        let (proxy, metrics) = start_proxy(|own_addr| own_addr).await?;
        expect_reset(proxy).await?;
        wait_until("the loop is counted", || {
            metrics.failures(FailureReason::Loop) == 1
        })
        .await;
        assert_eq!(metrics.outbound().opened.get(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn metrics_count_connections_and_bytes() -> anyhow::Result<()> {
        let echo = start_echo_after_eof().await?;
        let (proxy, metrics) = start_proxy(|_| echo).await?;
        let requests: [&[u8]; 3] = [b"one", b"second request", &[7u8; 10_000]];
        for request in requests {
            assert_eq!(round_trip(proxy, request).await?, request);
        }
        let TcpCounters { closed, .. } = metrics.outbound();
        wait_until("every connection is closed", || closed.get() == 3).await;

        let total: usize = requests.iter().map(|r| r.len()).sum();
        let text = metrics.render()?;
        let labels = concat!(
            r#"{connection_security_policy="none",destination_principal="unknown","#,
            r#"destination_service="unknown",destination_workload="unknown","#,
            r#"reporter="source",request_protocol="tcp",source_principal="unknown","#,
            r#"source_workload="client",source_workload_namespace="test-ns"}"#
        );
        for expected in [
            format!("istio_tcp_connections_opened_total{labels} 3"),
            format!("istio_tcp_connections_closed_total{labels} 3"),
            format!("istio_tcp_received_bytes_total{labels} {total}"),
            format!("istio_tcp_sent_bytes_total{labels} {total}"),
        ] {
            assert!(
                text.lines().any(|line| line == expected),
                "missing {expected} in\n{text}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn binding_fails_when_nothing_binds() {
        // TEST-NET-1 is never a local address.
        let unreachable = IpAddr::from([192, 0, 2, 1]);
        assert!(bind_listeners(&[unreachable], 0).await.is_err());
    }
}
