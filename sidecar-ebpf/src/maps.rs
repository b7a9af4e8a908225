//! Every map the programs use. The loader writes the configuration maps and pins them all.
//!
//! Nothing here is preallocated by size: a capture costs the same few kilobytes at idle
//! whatever its capacities, and grows only with live sockets and pending handshakes (tries
//! and socket storage allocate per entry; the sockmap shortcut's hash is sized by the loader,
//! to one entry unless `init --sockmap` asks for it).
use aya_ebpf::{
    btf_maps::{Array, LpmTrie, PerCpuArray, SkStorage, SockHash, SockMap},
    macros::btf_map,
};
use sidecar_common::{
    CaptureConfig, Counter, DEFAULT_SHORTCUT_CONNECTIONS, Endpoint, MAX_EXCLUDED_CIDRS,
    MAX_EXCLUDED_PORT_PREFIXES, MAX_PENDING_HANDOFFS,
};

use crate::socket_pair::SocketPair;

#[btf_map]
pub static CAPTURE_CONFIG: Array<CaptureConfig, 1> = Array::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT }> = PerCpuArray::new();

/// Destination ports that never go to the proxy, as prefixes of the big-endian port (a range
/// is a handful of prefixes): one longest-prefix lookup per connect.
#[btf_map]
pub static EXCLUDED_PORTS: LpmTrie<[u8; 2], u8, { MAX_EXCLUDED_PORT_PREFIXES as usize }> =
    LpmTrie::new();

#[btf_map]
pub static EXCLUDED_CIDR4: LpmTrie<[u8; 4], u8, { MAX_EXCLUDED_CIDRS as usize }> = LpmTrie::new();

#[btf_map]
pub static EXCLUDED_CIDR6: LpmTrie<[u8; 16], u8, { MAX_EXCLUDED_CIDRS as usize }> = LpmTrie::new();

/// The original destination of each redirected app socket, freed by the kernel with it.
#[btf_map]
pub static ORIG_DST: SkStorage<Endpoint> = SkStorage::new();

/// App socket's local endpoint -> original destination, from the app's end of the handshake
/// to the proxy's (sock_ops, both on loopback): then the entry moves to the proxy's accepted
/// socket. A trie used for exact matches only (full-length keys) because its memory is per
/// entry, where a hash table's buckets would be allocated for its whole capacity up front.
#[btf_map]
pub static ORIG_DST_HANDOFF: LpmTrie<Endpoint, Endpoint, { MAX_PENDING_HANDOFFS as usize }> =
    LpmTrie::new();

/// The original destination on the proxy's accepted socket, where `SO_ORIGINAL_DST` is
/// answered from: it lives exactly as long as the socket the proxy asks about, so it is there
/// however early the app closed, and gone with the proxy's socket.
#[btf_map]
pub static ACCEPTED_ORIG_DST: SkStorage<Endpoint> = SkStorage::new();

/// Local ports whose inbound connections go straight to the app (prefixes, as above).
#[btf_map]
pub static EXCLUDED_INBOUND_PORTS: LpmTrie<[u8; 2], u8, { MAX_EXCLUDED_PORT_PREFIXES as usize }> =
    LpmTrie::new();

/// The proxy's inbound listeners: index 0 for IPv4, 1 for IPv6 (or dual-stack). Filled by
/// sock_ops when the proxy calls listen(), so the proxy needs no BPF privilege.
#[btf_map]
pub static INBOUND_LISTENERS: SockMap<2> = SockMap::new();

/// Both ends of each app-proxy loopback connection, keyed by their own (local, remote)
/// addresses, when the sockmap shortcut is on. The kernel removes a socket when it closes.
/// The loader sets the real capacity (one entry when the shortcut is off).
#[btf_map]
pub static SHORTCUT_SOCKETS: SockHash<SocketPair, { DEFAULT_SHORTCUT_CONNECTIONS as usize * 2 }> =
    SockHash::new();

/// Set on a socket of the hop whose message went through TCP because its peer was not in the
/// shortcut yet: its later messages must follow through TCP, or they could overtake it. Per
/// socket, so it lives exactly as long as the connection (no eviction can lift it).
#[btf_map]
pub static SHORTCUT_FALLBACK: SkStorage<u8> = SkStorage::new();
