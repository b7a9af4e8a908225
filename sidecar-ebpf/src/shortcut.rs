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
//! - inbound: the proxy's socket to the app from its passthrough source, 127.0.0.6 or ::6
//!   (active side), and the app's socket accepted from it (passive side).
//!
//! If one end sends before its peer is in the shortcut, that message goes through TCP, and so
//! does everything that end sends afterwards (a per-socket marker): within each direction,
//! bytes keep their order (a receiver reads shortcut data before its TCP queue).
//!
//! Off by default, for apps with nonblocking sockets (event loops): a socket in a sockhash
//! reads through the kernel's `tcp_bpf_recvmsg`, which returns EAGAIN to a blocking reader
//! woken without shortcut data (by the ACK of its own FIN, say) instead of waiting again.
use core::ptr;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE, sk_action::SK_PASS},
    helpers::generated::bpf_sk_storage_get,
    programs::{SkMsgContext, SockOpsContext},
};
use sidecar_common::{
    CaptureConfig, Counter, Endpoint, PASSTHROUGH_SOURCE_V4, PASSTHROUGH_SOURCE_V6,
};

use crate::{
    counters::bump,
    maps::{SHORTCUT_FALLBACK, SHORTCUT_SOCKETS},
    socket_pair::{SocketPair, sk_msg_pair},
};

const PASSTHROUGH_V4: u32 = u32::from_ne_bytes(PASSTHROUGH_SOURCE_V4);
const PASSTHROUGH_V6: [u32; 4] = Endpoint::v6(PASSTHROUGH_SOURCE_V6, 0).addr;
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Which end of a connection a sock_ops established callback is about.
pub enum Side {
    /// Our connect() completed; `redirected` when connect4/6 sent it to the proxy.
    Active { redirected: bool },
    /// A listener of the pod accepted it.
    Passive,
}

/// Enters an established socket in the shortcut when it is an end of the app-proxy hop.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext, config: &CaptureConfig, pair: SocketPair, side: Side) {
    if config.flags & CaptureConfig::SOCKMAP_SHORTCUT == 0 {
        return;
    }
    let mut pair = pair;
    let is_hop_end = match side {
        Side::Active { redirected } => redirected || is_passthrough(&pair.local),
        Side::Passive => is_outbound_listener(config, &pair.local) || is_passthrough(&pair.remote),
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

/// The proxy's side of an outbound hop: accepted on its outbound port on loopback.
#[inline(always)]
pub fn is_outbound_listener(config: &CaptureConfig, local: &Endpoint) -> bool {
    local.port == config.outbound_port && is_loopback(local)
}

/// sk_msg verdict for a message sent on a socket in the shortcut: hand it to the peer's
/// receive queue, or, when the peer is not in the shortcut yet, send it (and every later
/// message of this socket) through TCP.
#[inline(always)]
pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the context is valid; `sk` is the sending socket, a full socket.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return SK_PASS;
    }
    let marker = fallback_marker(sk.cast(), 0);
    if !marker.is_null() {
        return SK_PASS;
    }
    let Some(own) = sk_msg_pair(ctx) else {
        return SK_PASS;
    };
    let mut peer = own.peer();
    if SHORTCUT_SOCKETS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        bump(Counter::ShortcutMessages);
        return SK_PASS;
    }
    // The peer is not in the shortcut: an app that writes at once can beat the proxy's end of
    // the handshake (or the peer is closing). This message goes through TCP and a later one
    // must not overtake it, so this socket stays on TCP for good.
    if fallback_marker(sk.cast(), BPF_SK_STORAGE_GET_F_CREATE as u64).is_null() {
        bump(Counter::Errors);
    }
    bump(Counter::ShortcutFallback);
    SK_PASS
}

/// This socket's fallback marker (its presence is the mark), created with `flags` = F_CREATE.
#[inline(always)]
fn fallback_marker(sk: *mut core::ffi::c_void, flags: u64) -> *mut u8 {
    let map = ptr::from_ref(&SHORTCUT_FALLBACK).cast_mut().cast();
    // SAFETY: map is our SK_STORAGE map; the helper checks `sk` and returns null on failure.
    unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), flags) as *mut u8 }
}

#[inline(always)]
fn is_passthrough(endpoint: &Endpoint) -> bool {
    if endpoint.is_v4() {
        endpoint.addr[3] == PASSTHROUGH_V4
    } else {
        endpoint.addr == PASSTHROUGH_V6
    }
}

#[inline(always)]
fn is_loopback(endpoint: &Endpoint) -> bool {
    (endpoint.is_v4() && endpoint.addr[3] == LOOPBACK_V4) || endpoint.addr == LOOPBACK_V6
}
