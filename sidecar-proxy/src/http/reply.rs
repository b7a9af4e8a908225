//! The responses both sides send down, whatever recorded the request (outbound's
//! `RequestRecord`, inbound's `InboundRecord`): the upstream's own, passed on ([`respond`]),
//! and the proxy's ([`local_reply`]: no route, no healthy upstream, overflow, timeout, the
//! connection failed...).
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use http::{HeaderValue, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{
    body::{self, BodyEnd, Counted, ProxyBody},
    headers::remove_hop_by_hop,
    metrics::ResponseFlag,
};

/// A request's record, as the replies write in it; recorded once, when its response ends.
pub trait Recorded: BodyEnd + Unpin {
    /// The status it is answered with.
    fn responded(&mut self, status: StatusCode);
    /// Answered by the proxy itself, with `flag`, for `reason`.
    fn replied_locally(&mut self, flag: ResponseFlag, reason: &str);
    /// The upstream connection failed before a response.
    fn connection_failed(&mut self, error: &hyper::Error);
    /// Where the response's bytes are counted.
    fn response_bytes(&self) -> &Arc<AtomicU64>;
    /// Records now (a local reply, or an upgrade once switched).
    fn finish(self);
}

/// The upstream's response, on its way down: hop-by-hop headers removed, body counted, the
/// request recorded when the body ends.
pub fn respond<R: Recorded>(mut record: R, response: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, incoming) = response.into_parts();
    record.responded(parts.status);
    remove_hop_by_hop(&mut parts.headers, false);
    let counted = record.response_bytes().clone();
    let body = Counted::new(
        incoming.map_err(Into::into).boxed_unsync(),
        counted,
        Some(record),
    );
    Response::from_parts(parts, body.boxed_unsync())
}

/// A response the proxy makes itself: recorded with its flag, as any other.
pub fn local_reply<R: Recorded>(
    mut record: R,
    status: StatusCode,
    flag: ResponseFlag,
    reason: &str,
) -> Response<ProxyBody> {
    record.replied_locally(flag, reason);
    record.responded(status);
    let text = format!("{reason}\n");
    record
        .response_bytes()
        .store(text.len() as u64, Ordering::Relaxed);
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    record.finish();
    response
}

/// The upstream connection failed before a response: 503, flag `UC`.
pub fn connection_failed<R: Recorded>(mut record: R, error: &hyper::Error) -> Response<ProxyBody> {
    record.connection_failed(error);
    local_reply(
        record,
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::UpstreamConnectionTermination,
        "upstream connection failed before a response",
    )
}
