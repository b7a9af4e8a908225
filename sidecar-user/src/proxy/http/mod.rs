//! HTTP-aware proxying of outbound connections that speak HTTP/1.x or HTTP/2 (prior knowledge):
//! each request is routed (`router`) to a service, balanced over its endpoints (`balancer`),
//! sent on a pooled connection within the service's circuit breaker (`pool`), with timeouts
//! and retries (`forward`), and leaves Istio's request metrics and an access log line
//! (`record`, `metrics`).
//!
//! - `config`: the `http` section of the mesh config; `detect`: bounded protocol detection;
//! - `headers`: hop-by-hop, request id, traceparent, x-forwarded-for; `upgrade`: WebSocket and
//!   other upgrades, passed through; `body`: counted bodies; `random`: cheap randomness.
mod balancer;
mod body;
pub mod config;
mod detect;
mod forward;
mod headers;
pub mod metrics;
mod pool;
mod random;
mod record;
mod route_policy;
pub mod router;
mod upgrade;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_origination_tests;

use std::{convert::Infallible, net::SocketAddr, pin::pin, sync::Arc};

use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Notify,
};
use tracing::debug;

pub use self::{
    balancer::Upstreams,
    config::{HttpConfig, PortProtocol},
    detect::{AppProtocol, detect},
};
use self::{
    body::ProxyBody,
    config::ServiceConfig,
    headers::{add_request_headers, is_upgrade, remove_hop_by_hop},
    metrics::{RequestLabels, ResponseFlag},
    record::{RequestOrigin, RequestRecord},
    route_policy::Verdict,
    router::{Decision, RequestView},
};
use super::{
    access_log::AccessLog,
    deadlines::{self, Deadlines, RequestHeads},
    metrics::{Direction, FailureReason},
    outbound::OutboundProxy,
    relay::record_refusal,
};

/// Serves a hyper server connection to its end; once `finish` completes, asks it to finish
/// gracefully (hyper's `graceful_shutdown`) and serves it to its end. (A macro: a generic
/// function holding hyper's connection across an await trips the compiler's `Send` proof.)
macro_rules! finish_when {
    ($connection:expr, $finish:expr) => {{
        let mut connection = pin!($connection);
        tokio::select! {
            served = connection.as_mut() => served,
            () = $finish => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    }};
}

/// Serves the HTTP requests of one downstream connection until it ends, or until it is idle
/// for the idle timeout, or (HTTP/1) a request's headers are late. While the proxy drains it
/// is asked to finish: HTTP/1 closes after its request in flight (`Connection: close`) or at
/// once between requests, HTTP/2 sends GOAWAY; a connection that has carried no request yet is
/// asked once its first arrives, since the app opened it to send one.
pub async fn serve<D>(
    proxy: Arc<OutboundProxy>,
    downstream: D,
    protocol: AppProtocol,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) where
    D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let metrics = proxy.metrics.clone();
    let timeouts = proxy.timeouts;
    let drain = proxy.drain.clone();
    let heads = Arc::new(RequestHeads::default());
    // A stored permit once the first request has arrived.
    let first_request = Arc::new(Notify::new());
    let finish_when_draining = {
        let first_request = first_request.clone();
        async move {
            drain.started().await;
            first_request.notified().await;
        }
    };
    let mut downstream = Deadlines::new(downstream, timeouts.idle);
    // HTTP/2 streams are bounded by h2's own limits (header list size, concurrent streams).
    if protocol == AppProtocol::Http1 {
        downstream =
            downstream.with_request_headers_timeout(heads.clone(), timeouts.request_headers);
    }
    let service = service_fn(move |request: Request<Incoming>| {
        first_request.notify_one();
        let proxy = proxy.clone();
        let serving = heads.request_started();
        let heads = heads.clone();
        async move {
            let response = handle(proxy, request, protocol, peer, orig_dst).await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                heads.upgraded();
            }
            // The request is served until its response's body is done with (then dropped).
            let response = response.map(|body| {
                body.map_frame(move |frame| {
                    let _serving = &serving;
                    frame
                })
                .boxed_unsync()
            });
            Ok::<_, Infallible>(response)
        }
    });
    let io = TokioIo::new(downstream);
    let served = match protocol {
        AppProtocol::Http2 => {
            let connection =
                http2::Builder::new(TokioExecutor::new()).serve_connection(io, service);
            finish_when!(connection, finish_when_draining)
        }
        _ => {
            let connection = http1::Builder::new()
                // The app's header case goes upstream as written (linkerd2#2878).
                .preserve_header_case(true)
                .serve_connection(io, service)
                .with_upgrades();
            finish_when!(connection, finish_when_draining)
        }
    };
    let Err(error) = served else {
        return;
    };
    if let Some(expired) = deadlines::expired(&error) {
        metrics.record_downstream_timeout(Direction::Outbound.name(), expired.timeout());
        debug!(%peer, %expired, "downstream HTTP connection closed");
    } else if error.is_parse() {
        // Not HTTP after all, or broken HTTP: hyper answered 400 (when it could) and closed.
        let mut log = AccessLog::new(Direction::Outbound, peer, "unknown");
        log.orig_dst = Some(orig_dst);
        record_refusal(&metrics, &log, FailureReason::HttpProtocolError, error);
    } else {
        // The client closed or reset mid-request: each request in flight was recorded with DC.
        debug!(%peer, %error, "downstream HTTP connection ended with an error");
    }
}

async fn handle(
    proxy: Arc<OutboundProxy>,
    request: Request<Incoming>,
    protocol: AppProtocol,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) -> Response<ProxyBody> {
    // A snapshot per request: a reload applies to the next request of a kept-alive connection.
    let mesh = proxy.mesh.current();
    let routes = mesh.routes();
    let (mut parts, body) = request.into_parts();
    let request_protocol = match protocol {
        AppProtocol::Http2
            if parts
                .headers
                .get(CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")) =>
        {
            "grpc"
        }
        _ => "http",
    };
    let mut record = RequestRecord::new(RequestOrigin {
        metrics: proxy.metrics.clone(),
        access_log: routes.config().access_log,
        labels: RequestLabels::outbound(
            &proxy.local.name,
            &proxy.local.namespace,
            request_protocol,
        ),
        request: &parts,
        peer,
        orig_dst,
    });
    let upgrade = is_upgrade(&parts.headers);
    remove_hop_by_hop(&mut parts.headers, upgrade);
    record.request_id = add_request_headers(&mut parts.headers, peer.ip());
    let request = Request::from_parts(parts, body);

    let view = RequestView::new(&request, orig_dst);
    let (service, route, limiter) = match routes.decide(&view) {
        Decision::Route {
            route,
            service,
            limiter,
        } => (service.clone(), Some(route), limiter),
        Decision::Service(service) => (service.clone(), None, None),
        Decision::Passthrough => (Arc::new(ServiceConfig::passthrough()), None, None),
        Decision::NoRoute => {
            return local_reply(
                record,
                StatusCode::NOT_FOUND,
                ResponseFlag::NoRoute,
                "no route matches this request",
            );
        }
    };
    record.set_service(&service);
    record.route = route.map(|route| route.name.clone());
    if let Some(route) = route {
        match route_policy::before_upstream(route, limiter).await {
            Verdict::Proceed { delayed: false } => {}
            Verdict::Proceed { delayed: true } => record.flag(ResponseFlag::DelayInjected),
            Verdict::Reply {
                status,
                flag,
                reason,
            } => return local_reply(record, status, flag, reason),
        }
    }
    let state = proxy.upstreams.service(&service, orig_dst);
    if upgrade {
        return upgrade::forward(&proxy, &mesh, &state, request, record).await;
    }
    forward::forward(
        forward::Forward {
            proxy: &proxy,
            mesh: &mesh,
            service: state,
            route,
            protocol,
            record,
        },
        request,
    )
    .await
}

/// A response the proxy makes itself (no route, no healthy upstream, overflow, timeout...):
/// counted with its flag and logged like any other.
fn local_reply(
    mut record: RequestRecord,
    status: StatusCode,
    flag: ResponseFlag,
    reason: &str,
) -> Response<ProxyBody> {
    record.flag(flag);
    record.labels.response_code = status.as_u16();
    if record.error.is_none() {
        record.error = Some(reason.to_owned());
    }
    let text = format!("{reason}\n");
    record
        .response_bytes
        .store(text.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    record.finish();
    response
}
