//! The end of every connection, for both directions: relay and count, or refuse; either way
//! one access log line, and every refusal counted. A relayed connection idle for the idle
//! timeout is closed (both ends, with FIN), logged and counted. Plain TCP on both ends is
//! spliced (`splice`), anything else (TLS on either end) copied (`copy`).
use std::{fmt::Display, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    capture::CaptureProbe,
    detect::client_hello::Rewound,
    io::copy::{Transferred, copy_counted},
    io::deadlines::{self, Deadlines},
    io::splice::{self, WireEnd, relay_wire},
    io::upstream::{UpstreamIo, reset},
    telemetry::access_log::AccessLog,
    telemetry::metrics::{DownstreamTimeout, FailureReason, Metrics, TcpCounters},
    tls,
};

/// The TCP socket under a (possibly TLS, possibly rewound) stream: to reset it, or to splice
/// it when nothing but bytes already read sits on top of it.
pub trait IntoTcp: Sized {
    fn into_tcp(self) -> TcpStream;

    /// The socket and the bytes already read from it, when nothing else (TLS) sits between the
    /// socket and the relay: then its bytes can be relayed as they are on the wire.
    fn into_wire(self) -> Result<WireEnd, Self> {
        Err(self)
    }
}

impl IntoTcp for TcpStream {
    fn into_tcp(self) -> TcpStream {
        self
    }

    fn into_wire(self) -> Result<WireEnd, Self> {
        Ok(WireEnd {
            stream: self,
            unread: Vec::new(),
        })
    }
}

impl IntoTcp for Box<dyn UpstreamIo> {
    fn into_tcp(self) -> TcpStream {
        self.into_tcp_stream()
    }

    fn into_wire(self) -> Result<WireEnd, Self> {
        self.into_plain_tcp().map(|stream| WireEnd {
            stream,
            unread: Vec::new(),
        })
    }
}

impl<S: IntoTcp> IntoTcp for Rewound<S> {
    fn into_tcp(self) -> TcpStream {
        self.into_inner().into_tcp()
    }

    fn into_wire(self) -> Result<WireEnd, Self> {
        let (prefix, inner) = self.into_parts();
        match inner.into_wire() {
            Ok(mut end) => {
                let mut unread = prefix;
                unread.append(&mut end.unread);
                end.unread = unread;
                Ok(end)
            }
            Err(inner) => Err(Rewound::new(prefix, inner)),
        }
    }
}

impl<S: IntoTcp> IntoTcp for Box<S> {
    fn into_tcp(self) -> TcpStream {
        (*self).into_tcp()
    }

    fn into_wire(self) -> Result<WireEnd, Self> {
        (*self).into_wire().map_err(Box::new)
    }
}

impl<S: IntoTcp> IntoTcp for tokio_rustls::client::TlsStream<S> {
    fn into_tcp(self) -> TcpStream {
        self.into_inner().0.into_tcp()
    }
}

impl<S: IntoTcp> IntoTcp for tokio_rustls::server::TlsStream<S> {
    fn into_tcp(self) -> TcpStream {
        self.into_inner().0.into_tcp()
    }
}

/// How a relayed connection's bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// From socket to socket through a pipe, never entering user space (a direction copies
    /// while no pipe is to be had).
    Splice,
    /// Through the proxy's buffers: TLS on either end, or the sockmap shortcut.
    Copy,
}

impl RelayMode {
    pub const fn name(self) -> &'static str {
        match self {
            RelayMode::Splice => "splice",
            RelayMode::Copy => "copy",
        }
    }
}

/// How a refused connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// RST: the client fails at once, as on a refused connect.
    Reset,
    /// FIN: lets a TLS alert already written reach the peer, which then knows why.
    Graceful,
}

/// Counts, logs and closes a connection that is not proxied.
pub fn refuse(
    metrics: &Metrics,
    log: &AccessLog,
    reason: FailureReason,
    error: impl Display,
    stream: impl IntoTcp,
    close: Close,
) {
    record_refusal(metrics, log, reason, error);
    match close {
        Close::Reset => reset(stream.into_tcp()),
        Close::Graceful => drop(stream),
    }
}

/// Counts and logs a connection that is not proxied, when its socket is already gone.
pub fn record_refusal(
    metrics: &Metrics,
    log: &AccessLog,
    reason: FailureReason,
    error: impl Display,
) {
    metrics.record_failure(log.direction, reason);
    log.refused(reason, Transferred::default(), &error);
}

/// Relays until both directions end or nothing moves either way for `idle`, counting
/// connections and bytes under `counters`.
pub async fn relay<D, U>(
    downstream: D,
    upstream: U,
    counters: TcpCounters,
    metrics: &Metrics,
    log: &mut AccessLog,
    idle: Duration,
    capture: &dyn CaptureProbe,
) where
    D: AsyncRead + AsyncWrite + Unpin + IntoTcp,
    U: AsyncRead + AsyncWrite + Unpin + IntoTcp,
{
    counters.opened.inc();
    let bytes = [counters.received_bytes, counters.sent_bytes];
    let ended = match downstream.into_wire() {
        Ok(downstream) => match upstream.into_wire() {
            Ok(upstream) => relay_plain(downstream, upstream, bytes, idle, capture).await,
            Err(upstream) => {
                let downstream = Rewound::new(downstream.unread, downstream.stream);
                relay_copied(downstream, upstream, bytes, idle).await
            }
        },
        Err(downstream) => relay_copied(downstream, upstream, bytes, idle).await,
    };
    counters.closed.inc();
    let Ended {
        mode,
        transferred,
        result,
        downstream,
        upstream,
    } = ended;
    log.relay = Some(mode);
    match result {
        Ok(()) => log.completed(transferred),
        Err(error) if deadlines::expired(&error).is_some() => {
            // As Envoy's TCP proxy: both ends closed, nothing aborted.
            metrics.record_downstream_timeout(log.direction.name(), DownstreamTimeout::Idle);
            log.idle_timeout(transferred, &error);
        }
        Err(error) => {
            // One side failed (usually a reset): pass the abort on rather than let the other
            // side mistake a truncated stream for a complete one.
            reset(downstream);
            reset(upstream);
            if tls::is_alert_from_peer(&error) {
                // TLS 1.3: a client learns only now that the server refused its certificate.
                metrics.record_failure(log.direction, FailureReason::TlsRejectedByPeer);
                let error = tls::describe(&error);
                log.refused(FailureReason::TlsRejectedByPeer, transferred, &error);
            } else {
                log.aborted(transferred, &error);
            }
        }
    }
}

/// A relay that ended, with its sockets (closed with FIN when dropped).
struct Ended {
    mode: RelayMode,
    transferred: Transferred,
    result: std::io::Result<()>,
    downstream: TcpStream,
    upstream: TcpStream,
}

/// Both ends plain TCP: spliced, unless the sockmap shortcut may hold the sockets.
async fn relay_plain(
    mut downstream: WireEnd,
    mut upstream: WireEnd,
    bytes: [prometheus::IntCounter; 2],
    idle: Duration,
    capture: &dyn CaptureProbe,
) -> Ended {
    let pipes = splice::can_splice(&downstream.stream, capture).then(splice::pipes);
    let (transferred, result) =
        relay_wire(&mut downstream, &mut upstream, bytes, idle, pipes).await;
    Ended {
        mode: if pipes.is_some() {
            RelayMode::Splice
        } else {
            RelayMode::Copy
        },
        transferred,
        result,
        downstream: downstream.stream,
        upstream: upstream.stream,
    }
}

/// TLS on either end: copied, through user space.
async fn relay_copied<D, U>(
    downstream: D,
    mut upstream: U,
    [received_bytes, sent_bytes]: [prometheus::IntCounter; 2],
    idle: Duration,
) -> Ended
where
    D: AsyncRead + AsyncWrite + Unpin + IntoTcp,
    U: AsyncRead + AsyncWrite + Unpin + IntoTcp,
{
    let mut downstream = Deadlines::new(downstream, idle);
    let (transferred, result) =
        copy_counted(&mut downstream, &mut upstream, received_bytes, sent_bytes).await;
    Ended {
        mode: RelayMode::Copy,
        transferred,
        result,
        downstream: downstream.into_tcp(),
        upstream: upstream.into_tcp(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        time::timeout,
    };

    use super::*;
    use crate::{
        telemetry::metrics::{Direction, TcpLabels},
        testing::{LOCALHOST, NoCapture, PATIENCE, local, socket_pair},
    };

    /// The client resets its connection midway: the server's connection is reset too (not
    /// ended with a FIN it would take for a complete stream), and the abort is logged with
    /// the bytes that did go through.
    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() -> anyhow::Result<()> {
        let (mut client, downstream) = socket_pair().await?;
        let (upstream, mut server) = socket_pair().await?;
        let metrics = Arc::new(Metrics::new(&local("client"))?);
        let labels = TcpLabels::new(Direction::Outbound, &local("client"));
        let relay = tokio::spawn({
            let metrics = metrics.clone();
            let counters = metrics.tcp(&labels);
            async move {
                let mut log = AccessLog::new(Direction::Outbound, (LOCALHOST, 1).into(), "test");
                relay(
                    downstream, upstream, counters, &metrics, &mut log, PATIENCE, &NoCapture,
                )
                .await;
            }
        });
        client.write_all(b"partial").await?;
        let mut partial = [0u8; 7];
        timeout(PATIENCE, server.read_exact(&mut partial)).await??;
        rustix::net::sockopt::set_socket_linger(&client, Some(Duration::ZERO))?;
        drop(client);
        timeout(PATIENCE, relay).await??;
        let mut rest = [0u8; 16];
        let error = timeout(PATIENCE, server.read(&mut rest))
            .await?
            .expect_err("reset, not a FIN");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        let counters = metrics.tcp(&labels);
        assert_eq!(counters.received_bytes.get(), 7);
        assert_eq!(counters.closed.get(), 1);
        Ok(())
    }
}
