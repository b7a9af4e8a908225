//! Where a redirected connection was going, for whoever asks:
//! - the app, through getpeername (it sees the real peer, as under iptables NAT);
//! - the proxy, through `getsockopt(SOL_IP/SOL_IPV6, SO_ORIGINAL_DST)` on the socket it
//!   accepted, answered from an index that sock_ops keeps keyed by the app socket's address.
use core::ptr::{self, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_sock,
    },
    helpers::generated::bpf_sk_storage_get,
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::warn;
use sidecar_common::{Counter, Endpoint, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6};

use crate::{
    counters::bump,
    maps::{ORIG_DST, ORIG_DST_BY_PEER},
    shortcut::{self, Side},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_CLOSE: u32 = 7;
/// Large option values are not ours to look at: the kernel keeps the original when optlen is 0.
const PAGE_SIZE: i32 = 4096;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

/// The socket storage slot of a sock_addr context's socket (null when absent).
#[inline(always)]
pub fn storage_ptr(ctx: &SockAddrContext, flags: u64) -> *mut Endpoint {
    // SAFETY: the context is valid; `sk` is a full socket in every sock_addr hook.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    storage_of(sk as *mut _, flags)
}

#[inline(always)]
fn storage_of(sk: *mut core::ffi::c_void, flags: u64) -> *mut Endpoint {
    let map = ptr::from_ref(&ORIG_DST).cast_mut().cast();
    // SAFETY: map is our SK_STORAGE map; the helper checks `sk` and returns null on failure.
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

/// Indexes a redirected socket by its local address once established, and drops the entry
/// when the socket closes (the STATE_CB callback is enabled only on redirected sockets).
/// Also registers the proxy's inbound listener when it starts listening, and enters the ends
/// of the app-proxy hop in the sockmap shortcut when that is on.
pub fn on_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let redirected = index_established(ctx);
            shortcut::on_established(ctx, Side::Active { redirected });
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => shortcut::on_established(ctx, Side::Passive),
        BPF_SOCK_OPS_TCP_LISTEN_CB => crate::inbound::register_listener(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            if let Some(local) = local_endpoint(ctx) {
                let _ = ORIG_DST_BY_PEER.remove(local);
            }
        }
        _ => {}
    }
}

/// Returns whether the socket is one connect4/6 redirected.
#[inline(always)]
fn index_established(ctx: &SockOpsContext) -> bool {
    // SAFETY: reading the socket pointer from a valid sock_ops context.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    let slot = storage_of(sk as *mut _, 0);
    if slot.is_null() {
        return false; // not a socket we redirected
    }
    let Some(local) = local_endpoint(ctx) else {
        return true;
    };
    // SAFETY: slot points at this socket's storage.
    let orig = unsafe { *slot };
    if ORIG_DST_BY_PEER.insert(local, orig, 0).is_err() {
        bump(Counter::Errors);
        warn!(
            ctx,
            "original-destination index full; the proxy cannot route this connection"
        );
        return true;
    }
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        bump(Counter::Errors);
    }
    true
}

/// The socket's local address in the shared IPv4-mapped form.
///
/// Every field is loaded up front, before branching on the family: otherwise LLVM turns the
/// per-family loads into one load at a computed context offset, which the verifier rejects.
#[inline(always)]
fn local_endpoint(ctx: &SockOpsContext) -> Option<Endpoint> {
    let ops = ctx.ops;
    // SAFETY: reading scalar fields of a valid sock_ops context (all readable for any family).
    let (family, port, ip4, ip6) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_port),
            read_volatile(&(*ops).local_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
        )
    };
    match family {
        AF_INET => Some(Endpoint::v4(ip4, port)),
        AF_INET6 => Some(Endpoint { addr: ip6, port }),
        _ => None,
    }
}

/// Answers `SO_ORIGINAL_DST` for sockets whose peer we redirected; passes everything else
/// through untouched (other levels, other options, and connections we know nothing about).
pub fn on_getsockopt(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    // SAFETY: reading scalar fields of a valid sockopt context.
    let (level, optname, optlen) = unsafe { ((*so).level, (*so).optname, (*so).optlen) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        pass_through(ctx, optlen);
        return;
    }
    // SAFETY: as above.
    let sk = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let Some(peer) = peer_endpoint(sk) else {
        return;
    };
    // SAFETY: lookup result is only read, and copied before any map update.
    let Some(orig) = (unsafe { ORIG_DST_BY_PEER.get(peer) }).copied() else {
        bump(Counter::OrigDstMissing);
        return;
    };
    let written = if level == SOL_IP {
        write_sockaddr_in(ctx, &orig)
    } else {
        write_sockaddr_in6(ctx, &orig)
    };
    if written {
        bump(Counter::OrigDstServed);
    }
}

#[inline(always)]
fn pass_through(ctx: &SockoptContext, optlen: i32) {
    if optlen > PAGE_SIZE {
        // SAFETY: optlen is writable in getsockopt programs.
        unsafe { write_volatile(&mut (*ctx.sockopt).optlen, 0) };
    }
}

/// The remote end of the proxy's accepted socket: the app socket's local address.
/// Fields are loaded up front for the same reason as in `local_endpoint`.
#[inline(always)]
fn peer_endpoint(sk: *mut bpf_sock) -> Option<Endpoint> {
    // SAFETY: `sk` was checked non-null and points at the context's socket.
    let (family, port_be, ip4, ip6) = unsafe {
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).dst_port),
            read_volatile(&(*sk).dst_ip4),
            [
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ],
        )
    };
    let port = u16::from_be(port_be) as u32;
    match family {
        AF_INET => Some(Endpoint::v4(ip4, port)),
        AF_INET6 => Some(Endpoint { addr: ip6, port }),
        _ => None,
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
