//! What both sides handle their connections with: one [`ProxyInputs`] the outbound and the
//! inbound side (and their HTTP connections) share, and each side's own [`Entrance`], where
//! every connection begins the same way: its access log started, where it was going found, and
//! a connection aimed back at the proxy refused.
use std::{fmt::Display, net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use crate::{
    Timeouts,
    accept::{listener::is_own_listener, orig_dst::OriginalDst},
    capture::CaptureProbe,
    io::relay::{Close, IntoTcp, refuse},
    lifecycle::drain::Drain,
    mesh::MeshHandle,
    telemetry::{
        access_log::AccessLog,
        metrics::{Direction, FailureReason, LocalWorkload, Metrics},
    },
};

/// The same for every connection of either side.
pub struct ProxyInputs {
    /// The mesh config in force; each connection (HTTP: each request) takes a snapshot.
    pub mesh: Arc<MeshHandle>,
    pub metrics: Arc<Metrics>,
    /// This workload, for the metrics' labels.
    pub local: LocalWorkload,
    pub timeouts: Timeouts,
    /// Tells HTTP connections to finish while the proxy drains; serves upgraded connections.
    pub drain: Arc<Drain>,
    /// Asked whether a plain relay may splice (the capture's sockmap shortcut).
    pub capture: Arc<dyn CaptureProbe>,
}

/// Where one side's connections come in.
pub struct Entrance {
    pub direction: Direction,
    pub orig_dst: Arc<dyn OriginalDst>,
    /// The side's own listeners, to recognise a connection aimed back at the proxy.
    pub listen_addrs: Vec<SocketAddr>,
}

impl ProxyInputs {
    /// Starts `stream`'s access log and finds where it was going; a connection whose original
    /// destination is unknown, or is the side's own listener (a loop), is refused here (`None`).
    pub fn enter(
        &self,
        entrance: &Entrance,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TcpStream, SocketAddr, AccessLog)> {
        let mut log = AccessLog::new(entrance.direction, peer, "unknown");
        let orig_dst = match entrance.orig_dst.lookup(&stream) {
            Ok((addr, source)) => {
                log.orig_dst_source = source;
                addr
            }
            Err(error) => {
                self.refuse(stream, &log, FailureReason::OrigDstUnknown, error);
                return None;
            }
        };
        log.orig_dst = Some(orig_dst);
        if is_own_listener(&entrance.listen_addrs, orig_dst, &stream) {
            let side = entrance.direction.name();
            let error = format!("{orig_dst} is this proxy's {side} listener");
            self.refuse(stream, &log, FailureReason::Loop, error);
            return None;
        }
        Some((stream, orig_dst, log))
    }

    /// Refuses a connection (reset), logged and counted.
    pub fn refuse(
        &self,
        stream: impl IntoTcp,
        log: &AccessLog,
        reason: FailureReason,
        error: impl Display,
    ) {
        refuse(&self.metrics, log, reason, error, stream, Close::Reset);
    }
}
