//! post_bind4/post_bind6 on the pod's cgroup: only the proxy may bind the ports capture sends
//! traffic to. Whoever listens on the inbound port is registered as the target of all inbound
//! capture, and whoever listens on the outbound port receives the pod's outbound connections
//! in plaintext: a process of the app's user that got there first (say, while the proxy
//! restarts) would receive the mesh's traffic without its policy. Its bind fails with EPERM,
//! counted and logged.
//!
//! A bind hook sees the port actually bound, also one the kernel picked for `bind(port 0)`;
//! `init` reserves the proxy's ports in the pod's namespace (`ip_local_reserved_ports`), so
//! the one way around a bind hook, the automatic port of a listen() without bind, never
//! yields them.
use core::ptr::read_volatile;

use aya_ebpf::programs::SockContext;
use sidecar_common::Counter;

use crate::{counters::bump, maps::CAPTURE_CONFIG, proxy_identity::current_is_proxy};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

pub fn on_post_bind(ctx: &SockContext) -> i32 {
    let sock = ctx.sock;
    // SAFETY: scalar fields of a valid bpf_sock context, each read once.
    let (sock_type, protocol, port) = unsafe {
        (
            read_volatile(&(*sock).type_),
            read_volatile(&(*sock).protocol),
            read_volatile(&(*sock).src_port),
        )
    };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return ALLOW;
    };
    let proxy_port = port == config.inbound_port || port == config.outbound_port;
    if port == 0 || !proxy_port || current_is_proxy(config) {
        return ALLOW;
    }
    bump(Counter::ProxyPortBindRefused);
    REFUSE
}
