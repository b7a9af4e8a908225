//! Where an accepted connection was originally going: one interface, several sources.
use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use clap::ValueEnum;
use rustix::net::sockopt;
use tokio::net::TcpStream;

/// The `--orig-dst` choices (outbound), also the `orig_dst_source` field of access logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrigDstMode {
    /// `SO_ORIGINAL_DST`, answered by iptables' conntrack or by the eBPF getsockopt shim.
    Sockopt,
    /// A fixed target, for tests and a no-capture baseline.
    Explicit,
}

impl OrigDstMode {
    pub const fn name(self) -> &'static str {
        match self {
            OrigDstMode::Sockopt => "sockopt",
            OrigDstMode::Explicit => "explicit",
        }
    }
}

/// Learns the destination an accepted (redirected) connection was originally sent to, and
/// which mechanism answered (the access log's `orig_dst_source`).
pub trait OriginalDst: Send + Sync {
    fn lookup(&self, accepted: &TcpStream) -> io::Result<(SocketAddr, &'static str)>;
}

/// `getsockopt(SO_ORIGINAL_DST)`: the same call works under iptables REDIRECT and under the
/// project's cgroup/getsockopt shim, which answers the same option.
pub struct SockoptOrigDst;

impl OriginalDst for SockoptOrigDst {
    fn lookup(&self, accepted: &TcpStream) -> io::Result<(SocketAddr, &'static str)> {
        // The option level must match the accepted socket's family, not the destination's.
        let addr = match accepted.local_addr()? {
            SocketAddr::V4(_) => SocketAddr::V4(sockopt::ip_original_dst(accepted)?),
            SocketAddr::V6(_) => SocketAddr::V6(sockopt::ipv6_original_dst(accepted)?),
        };
        Ok((unmap_v4(addr), OrigDstMode::Sockopt.name()))
    }
}

/// Inbound: steered by sk_lookup, the accepted socket keeps its original local address (any
/// port but the inbound one); redirected by iptables, it arrives on the inbound port and
/// conntrack knows the original destination.
pub struct InboundOrigDst {
    pub inbound_port: u16,
}

impl OriginalDst for InboundOrigDst {
    fn lookup(&self, accepted: &TcpStream) -> io::Result<(SocketAddr, &'static str)> {
        let local = accepted.local_addr()?;
        if local.port() == self.inbound_port {
            SockoptOrigDst.lookup(accepted)
        } else {
            Ok((unmap_v4(local), "local_addr"))
        }
    }
}

/// Every connection goes to one configured target.
pub struct ExplicitOrigDst(pub SocketAddr);

impl OriginalDst for ExplicitOrigDst {
    fn lookup(&self, _accepted: &TcpStream) -> io::Result<(SocketAddr, &'static str)> {
        Ok((self.0, OrigDstMode::Explicit.name()))
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) becomes plain IPv4, so upstream connects and
/// loop checks see the address the app actually used.
fn unmap_v4(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_become_v4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:8080".parse().unwrap();
        assert_eq!(unmap_v4(mapped), "10.1.2.3:8080".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(unmap_v4(v6), v6);
    }

    #[tokio::test]
    async fn inbound_uses_the_local_address_unless_it_arrived_on_the_inbound_port()
    -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let _client = TcpStream::connect(local).await?;
        let (accepted, _) = listener.accept().await?;

        // Steered by sk_lookup: the local address is the original destination.
        let steered = InboundOrigDst {
            inbound_port: 15006,
        };
        assert_eq!(steered.lookup(&accepted)?, (local, "local_addr"));

        // On the inbound port itself it must come from conntrack, which knows nothing of a
        // connection that was never redirected.
        let redirected = InboundOrigDst {
            inbound_port: local.port(),
        };
        assert!(redirected.lookup(&accepted).is_err());
        Ok(())
    }
}
