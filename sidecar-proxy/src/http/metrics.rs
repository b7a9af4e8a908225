//! Istio's HTTP request metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`) with Istio's full label set, plus retry and
//! ejection counters. Label values come from the config (services), the mTLS identities and the
//! response: no raw path, client address or request id, so series stay bounded.
use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::{mesh::identity::SpiffeId, telemetry::metrics::LocalWorkload};

const UNKNOWN: &str = "unknown";

/// Envoy's response flags, as Istio reports them in `response_flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// Upstream connect failure.
    UpstreamConnectFailure,
    /// No healthy upstream (all endpoints ejected).
    NoHealthyUpstream,
    NoRoute,
    /// Retries exhausted (or the budget ran out) and the last try failed.
    RetryLimitExceeded,
    UpstreamTimeout,
    /// Circuit breaker: connection or pending-request limit reached.
    UpstreamOverflow,
    /// The upstream connection ended before a complete response.
    UpstreamConnectionTermination,
    /// The downstream (the client) went away before the response was complete.
    DownstreamConnectionTermination,
    /// The route's local rate limit refused the request (429).
    RateLimited,
    /// The route's fault injection delayed the request.
    DelayInjected,
    /// The route's fault injection answered instead of the upstream.
    FaultInjected,
}

impl ResponseFlag {
    pub const fn code(self) -> &'static str {
        match self {
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::RetryLimitExceeded => "URX",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::FaultInjected => "FI",
        }
    }
}

/// The flags of one request, in the order they happened; Istio shows `-` for none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseFlags(Vec<ResponseFlag>);

impl ResponseFlags {
    pub fn add(&mut self, flag: ResponseFlag) {
        if !self.0.contains(&flag) {
            self.0.push(flag);
        }
    }

    pub fn render(&self) -> Label {
        match self.0.as_slice() {
            [] => Cow::Borrowed("-"),
            [flag] => Cow::Borrowed(flag.code()),
            flags => Cow::Owned(
                flags
                    .iter()
                    .map(|flag| flag.code())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }
}

/// A label value: most are `unknown` or fixed words, borrowed; the rest are copied from the
/// config or an identity. Built per request, so the borrowed ones cost nothing.
pub type Label = Cow<'static, str>;

pub const UNKNOWN_LABEL: Label = Cow::Borrowed(UNKNOWN);

/// Every label of Istio's request metrics, `unknown` when not known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_service: Label,
    pub destination_service_name: Label,
    pub destination_service_namespace: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: Label,
    pub connection_security_policy: &'static str,
}

impl RequestLabels {
    pub const NAMES: [&'static str; 18] = [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
        "destination_app",
        "destination_version",
        "request_protocol",
        "response_code",
        "response_flags",
        "connection_security_policy",
    ];

    /// Outbound (`reporter="source"`) from `workload` in `namespace`; the rest unknown.
    pub fn outbound(workload: &str, namespace: &str, request_protocol: &'static str) -> Self {
        RequestLabels {
            reporter: "source",
            source_workload: Cow::Owned(workload.to_owned()),
            source_workload_namespace: Cow::Owned(namespace.to_owned()),
            source_principal: UNKNOWN_LABEL,
            source_app: UNKNOWN_LABEL,
            source_version: UNKNOWN_LABEL,
            destination_workload: UNKNOWN_LABEL,
            destination_workload_namespace: UNKNOWN_LABEL,
            destination_principal: UNKNOWN_LABEL,
            destination_service: UNKNOWN_LABEL,
            destination_service_name: UNKNOWN_LABEL,
            destination_service_namespace: UNKNOWN_LABEL,
            destination_app: UNKNOWN_LABEL,
            destination_version: UNKNOWN_LABEL,
            request_protocol,
            response_code: 0,
            response_flags: Cow::Borrowed("-"),
            connection_security_policy: "none",
        }
    }

    fn values(&self) -> [String; 18] {
        [
            self.reporter.to_owned(),
            self.source_workload.to_string(),
            self.source_workload_namespace.to_string(),
            self.source_principal.to_string(),
            self.source_app.to_string(),
            self.source_version.to_string(),
            self.destination_workload.to_string(),
            self.destination_workload_namespace.to_string(),
            self.destination_principal.to_string(),
            self.destination_service.to_string(),
            self.destination_service_name.to_string(),
            self.destination_service_namespace.to_string(),
            self.destination_app.to_string(),
            self.destination_version.to_string(),
            self.request_protocol.to_owned(),
            self.response_code.to_string(),
            self.response_flags.to_string(),
            self.connection_security_policy.to_owned(),
        ]
    }
}

/// The labels of the requests a peer sends on one inbound connection (Istio's destination
/// reporter). All but the protocol, the response code and its flags are known once the
/// connection is admitted, so they are built once per connection, not per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundLabels {
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    connection_security_policy: &'static str,
}

impl InboundLabels {
    /// Requests to `local`; `mutual_tls` names (the peer, us) when the connection is mesh mTLS.
    pub fn new(local: &LocalWorkload, mutual_tls: Option<(&SpiffeId, &SpiffeId)>) -> Self {
        let (source_workload_namespace, source_principal, destination_principal, policy) =
            match mutual_tls {
                Some((peer, us)) => (
                    peer.namespace().to_owned(),
                    peer.to_string(),
                    us.to_string(),
                    "mutual_tls",
                ),
                None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into(), "none"),
            };
        InboundLabels {
            source_workload_namespace,
            source_principal,
            destination_workload: local.name.clone(),
            destination_workload_namespace: local.namespace.clone(),
            destination_principal,
            connection_security_policy: policy,
        }
    }

    pub fn source_principal(&self) -> &str {
        &self.source_principal
    }

    pub fn destination_principal(&self) -> &str {
        &self.destination_principal
    }

    pub fn connection_security_policy(&self) -> &'static str {
        self.connection_security_policy
    }

    /// Every label's value, in [`RequestLabels::NAMES`]' order. The destination service is not
    /// known on this side (a `Host` header is the client's to choose: unbounded).
    pub fn values<'a>(
        &'a self,
        request_protocol: &'a str,
        response_code: &'a str,
        response_flags: &'a str,
    ) -> [&'a str; 18] {
        [
            "destination",
            UNKNOWN,
            &self.source_workload_namespace,
            &self.source_principal,
            UNKNOWN,
            UNKNOWN,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            UNKNOWN,
            UNKNOWN,
            UNKNOWN,
            UNKNOWN,
            UNKNOWN,
            request_protocol,
            response_code,
            response_flags,
            self.connection_security_policy,
        ]
    }
}

/// The four request series of one label set, looked up once and then observed as often as
/// requests end with that outcome.
#[derive(Clone)]
pub struct RequestSeries {
    requests: IntCounter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl RequestSeries {
    pub fn observe(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

/// What one finished request reports.
pub struct RequestOutcome<'a> {
    pub labels: &'a RequestLabels,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

pub struct HttpMetrics {
    /// The series of every label set seen so far: a request's labels are looked up once here,
    /// instead of 18 label values copied and hashed once per metric (that was most of the
    /// recording's cost). Bounded as the registry's series are: label values come from the
    /// config, the identities and the response.
    series: Mutex<HashMap<RequestLabels, RequestSeries, foldhash::fast::RandomState>>,
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    tls_origination_failures: IntCounterVec,
}

/// Istio's default duration buckets, in milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

impl HttpMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let histogram = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                &RequestLabels::NAMES,
            )?;
            registry.register(Box::new(histogram.clone()))?;
            Ok::<_, prometheus::Error>(histogram)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(counter)
        };
        let size_buckets = prometheus::exponential_buckets(1.0, 10.0, 9)?;
        Ok(HttpMetrics {
            series: Mutex::default(),
            requests: counter(
                "istio_requests_total",
                "HTTP requests, by response code and flags.",
                &RequestLabels::NAMES,
            )?,
            duration: histogram(
                "istio_request_duration_milliseconds",
                "HTTP request duration, from the first request byte to the last response byte.",
                DURATION_BUCKETS.to_vec(),
            )?,
            request_bytes: histogram(
                "istio_request_bytes",
                "HTTP request body sizes.",
                size_buckets.clone(),
            )?,
            response_bytes: histogram(
                "istio_response_bytes",
                "HTTP response body sizes.",
                size_buckets,
            )?,
            retries: counter(
                "sidecar_http_retries_total",
                "HTTP request retries, by destination service and why.",
                &["destination_service_name", "reason"],
            )?,
            ejections: counter(
                "sidecar_http_endpoint_ejections_total",
                "Endpoints ejected after consecutive failures, by destination service.",
                &["destination_service_name"],
            )?,
            tls_origination_failures: counter(
                "sidecar_tls_origination_failures_total",
                "Upstream connections of services with `tls` (TLS origination) that failed, by destination service and reason.",
                &["destination_service_name", "reason"],
            )?,
        })
    }

    pub fn record(&self, outcome: &RequestOutcome<'_>) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let series = match series.get(outcome.labels) {
            Some(resolved) => resolved,
            None => series
                .entry(outcome.labels.clone())
                .or_insert_with(|| self.resolve(outcome.labels)),
        };
        series.observe(
            outcome.duration_ms,
            outcome.request_bytes,
            outcome.response_bytes,
        );
    }

    fn resolve(&self, labels: &RequestLabels) -> RequestSeries {
        let values = labels.values();
        let values: [&str; 18] = std::array::from_fn(|index| values[index].as_str());
        self.series(&values)
    }

    /// The series of the label set `values` ([`RequestLabels::NAMES`]' order).
    pub fn series(&self, values: &[&str; 18]) -> RequestSeries {
        RequestSeries {
            requests: self.requests.with_label_values(values),
            duration: self.duration.with_label_values(values),
            request_bytes: self.request_bytes.with_label_values(values),
            response_bytes: self.response_bytes.with_label_values(values),
        }
    }

    pub fn record_retry(&self, service: &str, reason: &str) {
        self.retries.with_label_values(&[service, reason]).inc();
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn retry_count(&self, service: &str, reason: &str) -> u64 {
        self.retries.with_label_values(&[service, reason]).get()
    }

    pub fn record_ejection(&self, service: &str) {
        self.ejections.with_label_values(&[service]).inc();
    }

    pub fn record_tls_origination_failure(&self, service: &str, reason: &str) {
        self.tls_origination_failures
            .with_label_values(&[service, reason])
            .inc();
    }
}
