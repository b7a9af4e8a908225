//! What one request leaves behind: Istio's request metrics and, when the config enables it, one
//! structured `access` log line. Recorded once, when the response body ends; a record dropped
//! before that means the client went away, and is recorded with flag DC.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use http::StatusCode;
use tracing::Level;

use super::{
    body::{BodyEnd, BoxError},
    config::ServiceConfig,
    metrics::{Label, RequestLabels, RequestOutcome, ResponseFlag, ResponseFlags, UNKNOWN_LABEL},
    pool::OpenStream,
    reply::Recorded,
};
use crate::{
    io::upstream::{ConnectFailure, MutualTls},
    telemetry::access_line::AccessLine,
    telemetry::metrics::Metrics,
};

pub struct RequestRecord {
    metrics: Arc<Metrics>,
    access_log: bool,
    pub labels: RequestLabels,
    pub flags: ResponseFlags,
    pub started: Instant,
    pub request_bytes: Arc<AtomicU64>,
    pub response_bytes: Arc<AtomicU64>,
    // Access log only: never metric labels (unbounded).
    pub method: String,
    pub authority: String,
    pub path: String,
    pub request_id: String,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub route: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub attempts: u32,
    pub error: Option<String>,
    /// Why the last upstream connect failed (Envoy's `UPSTREAM_TRANSPORT_FAILURE_REASON`).
    pub upstream_transport_failure: Option<&'static str>,
    /// The response's stream on a shared HTTP/2 connection: open (for the connection's idle
    /// timeout) as long as this record, which goes when the response body ends.
    pub upstream_stream: Option<OpenStream>,
    recorded: bool,
}

/// Where a request came from and went, for [`RequestRecord::new`].
pub struct RequestOrigin<'a> {
    pub metrics: Arc<Metrics>,
    pub access_log: bool,
    pub labels: RequestLabels,
    pub request: &'a http::request::Parts,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
}

impl RequestRecord {
    pub fn new(origin: RequestOrigin<'_>) -> Self {
        let request = origin.request;
        let authority = request
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| request.headers.get(http::header::HOST)?.to_str().ok())
            .unwrap_or("")
            .to_owned();
        RequestRecord {
            metrics: origin.metrics,
            access_log: origin.access_log,
            labels: origin.labels,
            flags: ResponseFlags::default(),
            started: Instant::now(),
            request_bytes: Arc::default(),
            response_bytes: Arc::default(),
            method: request.method.to_string(),
            authority,
            path: request.uri.path().to_owned(),
            request_id: String::new(),
            peer: origin.peer,
            orig_dst: origin.orig_dst,
            route: None,
            upstream: None,
            attempts: 0,
            error: None,
            upstream_transport_failure: None,
            upstream_stream: None,
            recorded: false,
        }
    }

    /// The destination service's labels (bounded: they come from the config).
    pub fn set_service(&mut self, service: &ServiceConfig) {
        let labels = &mut self.labels;
        let or_unknown = |value: &Option<String>| value.as_deref().map_or(UNKNOWN_LABEL, label);
        labels.destination_service = label(service.hosts.first().unwrap_or(&service.name));
        labels.destination_service_name = label(&service.name);
        labels.destination_service_namespace = label(&service.namespace);
        labels.destination_workload = or_unknown(&service.workload);
        if service.workload.is_some() {
            labels.destination_workload_namespace = label(&service.namespace);
        }
        labels.destination_app = or_unknown(&service.app);
        labels.destination_version = or_unknown(&service.version);
    }

    /// The upstream connection was mesh mTLS between these identities.
    pub fn set_mutual_tls(&mut self, mtls: &MutualTls) {
        self.labels.source_principal = mtls.local.to_string().into();
        self.labels.destination_principal = mtls.peer.to_string().into();
        if self.labels.destination_workload == "unknown" {
            self.labels.destination_workload = label(&mtls.workload);
        }
        self.labels.connection_security_policy = "mutual_tls";
    }

    /// An upstream connect (TCP, or its TLS handshake) failed: the reason and the error.
    pub fn upstream_connect_failed(&mut self, failure: ConnectFailure) {
        self.upstream_transport_failure = Some(failure.reason.name());
        self.error = Some(failure.error);
    }

    pub fn flag(&mut self, flag: ResponseFlag) {
        self.flags.add(flag);
    }

    fn record(&mut self) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.labels.response_flags = self.flags.render();
        let duration = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let response_bytes = self.response_bytes.load(Ordering::Relaxed);
        self.metrics.http.record(&RequestOutcome {
            labels: &self.labels,
            duration_ms: duration.as_secs_f64() * 1000.0,
            request_bytes,
            response_bytes,
        });
        if !self.access_log {
            return;
        }
        let Some(mut line) = AccessLine::start(Level::INFO, format_args!("request complete"))
        else {
            return;
        };
        let labels = &self.labels;
        line.str("direction", "outbound")
            .addr("src", self.peer)
            .addr("orig_dst", self.orig_dst)
            .str("protocol", labels.request_protocol)
            .str("method", &self.method)
            .str("authority", &self.authority)
            .str("path", &self.path)
            .str("request_id", &self.request_id)
            .opt_str("route", self.route.as_deref())
            .str("dst_service", &labels.destination_service_name)
            .opt_addr("upstream", self.upstream)
            .u64("attempts", self.attempts.into())
            .u64("response_code", labels.response_code.into())
            .str("response_flags", &labels.response_flags)
            .str("src_principal", &labels.source_principal)
            .str("dst_principal", &labels.destination_principal)
            .str("security_policy", labels.connection_security_policy)
            .u64("bytes_received", request_bytes)
            .u64("bytes_sent", response_bytes)
            .u64(
                "duration_ms",
                u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            )
            .opt_str("error", self.error.as_deref())
            .opt_str(
                "upstream_transport_failure_reason",
                self.upstream_transport_failure,
            );
        line.emit();
    }
}

/// `unknown` (the passthrough service's name and namespace) borrowed, anything else copied.
fn label(value: &str) -> Label {
    if value == UNKNOWN_LABEL {
        UNKNOWN_LABEL
    } else {
        Label::Owned(value.to_owned())
    }
}

impl Recorded for RequestRecord {
    fn responded(&mut self, status: StatusCode) {
        self.labels.response_code = status.as_u16();
    }

    fn replied_locally(&mut self, flag: ResponseFlag, reason: &str) {
        self.flag(flag);
        if self.error.is_none() {
            self.error = Some(reason.to_owned());
        }
    }

    fn connection_failed(&mut self, error: &hyper::Error) {
        self.error = Some(format!("upstream connection failed: {error}"));
    }

    fn response_bytes(&self) -> &Arc<AtomicU64> {
        &self.response_bytes
    }

    fn finish(mut self) {
        self.record();
    }
}

impl BodyEnd for RequestRecord {
    fn ended(mut self, error: Option<&BoxError>) {
        if let Some(error) = error {
            self.flag(ResponseFlag::UpstreamConnectionTermination);
            self.error = Some(format!("response body failed: {error}"));
        }
        self.record();
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.recorded {
            self.flag(ResponseFlag::DownstreamConnectionTermination);
            self.record();
        }
    }
}
