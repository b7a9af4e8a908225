//! A socket's own view of its connection, (local, remote), read from the sock_ops and sk_msg
//! contexts: the key of the sockmap shortcut and of the original-destination handoff.
use core::ptr::read_volatile;

use aya_ebpf::programs::{SkMsgContext, SockOpsContext};
use sidecar_common::Endpoint;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketPair {
    pub local: Endpoint,
    pub remote: Endpoint,
}

impl SocketPair {
    /// The key of the socket at the other end of the same loopback connection.
    pub fn peer(self) -> SocketPair {
        SocketPair {
            local: self.remote,
            remote: self.local,
        }
    }
}

/// The port of a context field that holds a network-order port: in the upper 16 bits of the
/// u32 on little-endian hosts for sock_ops and sk_msg, in the lower ones elsewhere. A real
/// port is never 0, so whichever half is set is the port.
#[inline(always)]
fn port_of_be_field(raw: u32) -> u32 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16) as u32
}

#[inline(always)]
fn endpoint(family: u32, ip4: u32, ip6: [u32; 4], port: u32) -> Option<Endpoint> {
    match family {
        AF_INET => Some(Endpoint::v4(ip4, port)),
        AF_INET6 => Some(Endpoint { addr: ip6, port }),
        _ => None,
    }
}

/// The socket pair of a sock_ops or sk_msg context: both have the same address fields with
/// the same byte orders, but no common type. Every field is loaded up front, before branching
/// on the family: otherwise LLVM turns the per-family loads into one load at a computed
/// context offset, which the verifier rejects.
macro_rules! socket_pair_of {
    ($ctx:expr) => {{
        let ctx = $ctx;
        // SAFETY: scalar fields of a valid sock_ops or sk_msg context, readable for any family.
        let (family, local_port, remote_port, local4, remote4, local6, remote6) = unsafe {
            (
                read_volatile(&(*ctx).family),
                read_volatile(&(*ctx).local_port),
                read_volatile(&(*ctx).remote_port),
                read_volatile(&(*ctx).local_ip4),
                read_volatile(&(*ctx).remote_ip4),
                [
                    read_volatile(&(*ctx).local_ip6[0]),
                    read_volatile(&(*ctx).local_ip6[1]),
                    read_volatile(&(*ctx).local_ip6[2]),
                    read_volatile(&(*ctx).local_ip6[3]),
                ],
                [
                    read_volatile(&(*ctx).remote_ip6[0]),
                    read_volatile(&(*ctx).remote_ip6[1]),
                    read_volatile(&(*ctx).remote_ip6[2]),
                    read_volatile(&(*ctx).remote_ip6[3]),
                ],
            )
        };
        Some(SocketPair {
            local: endpoint(family, local4, local6, local_port)?,
            remote: endpoint(family, remote4, remote6, port_of_be_field(remote_port))?,
        })
    }};
}

#[inline(always)]
pub fn sock_ops_pair(ctx: &SockOpsContext) -> Option<SocketPair> {
    socket_pair_of!(ctx.ops)
}

#[inline(always)]
pub fn sk_msg_pair(ctx: &SkMsgContext) -> Option<SocketPair> {
    socket_pair_of!(ctx.msg)
}
