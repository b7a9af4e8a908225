//! Every map the programs use. The loader writes the configuration maps and pins them all.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage, SockHash, SockMap},
    macros::btf_map,
};
use sidecar_common::{
    CaptureConfig, Counter, Endpoint, MAX_EXCLUDED_CIDRS, MAX_TRACKED_CONNECTIONS,
    PORT_BITMAP_WORDS,
};

use crate::shortcut::SocketPair;

#[btf_map]
pub static CAPTURE_CONFIG: Array<CaptureConfig, 1> = Array::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT }> = PerCpuArray::new();

/// One bit per destination port; a set bit means "never redirect".
#[btf_map]
pub static EXCLUDED_PORTS: Array<u64, { PORT_BITMAP_WORDS as usize }> = Array::new();

#[btf_map]
pub static EXCLUDED_CIDR4: LpmTrie<[u8; 4], u8, { MAX_EXCLUDED_CIDRS as usize }> = LpmTrie::new();

#[btf_map]
pub static EXCLUDED_CIDR6: LpmTrie<[u8; 16], u8, { MAX_EXCLUDED_CIDRS as usize }> = LpmTrie::new();

/// The original destination of each redirected socket, freed by the kernel with the socket.
#[btf_map]
pub static ORIG_DST: SkStorage<Endpoint> = SkStorage::new();

/// App socket's local endpoint -> original destination, so the proxy can look a connection up
/// from the peer address of the socket it accepted. Entries are removed when the app's socket
/// reaches TCP_CLOSE.
#[btf_map]
pub static ORIG_DST_BY_PEER: HashMap<Endpoint, Endpoint, { MAX_TRACKED_CONNECTIONS as usize }> =
    HashMap::new();

/// One bit per local port; a set bit means inbound connections to it go straight to the app.
#[btf_map]
pub static EXCLUDED_INBOUND_PORTS: Array<u64, { PORT_BITMAP_WORDS as usize }> = Array::new();

/// The proxy's inbound listeners: index 0 for IPv4, 1 for IPv6 (or dual-stack). Filled by
/// sock_ops when the proxy calls listen(), so the proxy needs no BPF privilege.
#[btf_map]
pub static INBOUND_LISTENERS: SockMap<2> = SockMap::new();

/// Both ends of each app-proxy loopback connection, keyed by their own (local, remote)
/// addresses, when the sockmap shortcut is on. The kernel removes a socket when it closes.
#[btf_map]
pub static SHORTCUT_SOCKETS: SockHash<SocketPair, { MAX_TRACKED_CONNECTIONS as usize * 2 }> =
    SockHash::new();

/// Connections whose hop left the shortcut (an end sent before its peer was in it), by the
/// keys of both ends: neither end may take the shortcut afterwards. LRU: a stale entry only
/// keeps a later connection on the same address pair on TCP.
#[btf_map]
pub static SHORTCUT_FALLBACK: LruHashMap<SocketPair, u8, { MAX_TRACKED_CONNECTIONS as usize }> =
    LruHashMap::new();
