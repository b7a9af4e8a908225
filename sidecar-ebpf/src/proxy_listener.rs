//! Whether the proxy's outbound listener is there, asked by connect4/6 before they send a
//! connect to it: one socket lookup (`bpf_sk_lookup_tcp`, allowed in sock_addr programs since
//! Linux 5.2) of the loopback address and port the connect would be rewritten to, in the
//! socket's own network namespace (the pod's).
//!
//! The lookup answers exactly what the rewritten connect would meet: any listener that would
//! accept it (on the loopback address or the wildcard one, a dual-stack one for IPv4, every
//! member of a reuseport group), whoever started it and whenever, with nothing to register and
//! nothing left stale by a crash: a SIGKILLed proxy's listener is gone from the kernel's tables
//! when its process is. A listener registered at listen() (as the inbound one is, for
//! sk_lookup, which needs a socket to hand connections to) would be cheaper by a few hash
//! lookups but wrong for a proxy that listened before `init`, or through a map of an older
//! layout replaced by a re-init: `direct` would then send traffic past a live proxy.
use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release},
    programs::SockAddrContext,
};

/// Where a captured connect is sent: the proxy's IPv4 or IPv6 loopback listener.
#[derive(Clone, Copy)]
pub enum Loopback {
    /// `127.0.0.1` (IPv4 connects, and IPv4-mapped ones from dual-stack sockets).
    V4,
    /// `::1`.
    V6,
}

/// The proxy's loopback addresses as the kernel holds them: network-order bytes read as native
/// words.
pub const LOOPBACK_V4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
pub const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// A listening socket accepts connections to `loopback` on `port` (host order) in the
/// network namespace of the context's socket.
#[inline(always)]
pub fn is_listening(ctx: &SockAddrContext, loopback: Loopback, port: u32) -> bool {
    let dport = (port as u16).to_be();
    // The lookup finds an established socket for the full 4-tuple first, then a listener for
    // the destination: with no source, only the listener can match.
    let (tuple, size) = match loopback {
        Loopback::V4 => (
            bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: 0,
                    daddr: LOOPBACK_V4_BE,
                    sport: 0,
                    dport,
                },
            },
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>(),
        ),
        Loopback::V6 => (
            bpf_sock_tuple__bindgen_ty_1 {
                ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                    saddr: [0; 4],
                    daddr: LOOPBACK_V6,
                    sport: 0,
                    dport,
                },
            },
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>(),
        ),
    };
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: tuple,
    };
    // SAFETY: the context is this program's; the tuple is initialised over `size` bytes (the
    // helper tells the families apart by that size); a socket returned must be released.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.sock_addr.cast(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
