//! Inbound capture without NAT: an sk_lookup program on the pod's network namespace picks the
//! proxy's inbound listener as the socket for connections to the pod's ports. The accepted
//! socket keeps the original local address, which is therefore the original destination.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_ops},
    btf_maps::lpm_trie::Key,
    programs::{SkLookupContext, SockOpsContext},
};
use sidecar_common::{Counter, Endpoint, PASSTHROUGH_SOURCE_V4, PASSTHROUGH_SOURCE_V6};

use crate::{
    counters::bump,
    maps::{CAPTURE_CONFIG, EXCLUDED_INBOUND_PORTS, INBOUND_LISTENERS},
};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const LISTENER_V4: u32 = 0;
const LISTENER_V6: u32 = 1;
/// Addresses as the context holds them: network-order bytes read as native words.
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
const PASSTHROUGH_V4: u32 = u32::from_ne_bytes(PASSTHROUGH_SOURCE_V4);
const PASSTHROUGH_V6: [u32; 4] = Endpoint::v6(PASSTHROUGH_SOURCE_V6, 0).addr;

pub fn on_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY: reading scalar fields of a valid sk_lookup context, each at a constant offset.
    let (family, protocol, remote4, remote6, local4, local6, local_port) = unsafe {
        (
            read_volatile(&(*lookup).family),
            read_volatile(&(*lookup).protocol),
            read_volatile(&(*lookup).remote_ip4),
            [
                read_volatile(&(*lookup).remote_ip6[0]),
                read_volatile(&(*lookup).remote_ip6[1]),
                read_volatile(&(*lookup).remote_ip6[2]),
                read_volatile(&(*lookup).remote_ip6[3]),
            ],
            read_volatile(&(*lookup).local_ip4),
            [
                read_volatile(&(*lookup).local_ip6[0]),
                read_volatile(&(*lookup).local_ip6[1]),
                read_volatile(&(*lookup).local_ip6[2]),
                read_volatile(&(*lookup).local_ip6[3]),
            ],
            read_volatile(&(*lookup).local_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let v4 = family == AF_INET;
    // Pod-local traffic on loopback is not inbound traffic.
    let local_is_loopback = if v4 {
        local4.to_ne_bytes()[0] == 127
    } else {
        local6 == LOOPBACK_V6
    };
    if local_is_loopback {
        return SK_PASS;
    }
    // The proxy forwards to the app from its passthrough source: let that one through, and
    // only that one. Any other source, 127.0.0.1 and ::1 included, meets the proxy's policy.
    // A remote peer cannot complete a handshake from it: the answer would go to this pod's lo.
    let from_passthrough = if v4 {
        remote4 == PASSTHROUGH_V4
    } else {
        remote6 == PASSTHROUGH_V6
    };
    if from_passthrough {
        bump(Counter::InboundPassthrough);
        return SK_PASS;
    }
    if inbound_port_excluded(local_port) {
        bump(Counter::InboundExcludedPort);
        return SK_PASS;
    }
    // An IPv4 connection may also land on a dual-stack IPv6 listener.
    let assigned = if v4 {
        INBOUND_LISTENERS
            .redirect_sk_lookup(ctx, LISTENER_V4, 0)
            .or_else(|_| INBOUND_LISTENERS.redirect_sk_lookup(ctx, LISTENER_V6, 0))
    } else {
        INBOUND_LISTENERS.redirect_sk_lookup(ctx, LISTENER_V6, 0)
    };
    match assigned {
        Ok(()) => {
            bump(Counter::InboundRedirected);
            SK_PASS
        }
        Err(_) => {
            // Fail closed: without the proxy, plaintext must not reach a meshed app.
            bump(Counter::InboundNoProxy);
            SK_DROP
        }
    }
}

#[inline(always)]
fn inbound_port_excluded(port: u32) -> bool {
    EXCLUDED_INBOUND_PORTS
        .get(&Key::new(16, (port as u16).to_be_bytes()))
        .is_some()
}

/// sock_ops `TCP_LISTEN_CB`: a socket in the pod starting to listen on the inbound port is the
/// proxy's inbound listener; register it for `on_sk_lookup`.
#[inline(always)]
pub fn register_listener(ctx: &SockOpsContext) {
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return;
    };
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: scalar fields of a valid sock_ops context.
    let (family, port) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_port),
        )
    };
    if port != config.inbound_port {
        return;
    }
    let index = if family == AF_INET {
        LISTENER_V4
    } else {
        LISTENER_V6
    };
    // SAFETY: `ops` is this program's context, as `update` requires.
    if unsafe { INBOUND_LISTENERS.update(index, ops, BPF_ANY as u64) }.is_err() {
        bump(Counter::Errors);
    }
}
