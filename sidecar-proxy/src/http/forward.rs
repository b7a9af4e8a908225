//! Sending a request upstream: tries on pooled connections, bounded by the route's timeout and
//! each try by the per-try timeout; retries on 5xx, resets and connect failures as the route
//! allows, for idempotent requests unless configured, within the service's retry budget. A
//! request that fails on a reused connection before any response byte is retried once on a
//! new one even without a retry policy (the server closed it while idle: istio#13205), if it
//! was never written or is idempotent.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, uri::Scheme};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tokio::time::timeout_at;

use super::{
    balancer::ServiceState,
    body::{self, Counted, ProxyBody, Untracked},
    config::{RetryOn, RouteConfig},
    detect::AppProtocol,
    metrics::ResponseFlag,
    pool::{self, AcquireError, Sender},
    record::RequestRecord,
    reply::{Recorded, local_reply, respond},
};
use crate::{
    io::upstream::ConnectFailure,
    mesh::{Mesh, UpstreamSecurity},
    outbound::OutboundProxy,
};

/// Request bodies up to this size are kept to be replayed by a retry; larger or streamed ones
/// are sent once.
const MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// Without a route timeout a request may take this long in total (Envoy's default is 15 s; a
/// long poll needs a route with its own timeout).
const DEFAULT_ROUTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

pub struct Forward<'a> {
    pub proxy: &'a OutboundProxy,
    pub mesh: &'a Mesh,
    pub service: Arc<ServiceState>,
    pub route: Option<&'a RouteConfig>,
    pub protocol: AppProtocol,
    pub record: RequestRecord,
}

/// The request body: kept for replays, or streamed once.
enum RequestBody {
    Replayable(Bytes),
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Replayable(bytes) => Some(body::full(bytes.clone())),
            RequestBody::Streaming(body) => body.take(),
        }
    }
}

/// Why a try produced no response.
enum TryFailure {
    NoHealthyUpstream,
    Overflow,
    Connect(ConnectFailure),
    /// The connection failed before a response; `unsent` when the request never left.
    Reset {
        reused: bool,
        unsent: Option<Box<Request<ProxyBody>>>,
        error: hyper::Error,
    },
    PerTryTimeout,
}

/// Counts the request as in flight (for the retry budget) until dropped.
struct InFlight<'a>(&'a ServiceState);

impl<'a> InFlight<'a> {
    fn enter(service: &'a ServiceState) -> Self {
        service.active_requests.fetch_add(1, Ordering::Relaxed);
        InFlight(service)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

pub async fn forward(mut forward: Forward<'_>, request: Request<Incoming>) -> Response<ProxyBody> {
    let service = forward.service.clone();
    let _in_flight = InFlight::enter(&service);
    let (parts, incoming) = request.into_parts();
    let policy = forward.route.and_then(|route| route.retries.as_ref());
    let idempotent = is_idempotent(&parts.method);
    let may_replay = idempotent || policy.is_some_and(|policy| policy.retry_non_idempotent);
    let small = incoming
        .size_hint()
        .upper()
        .is_some_and(|upper| upper <= MAX_REPLAY_BYTES);
    let mut body = if may_replay && small {
        match incoming.collect().await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                forward
                    .record
                    .request_bytes
                    .store(bytes.len() as u64, Ordering::Relaxed);
                RequestBody::Replayable(bytes)
            }
            Err(error) => {
                forward.record.error = Some(format!("reading the request body failed: {error}"));
                // The client went away mid-request (or sent a broken body).
                return local_reply(
                    forward.record,
                    StatusCode::BAD_REQUEST,
                    ResponseFlag::DownstreamConnectionTermination,
                    "the request body could not be read",
                );
            }
        }
    } else {
        let counted = Counted::new(
            incoming.map_err(Into::into).boxed_unsync(),
            forward.record.request_bytes.clone(),
            None::<Untracked>,
        );
        RequestBody::Streaming(Some(counted.boxed_unsync()))
    };
    // Only a kept body can be sent again (and it is kept only when a retry is allowed).
    let replayable = matches!(body, RequestBody::Replayable(_));

    let timeout = forward
        .route
        .and_then(|route| route.timeout)
        .unwrap_or(DEFAULT_ROUTE_TIMEOUT);
    let deadline = forward.record.started + timeout;
    let max_tries = 1 + policy.map_or(0, |policy| policy.attempts);
    let retry_on = |reason: RetryOn| policy.is_some_and(|policy| policy.retry_on.contains(&reason));
    let mut tries = 0;
    let mut stale_retry_done = false;
    let mut retried = false;
    let mut pending_request: Option<Request<ProxyBody>> = None;
    loop {
        let Some(request) = pending_request.take().or_else(|| {
            // The same method, URI, headers and extensions (hyper's header case map among them).
            Some(Request::from_parts(parts.clone(), body.take()?))
        }) else {
            // A streamed body is gone with the failed try: nothing left to retry with.
            return local_reply(
                forward.record,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectionTermination,
                "upstream connection failed",
            );
        };
        tries += 1;
        forward.record.attempts = tries;
        let per_try_deadline = policy
            .and_then(|policy| policy.per_try_timeout)
            .map_or(deadline, |per_try| deadline.min(Instant::now() + per_try));
        let outcome =
            match timeout_at(per_try_deadline.into(), try_once(&mut forward, request)).await {
                Ok(outcome) => outcome,
                Err(_elapsed) => Err(TryFailure::PerTryTimeout),
            };
        if retried {
            service.finish_retry();
            retried = false;
        }
        let tries_left = tries < max_tries && Instant::now() < deadline;
        let service_name = service.config.name.clone();
        let may_retry = |forward: &mut Forward<'_>, reason: &str| -> bool {
            if !service.try_start_retry() {
                forward.record.error = Some(format!("retry budget exhausted after {reason}"));
                return false;
            }
            forward
                .proxy
                .inputs
                .metrics
                .http
                .record_retry(&service_name, reason);
            true
        };
        match outcome {
            Ok(response) => {
                let server_error = response.status().is_server_error();
                if server_error && retry_on(RetryOn::ServerError) && tries_left && replayable {
                    if may_retry(&mut forward, "5xx") {
                        retried = true;
                        continue;
                    }
                    forward.record.flag(ResponseFlag::RetryLimitExceeded);
                } else if server_error && tries > 1 {
                    forward.record.flag(ResponseFlag::RetryLimitExceeded);
                }
                return respond(forward.record, response);
            }
            Err(TryFailure::NoHealthyUpstream) => {
                return local_reply(
                    forward.record,
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlag::NoHealthyUpstream,
                    "no healthy upstream",
                );
            }
            Err(TryFailure::Overflow) => {
                return local_reply(
                    forward.record,
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlag::UpstreamOverflow,
                    "upstream overflow: the circuit breaker is open",
                );
            }
            Err(TryFailure::Connect(failure)) => {
                forward.record.upstream_connect_failed(failure);
                if retry_on(RetryOn::ConnectFailure)
                    && tries_left
                    && replayable
                    && may_retry(&mut forward, "connect-failure")
                {
                    retried = true;
                    continue;
                }
                if tries > 1 {
                    forward.record.flag(ResponseFlag::RetryLimitExceeded);
                }
                return local_reply(
                    forward.record,
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlag::UpstreamConnectFailure,
                    "upstream connect failure",
                );
            }
            Err(TryFailure::Reset {
                reused,
                unsent,
                error,
            }) => {
                forward.record.connection_failed(&error);
                // The server closed an idle connection as we reused it: once, on a new one.
                if reused && !stale_retry_done && (unsent.is_some() || (idempotent && replayable)) {
                    stale_retry_done = true;
                    tries -= 1;
                    pending_request = unsent.map(|request| *request);
                    forward
                        .proxy
                        .inputs
                        .metrics
                        .http
                        .record_retry(&service_name, "stale-connection");
                    continue;
                }
                if retry_on(RetryOn::Reset)
                    && tries_left
                    && replayable
                    && may_retry(&mut forward, "reset")
                {
                    retried = true;
                    pending_request = unsent.map(|request| *request);
                    continue;
                }
                if tries > 1 {
                    forward.record.flag(ResponseFlag::RetryLimitExceeded);
                }
                return local_reply(
                    forward.record,
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlag::UpstreamConnectionTermination,
                    "upstream connection failed before a response",
                );
            }
            Err(TryFailure::PerTryTimeout) => {
                if tries_left && replayable && may_retry(&mut forward, "per-try-timeout") {
                    retried = true;
                    continue;
                }
                forward.record.error = Some(format!(
                    "no response within the route timeout of {timeout:?}"
                ));
                return local_reply(
                    forward.record,
                    StatusCode::GATEWAY_TIMEOUT,
                    ResponseFlag::UpstreamTimeout,
                    "upstream request timeout",
                );
            }
        }
    }
}

async fn try_once(
    forward: &mut Forward<'_>,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, TryFailure> {
    let service = forward.service.clone();
    let Some((index, endpoint)) = service.pick(Instant::now()).and_then(|picked| {
        Some((
            service
                .endpoints
                .iter()
                .position(|e| std::ptr::eq(e, picked))?,
            picked,
        ))
    }) else {
        return Err(TryFailure::NoHealthyUpstream);
    };
    forward.record.upstream = Some(endpoint.addr);
    endpoint.active.fetch_add(1, Ordering::Relaxed);
    let _active = Decrement(&endpoint.active);
    let mut connection = match pool::acquire(
        &service,
        endpoint,
        forward.protocol,
        forward.mesh,
        &forward.proxy.inputs.timeouts,
        &forward.proxy.inputs.metrics.http,
    )
    .await
    {
        Ok(connection) => connection,
        Err(AcquireError::Overflow) => return Err(TryFailure::Overflow),
        Err(AcquireError::Connect(failure)) => {
            endpoint.record_failure(&service, &forward.proxy.inputs.metrics.http);
            return Err(TryFailure::Connect(failure));
        }
    };
    if let Some(mtls) = &connection.mtls {
        forward.record.set_mutual_tls(mtls);
    }
    let mut request = request;
    if matches!(connection.security, UpstreamSecurity::OriginatedTls(_)) {
        https_scheme(request.uri_mut());
    }
    let sent = match &mut connection.sender {
        Sender::Http1(sender) => sender.try_send_request(request).await,
        Sender::Http2(sender) => sender.try_send_request(request).await,
    };
    match sent {
        Ok(response) => {
            if response.status().is_server_error() {
                endpoint.record_failure(&service, &forward.proxy.inputs.metrics.http);
            } else {
                endpoint.record_success();
            }
            pool::release(
                connection,
                service.clone(),
                index,
                forward.proxy.inputs.mesh.clone(),
            );
            Ok(response)
        }
        Err(mut failed) => Err(TryFailure::Reset {
            reused: connection.reused,
            unsent: failed.take_message().map(Box::new),
            error: failed.into_error(),
        }),
    }
}

/// A request leaving over originated TLS says so (HTTP/2's `:scheme`, an absolute URI); an
/// origin-form HTTP/1 target has no scheme to change.
fn https_scheme(uri: &mut Uri) {
    if uri.scheme().is_none() {
        return;
    }
    let mut parts = uri.clone().into_parts();
    parts.scheme = Some(Scheme::HTTPS);
    if let Ok(https) = Uri::from_parts(parts) {
        *uri = https;
    }
}

struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
