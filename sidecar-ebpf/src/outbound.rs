//! connect4/connect6: decide whether a TCP connect goes to the proxy, and if so rewrite its
//! destination to the proxy's loopback listener, remembering the original on the socket.
//!
//! When no proxy listens (crashed, restarting, not started yet), the capture's policy decides
//! (`init --when-proxy-down`): `refuse` still sends the connect to the loopback port, where
//! nothing listens, so the app gets ECONNREFUSED at once, as under Istio's iptables; `direct`
//! lets it go to its original destination, uncaptured. Either way it is counted.
use core::ptr::write_volatile;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock_addr},
    btf_maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use sidecar_common::{CaptureConfig, Counter, Endpoint};

use crate::{
    counters::bump,
    maps::{CAPTURE_CONFIG, EXCLUDED_CIDR4, EXCLUDED_CIDR6, EXCLUDED_PORTS},
    orig_dst::storage_ptr,
    proxy_identity::current_is_proxy,
    proxy_listener::{self, LOOPBACK_V4_BE, LOOPBACK_V6, Loopback},
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

pub fn on_connect4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; fields are read once.
    let (ip_be, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let Some(config) = should_redirect(sa, Endpoint::v4(ip_be, port_host(port_be))) else {
        return;
    };
    let proxy_port = config.outbound_port;
    if proxy_down_goes_direct(ctx, config, Loopback::V4) {
        return;
    }
    if remember(ctx, Endpoint::v4(ip_be, port_host(port_be))) {
        // SAFETY: user_ip4 and user_port are writable in connect4; separate volatile stores
        // keep LLVM from merging them into a wider store the verifier rejects.
        unsafe {
            write_volatile(&mut (*sa).user_ip4, LOOPBACK_V4_BE);
            write_volatile(&mut (*sa).user_port, port_be_of(proxy_port));
        }
        bump(Counter::Redirected);
    }
}

pub fn on_connect6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in on_connect4.
    let (ip6, port_be) = unsafe { ((*sa).user_ip6, (*sa).user_port) };
    let dst = Endpoint {
        addr: ip6,
        port: port_host(port_be),
    };
    let Some(config) = should_redirect(sa, dst) else {
        return;
    };
    let proxy_port = config.outbound_port;
    // An IPv4-mapped destination (a dual-stack socket dialling IPv4) goes to the proxy's IPv4
    // loopback listener through the same mapped form; native IPv6 goes to ::1. Decided once,
    // up front: testing the family again after the lookup made the compiler copy everything
    // in between for each family (a program twice the size).
    let (loopback, target) = if dst.is_v4() {
        (
            Loopback::V4,
            [0, 0, Endpoint::V4_MAPPED_WORD, LOOPBACK_V4_BE],
        )
    } else {
        (Loopback::V6, LOOPBACK_V6)
    };
    if proxy_down_goes_direct(ctx, config, loopback) {
        return;
    }
    if remember(ctx, dst) {
        // SAFETY: user_ip6 words and user_port are writable in connect6; one volatile store each.
        unsafe {
            write_volatile(&mut (*sa).user_ip6[0], target[0]);
            write_volatile(&mut (*sa).user_ip6[1], target[1]);
            write_volatile(&mut (*sa).user_ip6[2], target[2]);
            write_volatile(&mut (*sa).user_ip6[3], target[3]);
            write_volatile(&mut (*sa).user_port, port_be_of(proxy_port));
        }
        bump(Counter::Redirected);
    }
}

/// Returns the configuration when this connect must be redirected, counting the reason when
/// not.
#[inline(always)]
fn should_redirect(sa: *mut bpf_sock_addr, dst: Endpoint) -> Option<&'static CaptureConfig> {
    // SAFETY: reading the socket type and protocol from a valid context.
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return None;
    }
    let config = CAPTURE_CONFIG.get(0)?;
    if config.outbound_port == 0 {
        return None; // installed, not configured yet (a first init in progress)
    }
    if current_is_proxy(config) {
        bump(Counter::BypassedUidGid);
        return None;
    }
    if is_loopback(&dst) {
        bump(Counter::Loopback);
        return None;
    }
    if port_excluded(dst.port) {
        bump(Counter::ExcludedPort);
        return None;
    }
    if cidr_excluded(&dst) {
        bump(Counter::ExcludedCidr);
        return None;
    }
    Some(config)
}

/// Whether this connect goes direct because no proxy listens on the loopback port it would go
/// to (`DIRECT_WHEN_PROXY_DOWN`). A connect that finds no proxy is counted either way; under
/// `refuse` it still goes to that port, to be refused there.
#[inline(always)]
fn proxy_down_goes_direct(
    ctx: &SockAddrContext,
    config: &CaptureConfig,
    loopback: Loopback,
) -> bool {
    if proxy_listener::is_listening(ctx, loopback, config.outbound_port) {
        return false;
    }
    if config.flags & CaptureConfig::DIRECT_WHEN_PROXY_DOWN != 0 {
        bump(Counter::OutboundNoProxyDirect);
        true
    } else {
        bump(Counter::OutboundNoProxyRefused);
        false
    }
}

/// Stores the original destination on the socket; false (counted) if the kernel refused.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: Endpoint) -> bool {
    let slot = storage_ptr(ctx, BPF_SK_STORAGE_GET_F_CREATE as u64);
    if slot.is_null() {
        bump(Counter::Errors);
        warn!(
            ctx,
            "no socket storage for the original destination; connect goes direct"
        );
        return false;
    }
    // SAFETY: the kernel returned a valid pointer to this socket's storage.
    unsafe { *slot = dst };
    true
}

#[inline(always)]
fn is_loopback(dst: &Endpoint) -> bool {
    if dst.is_v4() {
        dst.addr[3].to_ne_bytes()[0] == 127
    } else {
        dst.addr[0] == 0 && dst.addr[1] == 0 && dst.addr[2] == 0 && dst.addr[3] == LOOPBACK_V6[3]
    }
}

#[inline(always)]
fn port_excluded(port: u32) -> bool {
    EXCLUDED_PORTS
        .get(&Key::new(16, (port as u16).to_be_bytes()))
        .is_some()
}

#[inline(always)]
fn cidr_excluded(dst: &Endpoint) -> bool {
    if dst.is_v4() {
        let key = Key::new(32, dst.addr[3].to_ne_bytes());
        EXCLUDED_CIDR4.get(&key).is_some()
    } else {
        let key = Key::new(128, dst.octets());
        EXCLUDED_CIDR6.get(&key).is_some()
    }
}

/// `user_port` holds the network-order port in its low 16 bits.
#[inline(always)]
fn port_host(user_port: u32) -> u32 {
    u16::from_be(user_port as u16) as u32
}

#[inline(always)]
fn port_be_of(port: u32) -> u32 {
    (port as u16).to_be() as u32
}
