//! The end of every connection, for both directions: relay and count, or refuse; either way
//! one access log line, and every refusal counted. A relayed connection idle for the idle
//! timeout is closed (both ends, with FIN), logged and counted.
use std::{fmt::Display, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    access_log::AccessLog,
    copy::{Transferred, copy_counted},
    deadlines::{self, Deadlines},
    metrics::{DownstreamTimeout, FailureReason, Metrics, TcpCounters},
    sniff::Rewound,
    tls,
    upstream::{UpstreamIo, reset},
};

/// The TCP socket under a (possibly TLS, possibly rewound) stream, to reset it.
pub trait IntoTcp {
    fn into_tcp(self) -> TcpStream;
}

impl IntoTcp for TcpStream {
    fn into_tcp(self) -> TcpStream {
        self
    }
}

impl IntoTcp for Box<dyn UpstreamIo> {
    fn into_tcp(self) -> TcpStream {
        self.into_tcp_stream()
    }
}

impl<S: IntoTcp> IntoTcp for Rewound<S> {
    fn into_tcp(self) -> TcpStream {
        self.into_inner().into_tcp()
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
    mut upstream: U,
    counters: TcpCounters,
    metrics: &Metrics,
    log: &AccessLog,
    idle: Duration,
) where
    D: AsyncRead + AsyncWrite + Unpin + IntoTcp,
    U: AsyncRead + AsyncWrite + Unpin + IntoTcp,
{
    let mut downstream = Deadlines::new(downstream, idle);
    counters.opened.inc();
    let (transferred, result) = copy_counted(
        &mut downstream,
        &mut upstream,
        counters.received_bytes,
        counters.sent_bytes,
    )
    .await;
    counters.closed.inc();
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
            reset(downstream.into_tcp());
            reset(upstream.into_tcp());
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
