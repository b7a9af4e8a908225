//! The one structured line each connection leaves, on target `access` (as ztunnel does).
use std::{
    fmt::{self, Display},
    io,
    net::SocketAddr,
    time::Instant,
};

use tracing::Level;

use crate::{
    detect::client_hello::Protocol,
    io::copy::Transferred,
    io::relay::RelayMode,
    mesh::config::InboundMode,
    mesh::identity::SpiffeId,
    telemetry::access_line::AccessLine,
    telemetry::metrics::{Direction, FailureReason, SecurityPolicy},
};

/// What is known about a connection so far; filled in as the handler learns more.
pub struct AccessLog {
    pub direction: Direction,
    pub src: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    pub orig_dst_source: &'static str,
    /// Outbound: the mesh workload the destination belongs to.
    pub dst_workload: Option<String>,
    pub src_principal: Option<SpiffeId>,
    pub dst_principal: Option<SpiffeId>,
    pub security_policy: SecurityPolicy,
    /// Inbound: the port's mode and what the first bytes were.
    pub inbound_mode: Option<InboundMode>,
    pub protocol: Option<Protocol>,
    /// Relayed connections: whether the bytes were spliced or copied.
    pub relay: Option<RelayMode>,
    started: Instant,
}

impl AccessLog {
    pub fn new(direction: Direction, src: SocketAddr, orig_dst_source: &'static str) -> Self {
        AccessLog {
            direction,
            src,
            orig_dst: None,
            orig_dst_source,
            dst_workload: None,
            src_principal: None,
            dst_principal: None,
            security_policy: SecurityPolicy::None,
            inbound_mode: None,
            protocol: None,
            relay: None,
            started: Instant::now(),
        }
    }

    fn duration_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A line at `level` with every field known so far, or `None` when access lines are off.
    fn line(&self, level: Level, message: fmt::Arguments<'_>) -> Option<AccessLine> {
        let mut line = AccessLine::start(level, message)?;
        line.str("direction", self.direction.name())
            .addr("src", self.src)
            .opt_addr("orig_dst", self.orig_dst)
            .str("orig_dst_source", self.orig_dst_source)
            .opt_str("dst_workload", self.dst_workload.as_deref())
            .opt_display("src_principal", self.src_principal.as_ref())
            .opt_display("dst_principal", self.dst_principal.as_ref())
            .str("security_policy", self.security_policy.name())
            .opt_str("inbound_mode", self.inbound_mode.map(InboundMode::name))
            .opt_str("protocol", self.protocol.map(Protocol::name))
            .opt_str("relay", self.relay.map(RelayMode::name))
            .u64("duration_ms", self.duration_ms());
        Some(line)
    }

    /// The outcome fields every line ends with.
    fn emit(
        &self,
        level: Level,
        message: fmt::Arguments<'_>,
        transferred: Transferred,
        end: impl FnOnce(&mut AccessLine),
    ) {
        if let Some(mut line) = self.line(level, message) {
            line.u64("bytes_sent", transferred.sent)
                .u64("bytes_received", transferred.received);
            end(&mut line);
            line.emit();
        }
    }

    pub fn completed(&self, transferred: Transferred) {
        self.emit(
            Level::INFO,
            format_args!("connection complete"),
            transferred,
            |_| {},
        );
    }

    pub fn aborted(&self, transferred: Transferred, error: &io::Error) {
        self.emit(
            Level::INFO,
            format_args!("connection aborted"),
            transferred,
            |line| {
                line.display("error", error);
            },
        );
    }

    /// Closed by the proxy after the idle timeout.
    pub fn idle_timeout(&self, transferred: Transferred, error: &io::Error) {
        self.emit(
            Level::INFO,
            format_args!("connection closed: idle timeout"),
            transferred,
            |line| {
                line.display("error", error);
            },
        );
    }

    /// Not proxied, or (for [`FailureReason::TlsRejectedByPeer`]) cut short by the peer.
    pub fn refused(&self, reason: FailureReason, transferred: Transferred, error: &dyn Display) {
        self.emit(
            Level::WARN,
            format_args!("{}", reason.headline()),
            transferred,
            |line| {
                line.str("reason", reason.name()).display("error", error);
            },
        );
    }
}
