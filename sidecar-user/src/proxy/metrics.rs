//! Istio-compatible TCP metrics plus the proxy's own failure counter, in a private registry.
use prometheus::{IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// Label values of the Istio TCP metrics. Missing values are `unknown`, never dropped, so
/// Istio dashboards keep matching. Nothing per-connection (client IP/port, original
/// destination) belongs here: it would make series unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_service: String,
    pub destination_principal: String,
    pub request_protocol: &'static str,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

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

    /// Labels for plaintext outbound TCP reported by this (source) workload. The destination
    /// is not known without service discovery, and there is no mTLS yet.
    pub fn outbound(workload: &str, namespace: &str) -> Self {
        TcpLabels {
            reporter: "source",
            source_workload: workload.to_owned(),
            source_workload_namespace: namespace.to_owned(),
            source_principal: UNKNOWN.to_owned(),
            destination_workload: UNKNOWN.to_owned(),
            destination_service: UNKNOWN.to_owned(),
            destination_principal: UNKNOWN.to_owned(),
            request_protocol: "tcp",
            connection_security_policy: "none",
        }
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
            self.connection_security_policy,
        ]
    }
}

/// Why an accepted connection was not proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    OrigDstUnknown,
    Loop,
    ConnectRefused,
    ConnectError,
    ConnectTimeout,
}

impl FailureReason {
    const ALL: [FailureReason; 5] = [
        FailureReason::OrigDstUnknown,
        FailureReason::Loop,
        FailureReason::ConnectRefused,
        FailureReason::ConnectError,
        FailureReason::ConnectTimeout,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FailureReason::OrigDstUnknown => "orig_dst_unknown",
            FailureReason::Loop => "loop",
            FailureReason::ConnectRefused => "connect_refused",
            FailureReason::ConnectError => "connect_error",
            FailureReason::ConnectTimeout => "connect_timeout",
        }
    }
}

/// Counter handles for one label set, resolved once so the data path never hashes labels.
#[derive(Clone)]
pub struct TcpCounters {
    pub opened: IntCounter,
    pub closed: IntCounter,
    /// Bytes sent to the app in responses (upstream -> app).
    pub sent_bytes: IntCounter,
    /// Bytes received from the app in requests (app -> upstream).
    pub received_bytes: IntCounter,
}

pub struct Metrics {
    registry: Registry,
    outbound: TcpCounters,
    failures: IntCounterVec,
}

impl Metrics {
    pub fn new(outbound_labels: &TcpLabels) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let tcp_counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let counter = IntCounterVec::new(Opts::new(name, help), &TcpLabels::NAMES)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let opened = tcp_counter(
            "istio_tcp_connections_opened_total",
            "TCP connections opened to an upstream.",
        )?;
        let closed = tcp_counter(
            "istio_tcp_connections_closed_total",
            "TCP connections closed after being proxied.",
        )?;
        let sent = tcp_counter(
            "istio_tcp_sent_bytes_total",
            "Bytes sent during response (upstream to app).",
        )?;
        let received = tcp_counter(
            "istio_tcp_received_bytes_total",
            "Bytes received during request (app to upstream).",
        )?;
        let values = outbound_labels.values();
        let outbound = TcpCounters {
            opened: opened.get_metric_with_label_values(&values)?,
            closed: closed.get_metric_with_label_values(&values)?,
            sent_bytes: sent.get_metric_with_label_values(&values)?,
            received_bytes: received.get_metric_with_label_values(&values)?,
        };

        let failures = IntCounterVec::new(
            Opts::new(
                "sidecar_outbound_failures_total",
                "Accepted outbound connections that could not be proxied, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        // Every reason is exported from the start, so alerts can use rate() without gaps.
        for reason in FailureReason::ALL {
            failures.get_metric_with_label_values(&[reason.name()])?;
        }

        Ok(Metrics {
            registry,
            outbound,
            failures,
        })
    }

    pub fn outbound(&self) -> &TcpCounters {
        &self.outbound
    }

    pub fn record_failure(&self, reason: FailureReason) {
        self.failures.with_label_values(&[reason.name()]).inc();
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> prometheus::Result<String> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }

    #[cfg(test)]
    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failures.with_label_values(&[reason.name()]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_series_are_exported_with_unknown_defaults() -> prometheus::Result<()> {
        let metrics = Metrics::new(&TcpLabels::outbound("web", "shop"))?;
        metrics.outbound().opened.inc();
        metrics.record_failure(FailureReason::Loop);
        let text = metrics.render()?;
        let labels = concat!(
            r#"{connection_security_policy="none",destination_principal="unknown","#,
            r#"destination_service="unknown",destination_workload="unknown","#,
            r#"reporter="source",request_protocol="tcp",source_principal="unknown","#,
            r#"source_workload="web",source_workload_namespace="shop"}"#
        );
        assert!(text.contains(&format!("istio_tcp_connections_opened_total{labels} 1")));
        assert!(text.contains(&format!("istio_tcp_connections_closed_total{labels} 0")));
        assert!(text.contains(&format!("istio_tcp_sent_bytes_total{labels} 0")));
        assert!(text.contains(&format!("istio_tcp_received_bytes_total{labels} 0")));
        assert!(text.contains(r#"sidecar_outbound_failures_total{reason="loop"} 1"#));
        assert!(text.contains(r#"sidecar_outbound_failures_total{reason="connect_timeout"} 0"#));
        Ok(())
    }
}
