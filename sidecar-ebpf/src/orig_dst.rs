//! Where a redirected connection was going, for whoever asks:
//! - the app, through getpeername (it sees the real peer, as under iptables NAT);
//! - the proxy, through `getsockopt(SOL_IP/SOL_IPV6, SO_ORIGINAL_DST)` on the socket it
//!   accepted. sock_ops hands the original destination from the app's socket to the proxy's
//!   accepted socket during the loopback handshake, so the answer lives on the socket asked
//!   about: it does not depend on the app's socket still existing (an app may connect, write
//!   and close before the proxy even accepts), and it goes away with the proxy's socket.
use core::ptr::{self, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::bpf_sk_storage_get,
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::warn;
use sidecar_common::{
    CAPTURE_STATUS_OPTNAME, CaptureConfig, CaptureStatus, Counter, Endpoint, SO_ORIGINAL_DST,
    SOL_IP, SOL_IPV6,
};

use crate::{
    counters::bump,
    maps::{ACCEPTED_ORIG_DST, CAPTURE_CONFIG, ORIG_DST, ORIG_DST_HANDOFF},
    shortcut::{self, Side},
    socket_pair::{SocketPair, sock_ops_pair},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Large option values are not ours to look at: the kernel keeps the original when optlen is 0.
const PAGE_SIZE: i32 = 4096;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;
/// The handoff trie is used for exact matches: every key has its full length.
const ENDPOINT_BITS: u32 = (core::mem::size_of::<Endpoint>() * 8) as u32;

/// The socket storage slot of a sock_addr context's socket (null when absent).
#[inline(always)]
pub fn storage_ptr(ctx: &SockAddrContext, flags: u64) -> *mut Endpoint {
    // SAFETY: the context is valid; `sk` is a full socket in every sock_addr hook.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    storage_of(&ORIG_DST, sk as *mut _, flags)
}

#[inline(always)]
fn storage_of(
    map: &aya_ebpf::btf_maps::SkStorage<Endpoint>,
    sk: *mut core::ffi::c_void,
    flags: u64,
) -> *mut Endpoint {
    let map = ptr::from_ref(map).cast_mut().cast();
    // SAFETY: map is one of our SK_STORAGE maps; the helper checks `sk` and returns null on
    // failure.
    unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), flags) as *mut Endpoint }
}

pub fn on_getpeername4(ctx: &SockAddrContext) {
    let slot = storage_ptr(ctx, 0);
    if slot.is_null() {
        return;
    }
    // SAFETY: slot is this socket's storage; user_ip4/user_port are writable in getpeername4.
    unsafe {
        let orig = *slot;
        if !orig.is_v4() {
            return;
        }
        write_volatile(&mut (*ctx.sock_addr).user_ip4, orig.addr[3]);
        write_volatile(
            &mut (*ctx.sock_addr).user_port,
            (orig.port as u16).to_be() as u32,
        );
    }
}

pub fn on_getpeername6(ctx: &SockAddrContext) {
    let slot = storage_ptr(ctx, 0);
    if slot.is_null() {
        return;
    }
    // SAFETY: as above; the stored address is already in the IPv6 (or IPv4-mapped) form.
    unsafe {
        let orig = *slot;
        let sa = ctx.sock_addr;
        write_volatile(&mut (*sa).user_ip6[0], orig.addr[0]);
        write_volatile(&mut (*sa).user_ip6[1], orig.addr[1]);
        write_volatile(&mut (*sa).user_ip6[2], orig.addr[2]);
        write_volatile(&mut (*sa).user_ip6[3], orig.addr[3]);
        write_volatile(&mut (*sa).user_port, (orig.port as u16).to_be() as u32);
    }
}

/// The loopback handshake between an app socket and the proxy: the app's end completes first
/// (its ACK is what creates the proxy's socket), so the app's end offers the original
/// destination under its own address and the proxy's end takes it under its peer's. Also
/// registers the proxy's inbound listener when it starts listening, and enters the ends of
/// the app-proxy hop in the sockmap shortcut when that is on. No per-state callbacks: nothing
/// here waits for a socket to close.
pub fn on_sock_ops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        crate::inbound::register_listener(ctx);
        return;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return;
    }
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return;
    };
    let Some(pair) = sock_ops_pair(ctx) else {
        return;
    };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let redirected = offer_handoff(ctx, &pair);
        shortcut::on_established(ctx, config, pair, Side::Active { redirected });
    } else {
        if shortcut::is_outbound_listener(config, &pair.local) {
            take_handoff(ctx, &pair);
        }
        shortcut::on_established(ctx, config, pair, Side::Passive);
    }
}

/// The context's socket, as the storage helpers take it.
#[inline(always)]
fn context_socket(ctx: &SockOpsContext) -> *mut core::ffi::c_void {
    // SAFETY: reading the socket pointer from a valid sock_ops context.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as *mut _ }
}

/// App side: returns whether connect4/6 redirected this socket, and if so offers its original
/// destination to the proxy's end of the handshake. An entry for the same address left by a
/// handshake that never completed on the proxy's side is overwritten here.
#[inline(always)]
fn offer_handoff(ctx: &SockOpsContext, pair: &SocketPair) -> bool {
    let sk = context_socket(ctx);
    if sk.is_null() {
        return false;
    }
    let slot = storage_of(&ORIG_DST, sk, 0);
    if slot.is_null() {
        return false; // not a socket we redirected
    }
    // SAFETY: slot points at this socket's storage.
    let orig = unsafe { *slot };
    if ORIG_DST_HANDOFF
        .insert(&Key::new(ENDPOINT_BITS, pair.local), orig, BPF_ANY as u64)
        .is_err()
    {
        bump(Counter::Errors);
        warn!(
            ctx,
            "original-destination handoff full; the proxy cannot route this connection"
        );
    }
    true
}

/// Proxy side (a socket accepted on the outbound port): moves the original destination its
/// peer offered onto this socket.
#[inline(always)]
fn take_handoff(ctx: &SockOpsContext, pair: &SocketPair) {
    let key = Key::new(ENDPOINT_BITS, pair.remote);
    let Some(orig) = ORIG_DST_HANDOFF.get(&key).copied() else {
        return; // a client we did not redirect (or the handoff was full: counted there)
    };
    let _ = ORIG_DST_HANDOFF.remove(&key);
    let sk = context_socket(ctx);
    if sk.is_null() {
        return;
    }
    let slot = storage_of(&ACCEPTED_ORIG_DST, sk, BPF_SK_STORAGE_GET_F_CREATE as u64);
    if slot.is_null() {
        bump(Counter::Errors);
        warn!(
            ctx,
            "no socket storage for the proxy's original destination; connection is reset"
        );
        return;
    }
    // SAFETY: the kernel returned a valid pointer to this socket's storage.
    unsafe { *slot = orig };
}

/// Answers `SO_ORIGINAL_DST` for sockets whose peer we redirected; passes everything else
/// through untouched (other levels, other options, and connections we know nothing about).
pub fn on_getsockopt(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    // SAFETY: reading scalar fields of a valid sockopt context.
    let (level, optname, optlen) = unsafe { ((*so).level, (*so).optname, (*so).optlen) };
    if level == SOL_IP && optname == CAPTURE_STATUS_OPTNAME {
        write_capture_status(ctx);
        return;
    }
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        pass_through(ctx, optlen);
        return;
    }
    // SAFETY: as above.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let slot = storage_of(&ACCEPTED_ORIG_DST, sk.cast(), 0);
    if slot.is_null() {
        bump(Counter::OrigDstMissing);
        return;
    }
    // SAFETY: slot points at this socket's storage.
    let orig = unsafe { *slot };
    let written = if level == SOL_IP {
        write_sockaddr_in(ctx, &orig)
    } else {
        write_sockaddr_in6(ctx, &orig)
    };
    if written {
        bump(Counter::OrigDstServed);
    }
}

/// The capture's presence and configuration, for the proxy's health check.
#[inline(always)]
fn write_capture_status(ctx: &SockoptContext) {
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return;
    };
    let mut flags = 0;
    if config.outbound_port != 0 {
        flags |= CaptureStatus::OUTBOUND;
    }
    if config.inbound_port != 0 {
        flags |= CaptureStatus::INBOUND;
    }
    if config.flags & CaptureConfig::SOCKMAP_SHORTCUT == 0 {
        flags |= CaptureStatus::SHORTCUT_OFF;
    }
    let status = CaptureStatus {
        magic: CaptureStatus::MAGIC,
        flags,
    };
    const LEN: usize = core::mem::size_of::<CaptureStatus>();
    let so = ctx.sockopt;
    // SAFETY: bounds are checked against optval_end before writing, as the verifier requires.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if start.add(LEN) > end {
            return;
        }
        ptr::copy_nonoverlapping((&raw const status).cast::<u8>(), start, LEN);
        finish_answer(ctx, LEN as i32);
    }
}

#[inline(always)]
fn pass_through(ctx: &SockoptContext, optlen: i32) {
    if optlen > PAGE_SIZE {
        // SAFETY: optlen is writable in getsockopt programs.
        unsafe { write_volatile(&mut (*ctx.sockopt).optlen, 0) };
    }
}

#[inline(always)]
fn write_sockaddr_in(ctx: &SockoptContext, orig: &Endpoint) -> bool {
    if !orig.is_v4() {
        return false;
    }
    let so = ctx.sockopt;
    // SAFETY: bounds are checked against optval_end before writing, as the verifier requires.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if start.add(SOCKADDR_IN_LEN) > end {
            return false;
        }
        let mut out = [0u8; SOCKADDR_IN_LEN];
        out[0..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
        out[2..4].copy_from_slice(&(orig.port as u16).to_be_bytes());
        out[4..8].copy_from_slice(&orig.addr[3].to_ne_bytes());
        ptr::copy_nonoverlapping(out.as_ptr(), start, SOCKADDR_IN_LEN);
        finish_answer(ctx, SOCKADDR_IN_LEN as i32);
    }
    true
}

#[inline(always)]
fn write_sockaddr_in6(ctx: &SockoptContext, orig: &Endpoint) -> bool {
    let so = ctx.sockopt;
    // SAFETY: as in write_sockaddr_in.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if start.add(SOCKADDR_IN6_LEN) > end {
            return false;
        }
        let mut out = [0u8; SOCKADDR_IN6_LEN];
        out[0..2].copy_from_slice(&(AF_INET6 as u16).to_ne_bytes());
        out[2..4].copy_from_slice(&(orig.port as u16).to_be_bytes());
        out[8..24].copy_from_slice(&orig.octets());
        ptr::copy_nonoverlapping(out.as_ptr(), start, SOCKADDR_IN6_LEN);
        finish_answer(ctx, SOCKADDR_IN6_LEN as i32);
    }
    true
}

/// Each field gets its own volatile store: merged 8-byte context stores fail verification.
#[inline(always)]
unsafe fn finish_answer(ctx: &SockoptContext, len: i32) {
    // SAFETY: optlen and retval are writable in getsockopt programs.
    unsafe {
        write_volatile(&mut (*ctx.sockopt).optlen, len);
        write_volatile(&mut (*ctx.sockopt).retval, 0);
    }
}
