//! Inbound HTTP: the requests a peer sends on a connection the inbound side has admitted (the
//! port's mode and allow rules are applied once, to the connection, before any request is
//! read). A request beyond the port's `rateLimit` gets 429 (flag `RL`); the others go to the
//! app at the connection's original destination (or the port's `forwardTo`), from the
//! passthrough address, on a pooled keep-alive connection (`app_pool`); an upgrade gets a
//! connection of its own. An HTTP/1.1 request a peer sidecar carried over HTTP/2 reaches the
//! app as HTTP/1.1 (`h1_over_h2`). Each leaves Istio's request metrics as the destination
//! reports them (`reporter="destination"`) and an access line.
//!
//! No routes, timeouts or retries here: they apply where a request leaves, on the calling side
//! (as Istio's VirtualServices do). Only a request that meets a pooled connection the app closed
//! while it was idle is sent again, once, on a new connection: if it never left, or if it is
//! idempotent and has no body.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header::HOST, request::Parts};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Level;

use super::{
    AppProtocol,
    app_pool::{self, AppPool, AppSender},
    body::{self, BodyEnd, BoxError, Counted, ProxyBody, Untracked},
    h1_over_h2,
    headers::{ensure_request_id, is_upgrade, remove_hop_by_hop},
    metrics::{HttpMetrics, InboundLabels, RequestSeries, ResponseFlag, ResponseFlags},
    reply::{self, Recorded, local_reply, respond},
    request_protocol,
    retry::is_idempotent,
    route_policy::RateLimiter,
    server::{self, Downstream},
    upgrade,
};
use crate::{
    inputs::ProxyInputs, io::upstream::ConnectFailure, telemetry::access_line::AccessLine,
    telemetry::access_log::AccessLog,
};

/// What the requests of one inbound connection share.
pub struct InboundConnection {
    pub inputs: Arc<ProxyInputs>,
    pub app_pool: Arc<AppPool>,
    pub peer: SocketAddr,
    /// Where the peer's connection was going.
    pub orig_dst: SocketAddr,
    /// The app: `orig_dst`, or the port's `forwardTo` loopback address.
    pub app: SocketAddr,
    /// The port's token bucket (`rateLimit`), from the snapshot the connection began with.
    pub rate_limiter: Option<Arc<RateLimiter>>,
    /// One `access` line per request (`http.accessLog` of the config the connection began with).
    pub access_log: bool,
    /// The labels of its requests' metrics but their protocol and outcome.
    pub labels: InboundLabels,
    /// A peer sidecar's HTTP/2 connection, over mesh mTLS, agreed to carry HTTP/1.1 requests
    /// (`h1_over_h2`): their marks are honoured.
    pub carrying_http1: bool,
}

/// A connection being served.
struct Served {
    connection: InboundConnection,
    protocol: AppProtocol,
    series: SeriesCache,
}

/// Serves the peer's requests on `downstream` until the connection ends (`server::serve`: the
/// deadlines and the drain); `log` is the connection's access line, written only if the peer's
/// bytes are not HTTP after all.
pub async fn serve<D>(
    connection: InboundConnection,
    downstream: D,
    protocol: AppProtocol,
    log: AccessLog,
) where
    D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let side = Downstream {
        inputs: connection.inputs.clone(),
        log,
    };
    let served = Arc::new(Served {
        connection,
        protocol,
        series: SeriesCache::default(),
    });
    server::serve(downstream, protocol, side, move |request| {
        handle(served.clone(), request)
    })
    .await;
}

async fn handle(served: Arc<Served>, request: Request<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    let carrying = served.connection.carrying_http1;
    let app_protocol = h1_over_h2::arrived_as(&mut parts, served.protocol, carrying);
    let protocol = request_protocol(app_protocol, &parts.headers);
    let upgrade = is_upgrade(&parts.headers);
    remove_hop_by_hop(&mut parts.headers, upgrade);
    let request_id = ensure_request_id(&mut parts.headers);
    let record = InboundRecord::new(served, protocol, &parts, request_id);
    let limiter = record.served.connection.rate_limiter.as_ref();
    if limiter.is_some_and(|limiter| !limiter.admit()) {
        return local_reply(
            record,
            StatusCode::TOO_MANY_REQUESTS,
            ResponseFlag::RateLimited,
            "local rate limit exceeded",
        );
    }
    let request = Request::from_parts(parts, body);
    // The upgrade is boxed: rare, and its future would size every request's.
    if upgrade {
        return Box::pin(forward_upgrade(request, record)).await;
    }
    forward(request, app_protocol, record).await
}

/// To the app in `protocol` on a pooled connection; once more on a new one when the pooled one
/// turns out to have been closed by the app.
async fn forward(
    request: Request<Incoming>,
    protocol: AppProtocol,
    mut record: InboundRecord,
) -> Response<ProxyBody> {
    let served = record.served.clone();
    let connection = &served.connection;
    let (parts, incoming) = request.into_parts();
    // Such a request can be sent again as it is, even after it was written.
    let resendable = is_idempotent(&parts.method) && incoming.is_end_stream();
    let counted = Counted::new(
        incoming.map_err(Into::into).boxed_unsync(),
        record.request_bytes.clone(),
        None::<Untracked>,
    );
    let mut request = Request::from_parts(parts, counted.boxed_unsync());
    let mut stale_retry_done = false;
    loop {
        record.attempts += 1;
        let acquired = if stale_retry_done {
            let pool = &connection.app_pool;
            Box::pin(pool.connect(connection.app, protocol, &connection.inputs.timeouts)).await
        } else {
            let pool = &connection.app_pool;
            pool.acquire(connection.app, protocol, &connection.inputs.timeouts)
                .await
        };
        let mut app = match acquired {
            Ok(app) => app,
            Err(failure) => return connect_failed(record, failure),
        };
        // Kept only when it may be needed: a reused connection, a request sent again whole.
        let (parts, body) = request.into_parts();
        let kept = (app.reused && resendable && !stale_retry_done).then(|| parts.clone());
        let sent = match &mut app.sender {
            AppSender::Http1(sender) => {
                sender
                    .try_send_request(Request::from_parts(parts, body))
                    .await
            }
            AppSender::Http2(sender) => {
                sender
                    .try_send_request(Request::from_parts(parts, body))
                    .await
            }
        };
        match sent {
            Ok(response) => {
                connection.app_pool.release(app);
                return respond(record, response);
            }
            Err(mut failed) => {
                let unsent = failed.take_message();
                let error = failed.into_error();
                let again = if app.reused && !stale_retry_done {
                    unsent.or_else(|| kept.map(|parts| Request::from_parts(parts, body::empty())))
                } else {
                    None
                };
                if let Some(again) = again {
                    stale_retry_done = true;
                    request = again;
                    continue;
                }
                return reply::connection_failed(record, &error);
            }
        }
    }
}

/// An upgrade (WebSocket...) on a connection of its own; after `101` both sides are joined.
async fn forward_upgrade(
    request: Request<Incoming>,
    mut record: InboundRecord,
) -> Response<ProxyBody> {
    let served = record.served.clone();
    let connection = &served.connection;
    record.attempts = 1;
    let mut sender =
        match app_pool::connect_for_upgrade(connection.app, &connection.inputs.timeouts).await {
            Ok(sender) => sender,
            Err(failure) => return connect_failed(record, failure),
        };
    let send = |request: Request<ProxyBody>| sender.send_request(request);
    let (drain, peer) = (&connection.inputs.drain, connection.peer);
    upgrade::send_and_join(request, send, record, drain, peer, || ()).await
}

fn connect_failed(mut record: InboundRecord, failure: ConnectFailure) -> Response<ProxyBody> {
    record.error = Some(failure.error);
    local_reply(
        record,
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::UpstreamConnectFailure,
        "upstream connect failure",
    )
}

/// The series a connection's requests ended in, so that a kept-alive connection looks its label
/// set up once per outcome rather than once per request.
#[derive(Default)]
struct SeriesCache(Mutex<Vec<(SeriesKey, RequestSeries)>>);

/// Enough for the outcomes one connection sees; others are looked up each time.
const MAX_CACHED_SERIES: usize = 8;

#[derive(PartialEq, Eq)]
struct SeriesKey {
    request_protocol: &'static str,
    /// `None`: no response (the peer left first).
    status: Option<StatusCode>,
    flags: ResponseFlags,
}

impl SeriesCache {
    fn observe(
        &self,
        metrics: &HttpMetrics,
        labels: &InboundLabels,
        key: SeriesKey,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let observe = |series: &RequestSeries| {
            series.observe(duration_ms, request_bytes, response_bytes);
        };
        let mut cached = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, series)) = cached.iter().find(|(cached, _)| *cached == key) {
            return observe(series);
        }
        let code = key.status.as_ref().map_or("0", StatusCode::as_str);
        let flags = key.flags.render();
        let series = metrics.series(&labels.values(key.request_protocol, code, &flags));
        observe(&series);
        if cached.len() < MAX_CACHED_SERIES {
            cached.push((key, series));
        }
    }
}

/// The request line, for the access line only (never metric labels: unbounded). Cloned from
/// the request without copying: these types share the bytes hyper read.
struct RequestLine {
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    request_id: HeaderValue,
}

impl RequestLine {
    /// The authority of an HTTP/2 request is in its URI, an HTTP/1 one's in `Host`.
    fn authority(&self) -> &str {
        self.uri
            .authority()
            .map(|authority| authority.as_str())
            .or_else(|| self.host.as_ref()?.to_str().ok())
            .unwrap_or("")
    }
}

/// What one request leaves behind: its metrics and, when enabled, an access line. Recorded once,
/// when the response body ends; dropped before that, the peer went away: flag DC.
struct InboundRecord {
    served: Arc<Served>,
    request_protocol: &'static str,
    status: Option<StatusCode>,
    flags: ResponseFlags,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    response_bytes: Arc<AtomicU64>,
    /// `None` without access lines.
    line: Option<RequestLine>,
    attempts: u32,
    error: Option<String>,
    recorded: bool,
}

impl InboundRecord {
    fn new(
        served: Arc<Served>,
        request_protocol: &'static str,
        parts: &Parts,
        request_id: HeaderValue,
    ) -> Self {
        let line = served.connection.access_log.then(|| RequestLine {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            host: parts.headers.get(HOST).cloned(),
            request_id,
        });
        InboundRecord {
            served,
            request_protocol,
            status: None,
            flags: ResponseFlags::default(),
            started: Instant::now(),
            request_bytes: Arc::default(),
            response_bytes: Arc::default(),
            line,
            attempts: 0,
            error: None,
            recorded: false,
        }
    }

    fn record(&mut self) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let duration = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let response_bytes = self.response_bytes.load(Ordering::Relaxed);
        let connection = &self.served.connection;
        let key = SeriesKey {
            request_protocol: self.request_protocol,
            status: self.status,
            flags: self.flags.clone(),
        };
        self.served.series.observe(
            &connection.inputs.metrics.http,
            &connection.labels,
            key,
            duration.as_secs_f64() * 1000.0,
            request_bytes,
            response_bytes,
        );
        let Some(line) = &self.line else {
            return;
        };
        let Some(mut access) = AccessLine::start(Level::INFO, format_args!("request complete"))
        else {
            return;
        };
        let labels = &connection.labels;
        access
            .str("direction", "inbound")
            .addr("src", connection.peer)
            .addr("orig_dst", connection.orig_dst)
            .str("protocol", self.request_protocol)
            .str("method", line.method.as_str())
            .str("authority", line.authority())
            .str("path", line.uri.path())
            .str("request_id", line.request_id.to_str().unwrap_or_default())
            .u64("attempts", self.attempts.into())
            .u64(
                "response_code",
                self.status.map_or(0, |status| status.as_u16()).into(),
            )
            .str("response_flags", &self.flags.render())
            .str("src_principal", labels.source_principal())
            .str("dst_principal", labels.destination_principal())
            .str("security_policy", labels.connection_security_policy())
            .u64("bytes_received", request_bytes)
            .u64("bytes_sent", response_bytes)
            .u64(
                "duration_ms",
                u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            )
            .opt_str("error", self.error.as_deref());
        access.emit();
    }
}

impl Recorded for InboundRecord {
    fn responded(&mut self, status: StatusCode) {
        self.status = Some(status);
    }

    fn replied_locally(&mut self, flag: ResponseFlag, _reason: &str) {
        self.flags.add(flag);
    }

    fn connection_failed(&mut self, error: &hyper::Error) {
        self.error = Some(format!("the connection to the app failed: {error}"));
    }

    fn response_bytes(&self) -> &Arc<AtomicU64> {
        &self.response_bytes
    }

    fn finish(mut self) {
        self.record();
    }
}

impl BodyEnd for InboundRecord {
    fn ended(mut self, error: Option<&BoxError>) {
        if let Some(error) = error {
            self.flags.add(ResponseFlag::UpstreamConnectionTermination);
            self.error = Some(format!("the app's response body failed: {error}"));
        }
        self.record();
    }
}

impl Drop for InboundRecord {
    fn drop(&mut self) {
        if !self.recorded {
            self.flags
                .add(ResponseFlag::DownstreamConnectionTermination);
            self.record();
        }
    }
}
