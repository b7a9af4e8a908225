//! Istio-compatible TCP metrics, the proxy's failure and reload counters, the certificate
//! expiry gauge, each listener's connections, caps and timeouts, refused admin requests, and the
//! standard `process_*` metrics (open and maximum file descriptors, CPU, memory), in a private
//! registry.
use std::sync::OnceLock;

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    process_collector::ProcessCollector,
};
use tracing::warn;

use crate::{http::metrics::HttpMetrics, mesh::identity::SpiffeId};

const UNKNOWN: &str = "unknown";

/// Which side of a connection this proxy is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The app's own connections out (Istio's `reporter="source"`).
    Outbound,
    /// Connections to the app (Istio's `reporter="destination"`).
    Inbound,
}

impl Direction {
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    const fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// Istio's `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

impl SecurityPolicy {
    pub const fn name(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::None => "none",
        }
    }
}

/// This workload, as metric labels name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWorkload {
    pub name: String,
    pub namespace: String,
}

/// Label values of the Istio TCP metrics. Missing values are `unknown`, never dropped, so
/// Istio dashboards keep matching. Nothing per connection (client IP/port, original
/// destination) belongs here: it would make series unbounded. Principals are bounded by the
/// identities the trusted CAs issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_service: String,
    destination_principal: String,
    request_protocol: &'static str,
    connection_security_policy: SecurityPolicy,
}

impl TcpLabels {
    const NAMES: [&'static str; 9] = [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "destination_workload",
        "destination_service",
        "destination_principal",
        "request_protocol",
        "connection_security_policy",
    ];

    /// Plaintext TCP, seen from `local` on the `direction` side; refine with the `with_*`
    /// methods as more becomes known.
    pub fn new(direction: Direction, local: &LocalWorkload) -> Self {
        let (source, destination) = match direction {
            Direction::Outbound => ((local.name.as_str(), local.namespace.as_str()), UNKNOWN),
            Direction::Inbound => ((UNKNOWN, UNKNOWN), local.name.as_str()),
        };
        TcpLabels {
            reporter: direction.reporter(),
            source_workload: source.0.to_owned(),
            source_workload_namespace: source.1.to_owned(),
            source_principal: UNKNOWN.to_owned(),
            destination_workload: destination.to_owned(),
            destination_service: UNKNOWN.to_owned(),
            destination_principal: UNKNOWN.to_owned(),
            request_protocol: "tcp",
            connection_security_policy: SecurityPolicy::None,
        }
    }

    /// The connection is mesh mTLS between these two identities.
    pub fn with_mutual_tls(mut self, source: &SpiffeId, destination: &SpiffeId) -> Self {
        self.source_principal = source.to_string();
        self.destination_principal = destination.to_string();
        if self.source_workload_namespace == UNKNOWN {
            self.source_workload_namespace = source.namespace().to_owned();
        }
        self.connection_security_policy = SecurityPolicy::MutualTls;
        self
    }

    /// The destination's name from the mesh config.
    pub fn with_destination_workload(mut self, name: &str) -> Self {
        name.clone_into(&mut self.destination_workload);
        self
    }

    fn values(&self) -> [&str; 9] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_service,
            &self.destination_principal,
            self.request_protocol,
            self.connection_security_policy.name(),
        ]
    }
}

/// Why an accepted connection was not proxied (or was cut short by the peer's refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    OrigDstUnknown,
    Loop,
    ConnectRefused,
    ConnectError,
    ConnectTimeout,
    PeerCertExpired,
    PeerCertNotYetValid,
    /// The peer's chain does not lead to a root of its trust domain's bundle (a wrong CA), or
    /// its trust domain has no bundle.
    PeerCertUnknownCa,
    /// The peer's SPIFFE ID is missing, malformed, or not the one the mesh config expects.
    PeerIdentityMismatch,
    /// The peer sent a TLS alert: it refused our certificate (or our ALPN).
    TlsRejectedByPeer,
    TlsHandshakeFailed,
    TlsHandshakeTimeout,
    /// Plaintext (or non-mesh TLS) to a STRICT port.
    PlaintextRefused,
    /// No allow rule of the port matches the peer.
    Unauthorized,
    /// Reading the first bytes failed (the client reset).
    SniffFailed,
    /// The client (outbound: the app; inbound: the peer) sent something that is not valid HTTP
    /// on a connection detected (or declared) as HTTP; hyper answered 400 and closed it.
    HttpProtocolError,
}

impl FailureReason {
    const OUTBOUND: [FailureReason; 12] = [
        FailureReason::OrigDstUnknown,
        FailureReason::Loop,
        FailureReason::ConnectRefused,
        FailureReason::ConnectError,
        FailureReason::ConnectTimeout,
        FailureReason::PeerCertExpired,
        FailureReason::PeerCertNotYetValid,
        FailureReason::PeerCertUnknownCa,
        FailureReason::PeerIdentityMismatch,
        FailureReason::TlsRejectedByPeer,
        FailureReason::TlsHandshakeFailed,
        FailureReason::TlsHandshakeTimeout,
    ];
    const OUTBOUND_ONLY: [FailureReason; 2] =
        [FailureReason::SniffFailed, FailureReason::HttpProtocolError];
    const INBOUND_ONLY: [FailureReason; 4] = [
        FailureReason::PlaintextRefused,
        FailureReason::Unauthorized,
        FailureReason::SniffFailed,
        FailureReason::HttpProtocolError,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FailureReason::OrigDstUnknown => "orig_dst_unknown",
            FailureReason::Loop => "loop",
            FailureReason::ConnectRefused => "connect_refused",
            FailureReason::ConnectError => "connect_error",
            FailureReason::ConnectTimeout => "connect_timeout",
            FailureReason::PeerCertExpired => "peer_cert_expired",
            FailureReason::PeerCertNotYetValid => "peer_cert_not_yet_valid",
            FailureReason::PeerCertUnknownCa => "peer_cert_unknown_ca",
            FailureReason::PeerIdentityMismatch => "peer_identity_mismatch",
            FailureReason::TlsRejectedByPeer => "tls_rejected_by_peer",
            FailureReason::TlsHandshakeFailed => "tls_handshake_failed",
            FailureReason::TlsHandshakeTimeout => "tls_handshake_timeout",
            FailureReason::PlaintextRefused => "plaintext_refused",
            FailureReason::Unauthorized => "unauthorized",
            FailureReason::SniffFailed => "sniff_failed",
            FailureReason::HttpProtocolError => "http_protocol_error",
        }
    }

    /// The access log's message for a connection refused for this reason.
    pub const fn headline(self) -> &'static str {
        match self {
            FailureReason::OrigDstUnknown => "original destination unknown; connection reset",
            FailureReason::Loop => "refusing to proxy to itself (loop); connection reset",
            FailureReason::ConnectRefused | FailureReason::ConnectError => {
                "upstream connect failed; connection reset"
            }
            FailureReason::ConnectTimeout => "upstream connect timed out; connection reset",
            FailureReason::PeerCertExpired => "peer certificate expired; connection refused",
            FailureReason::PeerCertNotYetValid => {
                "peer certificate not yet valid; connection refused"
            }
            FailureReason::PeerCertUnknownCa => {
                "peer certificate not issued by a trusted CA; connection refused"
            }
            FailureReason::PeerIdentityMismatch => {
                "peer identity is not the expected one; connection refused"
            }
            FailureReason::TlsRejectedByPeer => "the peer refused the mTLS handshake",
            FailureReason::TlsHandshakeFailed => "mTLS handshake failed; connection refused",
            FailureReason::TlsHandshakeTimeout => "mTLS handshake timed out; connection refused",
            FailureReason::PlaintextRefused => {
                "plaintext refused on a STRICT port; connection reset"
            }
            FailureReason::Unauthorized => "peer not authorized for this port; connection reset",
            FailureReason::SniffFailed => "reading the first bytes failed; connection reset",
            FailureReason::HttpProtocolError => "invalid HTTP from the client; connection closed",
        }
    }
}

/// Counter handles for one label set.
#[derive(Clone)]
pub struct TcpCounters {
    pub opened: IntCounter,
    pub closed: IntCounter,
    /// Bytes sent to the downstream peer (responses).
    pub sent_bytes: IntCounter,
    /// Bytes received from the downstream peer (requests).
    pub received_bytes: IntCounter,
}

/// Which deadline closed a downstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownstreamTimeout {
    /// A request's head was not complete in time (Envoy's `request_headers_timeout`).
    RequestHeaders,
    /// No byte either way for the idle timeout (Envoy's `idle_timeout`).
    Idle,
}

impl DownstreamTimeout {
    const ALL: [DownstreamTimeout; 2] =
        [DownstreamTimeout::RequestHeaders, DownstreamTimeout::Idle];

    pub const fn name(self) -> &'static str {
        match self {
            DownstreamTimeout::RequestHeaders => "request_headers",
            DownstreamTimeout::Idle => "idle",
        }
    }
}

/// The series of one listener (a data-path side, or an admin address), resolved once.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub name: String,
    /// Connections open now.
    pub connections: IntGauge,
    /// Connections accepted so far, refused ones included.
    pub accepted: IntCounter,
    /// Connections closed or refused because the listener was full.
    pub overflow: IntCounter,
    request_headers_timeouts: IntCounter,
    idle_timeouts: IntCounter,
}

impl ListenerMetrics {
    pub fn record_timeout(&self, timeout: DownstreamTimeout) {
        match timeout {
            DownstreamTimeout::RequestHeaders => self.request_headers_timeouts.inc(),
            DownstreamTimeout::Idle => self.idle_timeouts.inc(),
        }
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn timeout_count(&self, timeout: DownstreamTimeout) -> u64 {
        match timeout {
            DownstreamTimeout::RequestHeaders => self.request_headers_timeouts.get(),
            DownstreamTimeout::Idle => self.idle_timeouts.get(),
        }
    }
}

/// What a reload was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadKind {
    MeshConfig,
    Certificates,
}

pub struct Metrics {
    registry: Registry,
    /// Istio's HTTP request metrics, in the same registry.
    pub http: HttpMetrics,
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    outbound_failures: IntCounterVec,
    inbound_failures: IntCounterVec,
    mesh_config_reloads: IntCounterVec,
    certificate_reloads: IntCounterVec,
    certificate_expiration: IntGauge,
    /// The gauge is exported only once a certificate is loaded: a 0 would read as expired.
    certificate_expiration_registered: OnceLock<()>,
    listener_connections: IntGaugeVec,
    listener_accepted: IntCounterVec,
    listener_connection_limit: IntGaugeVec,
    listener_overflow: IntCounterVec,
    downstream_timeouts: IntCounterVec,
    admin_refused: IntCounterVec,
    /// Exported once the capture check has something to say (`capture/health.rs`).
    capture_active: IntGaugeVec,
    inbound_tls_handshakes: IntCounterVec,
}

impl Metrics {
    /// The plaintext series of `local` in both directions are exported from the start.
    pub fn new(local: &LocalWorkload) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(counter)
        };
        let tcp = |name: &str, help: &str| counter_vec(name, help, &TcpLabels::NAMES);
        let opened = tcp(
            "istio_tcp_connections_opened_total",
            "TCP connections opened to an upstream.",
        )?;
        let closed = tcp(
            "istio_tcp_connections_closed_total",
            "TCP connections closed after being proxied.",
        )?;
        let sent = tcp(
            "istio_tcp_sent_bytes_total",
            "Bytes sent during response (upstream to downstream).",
        )?;
        let received = tcp(
            "istio_tcp_received_bytes_total",
            "Bytes received during request (downstream to upstream).",
        )?;
        let outbound_failures = counter_vec(
            "sidecar_outbound_failures_total",
            "Accepted outbound connections that could not be proxied, by reason.",
            &["reason"],
        )?;
        let inbound_failures = counter_vec(
            "sidecar_inbound_failures_total",
            "Accepted inbound connections refused or not proxied, by reason.",
            &["reason"],
        )?;
        // Every reason is exported from the start, so alerts can use rate() without gaps.
        for reason in FailureReason::OUTBOUND {
            outbound_failures.with_label_values(&[reason.name()]);
            inbound_failures.with_label_values(&[reason.name()]);
        }
        for reason in FailureReason::INBOUND_ONLY {
            inbound_failures.with_label_values(&[reason.name()]);
        }
        for reason in FailureReason::OUTBOUND_ONLY {
            outbound_failures.with_label_values(&[reason.name()]);
        }
        let mesh_config_reloads = counter_vec(
            "sidecar_mesh_config_reloads_total",
            "Reloads of the mesh config file; on failure the previous config stays in force.",
            &["result"],
        )?;
        let certificate_reloads = counter_vec(
            "sidecar_certificate_reloads_total",
            "Reloads of the workload certificate, key and trust bundle; on failure the previous ones stay in force.",
            &["result"],
        )?;
        for result in ["success", "failure"] {
            mesh_config_reloads.with_label_values(&[result]);
            certificate_reloads.with_label_values(&[result]);
        }
        let certificate_expiration = IntGauge::new(
            "sidecar_certificate_expiration_seconds",
            "notAfter of the workload certificate in use, in Unix seconds.",
        )?;
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let gauge = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(gauge.clone()))?;
            Ok::<_, prometheus::Error>(gauge)
        };
        let listener_connections = gauge_vec(
            "sidecar_listener_connections",
            "Connections a listener holds open now.",
            &["listener"],
        )?;
        let listener_accepted = counter_vec(
            "sidecar_listener_connections_accepted_total",
            "Connections a listener accepted, refused ones included (Envoy's downstream_cx_total).",
            &["listener"],
        )?;
        let listener_connection_limit = gauge_vec(
            "sidecar_listener_connection_limit",
            "The most connections a listener holds open at once.",
            &["listener"],
        )?;
        let listener_overflow = counter_vec(
            "sidecar_listener_overflow_total",
            "Connections refused (data path) or closed to make room (admin) because the listener was full (Envoy's downstream_cx_overflow).",
            &["listener"],
        )?;
        let downstream_timeouts = counter_vec(
            "sidecar_downstream_timeouts_total",
            "Downstream connections closed by a deadline: request_headers (a request's head not complete in time) or idle (no byte either way).",
            &["listener", "timeout"],
        )?;
        let admin_refused = counter_vec(
            "sidecar_admin_requests_refused_total",
            "Admin requests that change the proxy refused because the caller is neither root nor the proxy's user.",
            &["path"],
        )?;
        let inbound_tls_handshakes = counter_vec(
            "sidecar_inbound_tls_handshakes_total",
            "Completed mesh mTLS handshakes on the inbound side, by kind: full, or resumed (TLS 1.3 session ticket).",
            &["kind"],
        )?;
        for kind in ["full", "resumed"] {
            inbound_tls_handshakes.with_label_values(&[kind]);
        }
        let capture_active = gauge_vec(
            "sidecar_capture_active",
            "1 while this pod's eBPF capture is attached and configured for the direction (outbound, inbound), 0 when it vanished.",
            &["direction"],
        )?;
        // File descriptors (process_open_fds, process_max_fds), CPU and memory, as every
        // Prometheus client library names them.
        registry.register(Box::new(ProcessCollector::for_self()))?;
        let http = HttpMetrics::register(&registry)?;
        let metrics = Metrics {
            http,
            registry,
            opened,
            closed,
            sent,
            received,
            outbound_failures,
            inbound_failures,
            mesh_config_reloads,
            certificate_reloads,
            certificate_expiration,
            certificate_expiration_registered: OnceLock::new(),
            listener_connections,
            listener_accepted,
            listener_connection_limit,
            listener_overflow,
            downstream_timeouts,
            admin_refused,
            capture_active,
            inbound_tls_handshakes,
        };
        for direction in [Direction::Outbound, Direction::Inbound] {
            metrics.tcp(&TcpLabels::new(direction, local));
        }
        Ok(metrics)
    }

    /// The counters of one label set (resolved once per connection, not per byte).
    pub fn tcp(&self, labels: &TcpLabels) -> TcpCounters {
        let values = labels.values();
        TcpCounters {
            opened: self.opened.with_label_values(&values),
            closed: self.closed.with_label_values(&values),
            sent_bytes: self.sent.with_label_values(&values),
            received_bytes: self.received.with_label_values(&values),
        }
    }

    /// The series of listener `name` with its cap, exported from now on.
    pub fn listener(&self, name: &str, limit: usize) -> ListenerMetrics {
        self.listener_connection_limit
            .with_label_values(&[name])
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        let timeouts = |timeout: DownstreamTimeout| {
            self.downstream_timeouts
                .with_label_values(&[name, timeout.name()])
        };
        for timeout in DownstreamTimeout::ALL {
            timeouts(timeout);
        }
        ListenerMetrics {
            name: name.to_owned(),
            connections: self.listener_connections.with_label_values(&[name]),
            accepted: self.listener_accepted.with_label_values(&[name]),
            overflow: self.listener_overflow.with_label_values(&[name]),
            request_headers_timeouts: timeouts(DownstreamTimeout::RequestHeaders),
            idle_timeouts: timeouts(DownstreamTimeout::Idle),
        }
    }

    /// A downstream connection of listener `listener` closed by `timeout`.
    pub fn record_downstream_timeout(&self, listener: &str, timeout: DownstreamTimeout) {
        self.downstream_timeouts
            .with_label_values(&[listener, timeout.name()])
            .inc();
    }

    /// The count of admin requests to `path` refused to their caller (exported once asked for).
    pub fn record_inbound_handshake(&self, kind: &str) {
        self.inbound_tls_handshakes.with_label_values(&[kind]).inc();
    }

    pub fn set_capture_active(&self, outbound: bool, inbound: bool) {
        for (direction, active) in [("outbound", outbound), ("inbound", inbound)] {
            self.capture_active
                .with_label_values(&[direction])
                .set(i64::from(active));
        }
    }

    pub fn admin_refusals(&self, path: &str) -> IntCounter {
        self.admin_refused.with_label_values(&[path])
    }

    pub fn record_failure(&self, direction: Direction, reason: FailureReason) {
        self.failures(direction)
            .with_label_values(&[reason.name()])
            .inc();
    }

    fn failures(&self, direction: Direction) -> &IntCounterVec {
        match direction {
            Direction::Outbound => &self.outbound_failures,
            Direction::Inbound => &self.inbound_failures,
        }
    }

    pub fn record_reload(&self, kind: ReloadKind, success: bool) {
        let counter = match kind {
            ReloadKind::MeshConfig => &self.mesh_config_reloads,
            ReloadKind::Certificates => &self.certificate_reloads,
        };
        let result = if success { "success" } else { "failure" };
        counter.with_label_values(&[result]).inc();
    }

    pub fn set_certificate_expiration(&self, not_after_unix_seconds: i64) {
        self.certificate_expiration_registered.get_or_init(|| {
            if let Err(error) = self
                .registry
                .register(Box::new(self.certificate_expiration.clone()))
            {
                warn!(%error, "cannot export the certificate expiry gauge");
            }
        });
        self.certificate_expiration.set(not_after_unix_seconds);
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> prometheus::Result<String> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn failure_count(&self, direction: Direction, reason: FailureReason) -> u64 {
        self.failures(direction)
            .with_label_values(&[reason.name()])
            .get()
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn reload_count(&self, kind: ReloadKind, success: bool) -> u64 {
        let counter = match kind {
            ReloadKind::MeshConfig => &self.mesh_config_reloads,
            ReloadKind::Certificates => &self.certificate_reloads,
        };
        counter
            .with_label_values(&[if success { "success" } else { "failure" }])
            .get()
    }
}

#[cfg(test)]
mod tests {
    use sidecar_tests::prometheus as prometheus_text;

    use super::*;
    use crate::testing::metric;

    fn local() -> LocalWorkload {
        LocalWorkload {
            name: "web".into(),
            namespace: "shop".into(),
        }
    }

    #[test]
    fn all_series_are_exported_with_unknown_defaults() -> prometheus::Result<()> {
        let metrics = Metrics::new(&local())?;
        metrics
            .tcp(&TcpLabels::new(Direction::Outbound, &local()))
            .opened
            .inc();
        metrics.record_failure(Direction::Outbound, FailureReason::Loop);
        let outbound = [
            ("connection_security_policy", "none"),
            ("destination_principal", "unknown"),
            ("destination_service", "unknown"),
            ("destination_workload", "unknown"),
            ("reporter", "source"),
            ("request_protocol", "tcp"),
            ("source_principal", "unknown"),
            ("source_workload", "web"),
            ("source_workload_namespace", "shop"),
        ];
        for (name, expected) in [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_connections_closed_total", 0),
            ("istio_tcp_sent_bytes_total", 0),
            ("istio_tcp_received_bytes_total", 0),
        ] {
            assert_eq!(metric(&metrics, name, &outbound), expected, "{name}");
        }
        let inbound = [("reporter", "destination")];
        assert_eq!(
            metric(&metrics, "istio_tcp_connections_opened_total", &inbound),
            0
        );
        let failures = |direction: &str, reason: &str| {
            let name = format!("sidecar_{direction}_failures_total");
            metric(&metrics, &name, &[("reason", reason)])
        };
        assert_eq!(failures("outbound", "loop"), 1);
        assert_eq!(failures("outbound", "connect_timeout"), 0);
        assert_eq!(failures("inbound", "plaintext_refused"), 0);
        let unauthorized = [("reason", "unauthorized")];
        let text = metrics.render()?;
        assert_eq!(
            prometheus_text::matching(&text, "sidecar_outbound_failures_total", &unauthorized),
            Ok(vec![]),
            "an inbound-only reason is not exported outbound"
        );
        assert_eq!(
            metric(
                &metrics,
                "sidecar_certificate_reloads_total",
                &[("result", "failure")]
            ),
            0
        );
        assert_eq!(
            prometheus_text::sum_if_exported(&text, "sidecar_certificate_expiration_seconds", &[]),
            Ok(None),
            "no certificate yet"
        );
        metrics.set_certificate_expiration(1_900_000_000);
        metrics.set_certificate_expiration(1_900_000_001);
        assert_eq!(
            metric(&metrics, "sidecar_certificate_expiration_seconds", &[]),
            1_900_000_001
        );
        Ok(())
    }

    #[test]
    fn inbound_mutual_tls_labels_name_both_principals() -> prometheus::Result<()> {
        let client: SpiffeId = "spiffe://td/ns/front/sa/client".parse().expect("id");
        let server: SpiffeId = "spiffe://td/ns/shop/sa/web".parse().expect("id");
        let labels = TcpLabels::new(Direction::Inbound, &local()).with_mutual_tls(&client, &server);
        let metrics = Metrics::new(&local())?;
        metrics.tcp(&labels).opened.inc();
        let series = [
            ("connection_security_policy", "mutual_tls"),
            ("destination_principal", "spiffe://td/ns/shop/sa/web"),
            ("destination_service", "unknown"),
            ("destination_workload", "web"),
            ("reporter", "destination"),
            ("request_protocol", "tcp"),
            ("source_principal", "spiffe://td/ns/front/sa/client"),
            ("source_workload", "unknown"),
            ("source_workload_namespace", "front"),
        ];
        assert_eq!(
            metric(&metrics, "istio_tcp_connections_opened_total", &series),
            1
        );
        Ok(())
    }
}
