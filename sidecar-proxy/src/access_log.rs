//! The one structured line each connection leaves, on target `access` (as ztunnel does).
use std::{fmt::Display, io, net::SocketAddr, time::Instant};

use super::{
    copy::Transferred,
    identity::SpiffeId,
    mesh_config::InboundMode,
    metrics::{Direction, FailureReason, SecurityPolicy},
    relay::RelayMode,
    sniff::Protocol,
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

/// One event with every field of `$log`, at `$level`, plus the outcome fields.
macro_rules! access_event {
    ($level:ident, $log:expr, $($outcome:tt)*) => {
        tracing::$level!(
            target: "access",
            direction = $log.direction.name(),
            src = %$log.src,
            orig_dst = $log.orig_dst.map(tracing::field::display),
            orig_dst_source = $log.orig_dst_source,
            dst_workload = $log.dst_workload.as_deref(),
            src_principal = $log.src_principal.as_ref().map(tracing::field::display),
            dst_principal = $log.dst_principal.as_ref().map(tracing::field::display),
            security_policy = $log.security_policy.name(),
            inbound_mode = $log.inbound_mode.map(InboundMode::name),
            protocol = $log.protocol.map(Protocol::name),
            relay = $log.relay.map(RelayMode::name),
            duration_ms = $log.duration_ms(),
            $($outcome)*
        )
    };
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

    pub fn completed(&self, transferred: Transferred) {
        access_event!(
            info,
            self,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            "connection complete"
        );
    }

    pub fn aborted(&self, transferred: Transferred, error: &io::Error) {
        access_event!(
            info,
            self,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            error = %error,
            "connection aborted"
        );
    }

    /// Closed by the proxy after the idle timeout.
    pub fn idle_timeout(&self, transferred: Transferred, error: &io::Error) {
        access_event!(
            info,
            self,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            error = %error,
            "connection closed: idle timeout"
        );
    }

    /// Not proxied, or (for [`FailureReason::TlsRejectedByPeer`]) cut short by the peer.
    pub fn refused(&self, reason: FailureReason, transferred: Transferred, error: &dyn Display) {
        access_event!(
            warn,
            self,
            bytes_sent = transferred.sent,
            bytes_received = transferred.received,
            reason = reason.name(),
            error = %error,
            "{}",
            reason.headline()
        );
    }
}
