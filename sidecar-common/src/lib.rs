//! Types shared by the kernel programs (sidecar-ebpf) and the userspace loader and proxy.
//!
//! Everything here is `#[repr(C)]` and plain data: the same bytes are written by one side and
//! read by the other through BPF maps. With the `std` feature, the userspace types the binary
//! shares with its tests and tools: where the capture is pinned ([`PinLayout`]) and what
//! `sidecar status --json` prints ([`StatusReport`]).
#![no_std]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "std")]
mod pin_layout;
#[cfg(feature = "std")]
mod status_report;
#[cfg(feature = "std")]
pub use pin_layout::{AttachPoint, DEFAULT_BPFFS, PinLayout};
#[cfg(feature = "std")]
pub use status_report::{CaptureReport, LinkReport, StatusReport};

/// Istio's outbound capture port, the default redirect target.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound capture port: the proxy's inbound listener.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Ports the proxy serves on the pod's own addresses besides its inbound port: metrics
/// (15020) and readiness (15021), which the kubelet and Prometheus reach directly. Never
/// captured inbound. Only these: a port Istio reserves that nothing serves here (15004, 15008,
/// 15053, 15090) would be a way in past the proxy for an app listening on it. The admin port
/// (15000) and the outbound port (15001) listen on loopback, where inbound capture never applies.
pub const PROXY_PORTS: [u16; 2] = [15020, 15021];
/// Source address of the proxy's connections to the app, inbound (Istio's 127.0.0.6 and ::6):
/// the one source inbound capture lets through. `init` adds ::6 to the pod's `lo` (127.0.0.6
/// is in 127/8, always there). Not ::1 or 127.0.0.1: an app that trusts localhost would give
/// every remote peer local rights, and a connection from them inside the pod must still meet
/// the proxy's policy.
pub const PASSTHROUGH_SOURCE_V4: [u8; 4] = [127, 0, 0, 6];
pub const PASSTHROUGH_SOURCE_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];
/// Istio's proxy UID and GID, exempt from capture by default.
pub const DEFAULT_PROXY_ID: u32 = 1337;
/// "No UID/GID exemption configured": no real process runs with id `(uid_t)-1`.
pub const NO_ID: u32 = u32::MAX;

/// `SO_ORIGINAL_DST` (and `IP6T_SO_ORIGINAL_DST`): the option the proxy asks for.
pub const SO_ORIGINAL_DST: i32 = 80;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// `getsockopt(SOL_IP, CAPTURE_STATUS_OPTNAME)` on any TCP socket of a captured pod: answered
/// with a [`CaptureStatus`] by the capture's getsockopt program, attached with the others to
/// the pod's cgroup; without capture the kernel refuses the unknown option (ENOPROTOOPT). The
/// proxy, which has no BPF privilege, checks its pod's capture with it. ("SC" and 1, far from
/// the kernel's IP options.)
pub const CAPTURE_STATUS_OPTNAME: i32 = 0x5343_0001;

/// The answer to [`CAPTURE_STATUS_OPTNAME`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureStatus {
    /// [`CaptureStatus::MAGIC`]: the bytes come from our program, not from chance.
    pub magic: u32,
    /// [`CaptureStatus::OUTBOUND`], [`CaptureStatus::INBOUND`], [`CaptureStatus::SHORTCUT_OFF`].
    pub flags: u32,
}

impl CaptureStatus {
    pub const MAGIC: u32 = u32::from_be_bytes(*b"SCAP");
    /// Outbound capture is configured (a first `init` finished).
    pub const OUTBOUND: u32 = 1;
    /// Inbound capture is configured.
    pub const INBOUND: u32 = 2;
    /// The sockmap shortcut is off: no socket of the pod is in a sockmap, so the proxy may
    /// splice(2) its relayed connections. Said this way round so that a capture that does not
    /// say (an older program) is taken as one that may have the shortcut on, where splice would
    /// never see the bytes the shortcut delivers.
    pub const SHORTCUT_OFF: u32 = 4;
}

/// Capacity of each excluded-CIDR trie. Memory is allocated per entry, but kernels before 6.4
/// report (and before 5.11 charge) a map's memlock by its capacity: capacities stay modest.
pub const MAX_EXCLUDED_CIDRS: u32 = 1024;
/// Capacity of each excluded-port trie (ranges are stored as prefixes of the 16-bit port; a
/// range takes at most 30).
pub const MAX_EXCLUDED_PORT_PREFIXES: u32 = 1024;
/// Original destinations handed from an app socket to the proxy's accepted socket, pending:
/// an entry lives from the app's handshake to the proxy's (microseconds on loopback), so this
/// bounds handshakes in flight in the pod (like a listen backlog), not open connections.
pub const MAX_PENDING_HANDOFFS: u32 = 4096;
/// Default capacity of the sockmap shortcut (`init --sockmap`), in connections (two sockets
/// each). A connection beyond it stays on TCP.
pub const DEFAULT_SHORTCUT_CONNECTIONS: u32 = 4096;

/// Names of the maps, as the loader finds them in the object and pins them.
pub mod map_names {
    pub const CONFIG: &str = "CAPTURE_CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const EXCLUDED_INBOUND_PORTS: &str = "EXCLUDED_INBOUND_PORTS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const EXCLUDED_CIDR4: &str = "EXCLUDED_CIDR4";
    pub const EXCLUDED_CIDR6: &str = "EXCLUDED_CIDR6";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const ORIG_DST_HANDOFF: &str = "ORIG_DST_HANDOFF";
    pub const ACCEPTED_ORIG_DST: &str = "ACCEPTED_ORIG_DST";
    pub const SHORTCUT_SOCKETS: &str = "SHORTCUT_SOCKETS";
    pub const SHORTCUT_FALLBACK: &str = "SHORTCUT_FALLBACK";
    /// aya-log's ring buffer.
    pub const KERNEL_LOGS: &str = "AYA_LOGS";
}

/// Capture settings written by `sidecar init` into a one-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Port the proxy listens on for outbound traffic, host byte order.
    pub outbound_port: u32,
    /// Sockets created by this UID are never captured ([`NO_ID`] for none).
    pub proxy_uid: u32,
    /// Sockets created by this GID are never captured ([`NO_ID`] for none).
    pub proxy_gid: u32,
    /// Port of the proxy's inbound listener, host byte order: a socket that starts listening
    /// on it in the pod is registered as the target of inbound capture.
    pub inbound_port: u32,
    /// [`CaptureConfig::SOCKMAP_SHORTCUT`], [`CaptureConfig::DIRECT_WHEN_PROXY_DOWN`].
    pub flags: u32,
}

impl CaptureConfig {
    /// The app-proxy loopback hop is short-circuited with sockmap (`init --sockmap`).
    pub const SOCKMAP_SHORTCUT: u32 = 1;
    /// A connect finding no proxy listening goes to its original destination, uncaptured
    /// (`init --when-proxy-down direct`); without it, it goes to the dead loopback port and is
    /// refused there.
    pub const DIRECT_WHEN_PROXY_DOWN: u32 = 2;

    /// The policy the flags say.
    pub const fn when_proxy_down(&self) -> WhenProxyDown {
        if self.flags & Self::DIRECT_WHEN_PROXY_DOWN != 0 {
            WhenProxyDown::Direct
        } else {
            WhenProxyDown::Refuse
        }
    }
}

/// What an app's outbound connect gets while no proxy listens (crashed, restarting, not
/// started yet): `init --when-proxy-down`. Inbound always fails closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "std",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[cfg_attr(feature = "user", derive(clap::ValueEnum))]
pub enum WhenProxyDown {
    /// Refused at once (ECONNREFUSED, from the proxy's loopback port), as under Istio's
    /// iptables: nothing leaves the pod outside the mesh.
    #[default]
    Refuse,
    /// Sent to its original destination, uncaptured: fail open, for apps that prefer plaintext
    /// to an outage (no mTLS, no mesh policy). eBPF mode only.
    Direct,
}

impl WhenProxyDown {
    pub const fn name(self) -> &'static str {
        match self {
            WhenProxyDown::Refuse => "refuse",
            WhenProxyDown::Direct => "direct",
        }
    }
}

/// An IPv4 or IPv6 endpoint as the kernel sees it.
///
/// `addr` holds the 16 address bytes in network order, grouped in u32 words exactly as in
/// `bpf_sock_addr.user_ip6`. IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so
/// one type serves both families and an app's dual-stack socket needs no special case.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u32,
}

impl Endpoint {
    /// Word 2 of an IPv4-mapped address (`0000:ffff` in network order) read as a native u32.
    pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// An endpoint for an IPv4 address given as a network-order u32 (as the kernel stores it).
    pub const fn v4(ip_be: u32, port: u32) -> Self {
        Endpoint {
            addr: [0, 0, Self::V4_MAPPED_WORD, ip_be],
            port,
        }
    }

    /// An endpoint for an IPv6 address given as its 16 network-order bytes.
    pub const fn v6(bytes: [u8; 16], port: u32) -> Self {
        let b = bytes;
        Endpoint {
            addr: [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ],
            port,
        }
    }

    pub const fn is_v4(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == Self::V4_MAPPED_WORD
    }

    /// The 16 address bytes in network order.
    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let word = self.addr[i].to_ne_bytes();
            out[i * 4] = word[0];
            out[i * 4 + 1] = word[1];
            out[i * 4 + 2] = word[2];
            out[i * 4 + 3] = word[3];
            i += 1;
        }
        out
    }
}

/// Why a connection was (or was not) redirected; each reason has a per-CPU counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A TCP connect was sent to the proxy.
    Redirected = 0,
    /// The socket belongs to the proxy's UID or GID.
    BypassedUidGid = 1,
    /// The destination port is excluded.
    ExcludedPort = 2,
    /// The destination address is in an excluded CIDR.
    ExcludedCidr = 3,
    /// The destination is a loopback address.
    Loopback = 4,
    /// A kernel-side failure (storage or map full); the connect went direct (fail open).
    Errors = 5,
    /// `SO_ORIGINAL_DST` was answered for a redirected connection.
    OrigDstServed = 6,
    /// `SO_ORIGINAL_DST` was asked on an accepted socket whose peer we did not redirect.
    OrigDstMissing = 7,
    /// An inbound connection was steered to the proxy's inbound listener.
    InboundRedirected = 8,
    /// An inbound connection to an excluded port (or a proxy port) went to the app directly.
    InboundExcludedPort = 9,
    /// An inbound connection from the proxy's passthrough source (127.0.0.6, ::6) went direct.
    InboundPassthrough = 10,
    /// An inbound connection was dropped: no proxy inbound listener (fail closed).
    InboundNoProxy = 11,
    /// A socket of the app-proxy loopback hop entered the sockmap shortcut.
    ShortcutSockets = 12,
    /// A message crossed the app-proxy hop through the sockmap shortcut, not TCP/IP.
    ShortcutMessages = 13,
    /// An end of the hop sent before its peer was in the shortcut: the connection stays on
    /// TCP in both directions (switching later could reorder bytes).
    ShortcutFallback = 14,
    /// A process other than the proxy tried to bind the inbound or outbound port: refused.
    ProxyPortBindRefused = 15,
    /// An outbound connect found no proxy listening and was refused (ECONNREFUSED, from the
    /// loopback port it was sent to): `--when-proxy-down refuse`.
    OutboundNoProxyRefused = 16,
    /// An outbound connect found no proxy listening and went to its original destination,
    /// uncaptured (fail open): `--when-proxy-down direct`.
    OutboundNoProxyDirect = 17,
}

impl Counter {
    pub const COUNT: usize = 18;
    pub const ALL: [Counter; Self::COUNT] = [
        Counter::Redirected,
        Counter::BypassedUidGid,
        Counter::ExcludedPort,
        Counter::ExcludedCidr,
        Counter::Loopback,
        Counter::Errors,
        Counter::OrigDstServed,
        Counter::OrigDstMissing,
        Counter::InboundRedirected,
        Counter::InboundExcludedPort,
        Counter::InboundPassthrough,
        Counter::InboundNoProxy,
        Counter::ShortcutSockets,
        Counter::ShortcutMessages,
        Counter::ShortcutFallback,
        Counter::ProxyPortBindRefused,
        Counter::OutboundNoProxyRefused,
        Counter::OutboundNoProxyDirect,
    ];

    /// Stable snake_case name, used by `sidecar status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::BypassedUidGid => "bypassed_uid_gid",
            Counter::ExcludedPort => "excluded_port",
            Counter::ExcludedCidr => "excluded_cidr",
            Counter::Loopback => "loopback",
            Counter::Errors => "errors",
            Counter::OrigDstServed => "orig_dst_served",
            Counter::OrigDstMissing => "orig_dst_missing",
            Counter::InboundRedirected => "inbound_redirected",
            Counter::InboundExcludedPort => "inbound_excluded_port",
            Counter::InboundPassthrough => "inbound_passthrough",
            Counter::InboundNoProxy => "inbound_no_proxy",
            Counter::ShortcutSockets => "shortcut_sockets",
            Counter::ShortcutMessages => "shortcut_messages",
            Counter::ShortcutFallback => "shortcut_fallback",
            Counter::ProxyPortBindRefused => "proxy_port_bind_refused",
            Counter::OutboundNoProxyRefused => "outbound_no_proxy_refused",
            Counter::OutboundNoProxyDirect => "outbound_no_proxy_direct",
        }
    }
}

// The workspace denies `unsafe`; aya's `Pod` is an unsafe trait by nature (a promise about
// the layout), and these two promises are all the `unsafe` this crate holds.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: both are repr(C) plain integers with no padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::CaptureConfig {}
    unsafe impl aya::Pod for super::Endpoint {}
}
