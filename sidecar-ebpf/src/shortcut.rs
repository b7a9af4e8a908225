//! The optional sockmap shortcut of the loopback hop between the app and its proxy
//! (`sidecar init --sockmap`). Both ends of that hop enter `SHORTCUT_SOCKETS` once
//! established; a message either end sends then goes straight into its peer's receive queue
//! (sk_msg redirect) instead of down and up the TCP/IP stack. The connection stays a real TCP
//! connection: handshake, FIN and RST still travel as segments, so half-close and close
//! behave as before.
//!
//! Which sockets are the hop's ends:
//! - outbound: the app's redirected socket (active side) and the proxy's socket accepted on
//!   the outbound port on loopback (passive side);
//! - inbound (IPv4): the proxy's socket to the app from 127.0.0.6 (active side) and the
//!   app's socket accepted from 127.0.0.6 (passive side). IPv6 inbound is left on TCP: its
//!   passthrough source `::1` cannot tell the proxy from any other local client.
//!
//! Off by default, for apps with nonblocking sockets (event loops): a socket in a sockhash
//! reads through the kernel's `tcp_bpf_recvmsg`, which returns EAGAIN to a blocking reader
//! woken without shortcut data (by the ACK of its own FIN, say) instead of waiting again.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS},
    programs::{SkMsgContext, SockOpsContext},
};
use sidecar_common::{CaptureConfig, Counter, Endpoint};

use crate::{
    counters::bump,
    maps::{CAPTURE_CONFIG, SHORTCUT_FALLBACK, SHORTCUT_SOCKETS},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const PASSTHROUGH_SOURCE_V4: u32 = u32::from_ne_bytes([127, 0, 0, 6]);
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// A socket's own view of its connection: the key it is stored under.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SocketPair {
    local: Endpoint,
    remote: Endpoint,
}

impl SocketPair {
    /// The key of the socket at the other end of the same loopback connection.
    fn peer(self) -> SocketPair {
        SocketPair {
            local: self.remote,
            remote: self.local,
        }
    }
}

/// Which end of a connection a sock_ops established callback is about.
pub enum Side {
    /// Our connect() completed; `redirected` when connect4/6 sent it to the proxy.
    Active { redirected: bool },
    /// A listener of the pod accepted it.
    Passive,
}

/// Enters an established socket in the shortcut when it is an end of the app-proxy hop.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext, side: Side) {
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return;
    };
    if config.flags & CaptureConfig::SOCKMAP_SHORTCUT == 0 {
        return;
    }
    let Some(mut pair) = sock_ops_pair(ctx) else {
        return;
    };
    let is_hop_end = match side {
        Side::Active { redirected } => redirected || is_passthrough(&pair.local),
        Side::Passive => {
            (pair.local.port == config.outbound_port && is_loopback(&pair.local))
                || is_passthrough(&pair.remote)
        }
    };
    if !is_hop_end {
        return;
    }
    // SAFETY: `ops` is this program's context, as the sockhash update requires.
    let ops = unsafe { &mut *ctx.ops };
    if SHORTCUT_SOCKETS
        .update(&mut pair, ops, BPF_ANY as u64)
        .is_err()
    {
        // Full map or unsupported socket: this end keeps using TCP, which is always correct.
        bump(Counter::Errors);
        return;
    }
    bump(Counter::ShortcutSockets);
}

/// sk_msg verdict for a message sent on a socket in the shortcut: hand it to the peer's
/// receive queue, or, when the peer is not in the shortcut yet, send it through TCP and keep
/// the whole connection on TCP.
#[inline(always)]
pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    let Some(own) = sk_msg_pair(ctx) else {
        return SK_PASS;
    };
    if SHORTCUT_FALLBACK.get_ptr(own).is_some() {
        return SK_PASS;
    }
    let mut peer = own.peer();
    if SHORTCUT_SOCKETS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        bump(Counter::ShortcutMessages);
        return SK_PASS;
    }
    // The peer is not in the shortcut: an app that writes at once can beat the proxy's end of
    // the handshake (or the peer is closing). This message goes through TCP and a later one
    // must not overtake it (a receiver reads shortcut data first), so the connection stays on
    // TCP: both ends are marked (the peer cannot have sent anything yet).
    let _ = SHORTCUT_FALLBACK.insert(own, 1, 0);
    let _ = SHORTCUT_FALLBACK.insert(peer, 1, 0);
    bump(Counter::ShortcutFallback);
    SK_PASS
}

#[inline(always)]
fn is_passthrough(endpoint: &Endpoint) -> bool {
    endpoint.is_v4() && endpoint.addr[3] == PASSTHROUGH_SOURCE_V4
}

#[inline(always)]
fn is_loopback(endpoint: &Endpoint) -> bool {
    (endpoint.is_v4() && endpoint.addr[3] == LOOPBACK_V4) || endpoint.addr == LOOPBACK_V6
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
/// on the family (see `orig_dst::local_endpoint` for why the verifier needs that).
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
fn sock_ops_pair(ctx: &SockOpsContext) -> Option<SocketPair> {
    socket_pair_of!(ctx.ops)
}

#[inline(always)]
fn sk_msg_pair(ctx: &SkMsgContext) -> Option<SocketPair> {
    socket_pair_of!(ctx.msg)
}
