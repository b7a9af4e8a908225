//! Kernel side of the sidecar: programs attached to a pod's cgroup that send the app's TCP
//! connects to the local proxy and tell the proxy where each connection was going, and one
//! attached to the pod's network namespace that hands inbound connections to the proxy.
//!
//! Every program but the port guard returns "allow" (1): a failure inside a program is counted
//! and the connect goes direct (fail open) rather than failing the app's syscall with EPERM.
#![no_std]
#![no_main]

mod counters;
mod inbound;
mod maps;
mod orig_dst;
mod outbound;
mod port_guard;
mod proxy_identity;
mod proxy_listener;
mod shortcut;
mod socket_pair;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, cgroup_sockopt, sk_lookup, sk_msg, sock_ops},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    outbound::on_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    outbound::on_connect6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    orig_dst::on_getpeername4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    orig_dst::on_getpeername6(&ctx);
    ALLOW
}

/// Named `track_sockets`, not `sockops`: a fn called `sockops` clashes with the section symbol.
#[sock_ops]
pub fn track_sockets(ctx: SockOpsContext) -> u32 {
    orig_dst::on_sock_ops(&ctx);
    ALLOW as u32
}

#[cgroup_sockopt(getsockopt)]
pub fn getsockopt_orig_dst(ctx: SockoptContext) -> i32 {
    orig_dst::on_getsockopt(&ctx);
    ALLOW
}

/// Refuses binds of the proxy's ports by anyone but the proxy (the one program that may
/// return "refuse": that bind is the attack it stops).
#[cgroup_sock(post_bind4)]
pub fn guard_proxy_ports4(ctx: SockContext) -> i32 {
    port_guard::on_post_bind(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn guard_proxy_ports6(ctx: SockContext) -> i32 {
    port_guard::on_post_bind(&ctx)
}

/// Attached to the pod's network namespace, not its cgroup.
#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    inbound::on_sk_lookup(&ctx)
}

/// Attached to the sockmap shortcut's socket hash (`init --sockmap`), not to a cgroup.
#[sk_msg]
pub fn shortcut_loopback(ctx: SkMsgContext) -> u32 {
    shortcut::on_msg(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
