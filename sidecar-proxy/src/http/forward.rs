//! A routed request's way upstream, in one direction: its body kept for a replay or streamed
//! once, then each try picks an endpoint, connects and sends within its deadline (`attempt`),
//! the one retry decision follows (`retry`), and the last try's outcome is the response,
//! recorded (`record`, through `Attempt::reply`).
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tokio::time::timeout_at;

use super::{
    attempt::{Attempt, Failure, Upstream},
    balancer::ServiceState,
    body::{self, Counted, ProxyBody, Untracked},
    config::RouteConfig,
    metrics::ResponseFlag,
    record::RequestRecord,
    reply::local_reply,
    retry::{Next, Retries, is_idempotent},
};

/// Request bodies up to this size are kept to be replayed by a retry; larger or streamed ones
/// are sent once.
const MAX_REPLAY_BYTES: u64 = 64 * 1024;
/// Without a route timeout a request may take this long in total (Envoy's default is 15 s; a
/// long poll needs a route with its own timeout).
const DEFAULT_ROUTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

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

/// Counts the request as in flight (for the retry budget) until dropped.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(service: &'a ServiceState) -> Self {
        service.active_requests.fetch_add(1, Ordering::Relaxed);
        InFlight(&service.active_requests)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends `request` to `upstream` as `route` says (timeouts, retries), and answers with the
/// last try's outcome.
pub async fn forward(
    upstream: Upstream<'_>,
    route: Option<&RouteConfig>,
    mut record: RequestRecord,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let _in_flight = InFlight::enter(upstream.service);
    let (parts, incoming) = request.into_parts();
    let policy = route.and_then(|route| route.retries.as_ref());
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
                record
                    .request_bytes
                    .store(bytes.len() as u64, Ordering::Relaxed);
                RequestBody::Replayable(bytes)
            }
            Err(error) => {
                record.error = Some(format!("reading the request body failed: {error}"));
                // The client went away mid-request (or sent a broken body).
                return local_reply(
                    record,
                    StatusCode::BAD_REQUEST,
                    ResponseFlag::DownstreamConnectionTermination,
                    "the request body could not be read",
                );
            }
        }
    } else {
        let counted = Counted::new(
            incoming.map_err(Into::into).boxed_unsync(),
            record.request_bytes.clone(),
            None::<Untracked>,
        );
        RequestBody::Streaming(Some(counted.boxed_unsync()))
    };
    // Only a kept body can be sent again (and it is kept only when a retry is allowed).
    let replayable = matches!(body, RequestBody::Replayable(_));
    let route_timeout = route
        .and_then(|route| route.timeout)
        .unwrap_or(DEFAULT_ROUTE_TIMEOUT);
    let mut retries = Retries::new(
        upstream.service,
        &upstream.inputs.metrics.http,
        policy,
        idempotent,
        replayable,
        (record.started, route_timeout),
    );
    let mut unsent: Option<Request<ProxyBody>> = None;
    loop {
        let Some(request) = unsent.take().or_else(|| {
            // The same method, URI, headers and extensions (hyper's header case map among them).
            Some(Request::from_parts(parts.clone(), body.take()?))
        }) else {
            // A streamed body is gone with the failed try: nothing left to retry with.
            return local_reply(
                record,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectionTermination,
                "upstream connection failed",
            );
        };
        let (tries, deadline) = retries.start();
        record.attempts = tries;
        let attempt = timeout_at(deadline.into(), upstream.send(request, &mut record))
            .await
            .unwrap_or(Attempt::Failed(Failure::TimedOut));
        match retries.after(attempt, &mut record) {
            Next::Again(request) => unsent = request,
            Next::Done(attempt) => return attempt.reply(record),
        }
    }
}
