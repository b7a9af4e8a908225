//! HTTP-aware proxying of connections that speak HTTP/1.x or HTTP/2 (prior knowledge). Outbound,
//! a request goes one way: [`handle`] routes it (`router`, `route_policy`) to a service, then
//! `forward` tries it: each try picks an endpoint (`balancer`), takes a connection from its
//! pool within the service's circuit breaker (`pool`) and sends, within the per-try timeout
//! (`attempt`); one decision retries it or not (`retry`); the last try's outcome is the
//! response, which leaves Istio's request metrics and an access log line (`record`,
//! `metrics`). Inbound (`inbound`), each request goes to the app and is reported by the
//! destination.
//!
//! - `config`: the `http` section of the mesh config; `detect`: bounded protocol detection;
//! - `server`: serving a downstream connection (deadlines, drain), for both sides;
//! - `inbound`: the requests peers send to the app, forwarded on pooled connections to it
//!   (`app_pool`) with the destination's request metrics and access lines;
//! - `reply`: the responses both sides send down, the upstream's and the proxy's own;
//! - `h1_over_h2`: the app's HTTP/1.1 requests carried to a peer sidecar on one HTTP/2
//!   connection, and restored at the peer;
//! - `headers`: hop-by-hop, request id, traceparent, x-forwarded-for; `upgrade`: WebSocket and
//!   other upgrades, passed through, for both sides; `body`: counted bodies; `random`: cheap
//!   randomness.
mod app_pool;
mod attempt;
mod balancer;
mod body;
pub mod config;
mod forward;
mod h1_over_h2;
mod headers;
pub mod inbound;
pub mod metrics;
mod pool;
mod random;
mod record;
mod reply;
mod retry;
pub mod route_policy;
pub mod router;
mod server;
mod upgrade;

use std::{net::SocketAddr, sync::Arc};

use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

pub use self::{
    app_pool::AppPool,
    balancer::Upstreams,
    config::{HttpConfig, PortProtocol},
};
use self::{
    attempt::Upstream,
    body::ProxyBody,
    config::ServiceConfig,
    headers::{add_request_headers, is_upgrade, remove_hop_by_hop},
    metrics::{RequestLabels, ResponseFlag},
    record::{RequestOrigin, RequestRecord},
    reply::local_reply,
    route_policy::Verdict,
    router::{Decision, RequestView},
};
use super::{
    outbound::OutboundProxy, telemetry::access_log::AccessLog, telemetry::metrics::Direction,
};
pub use crate::detect::http::{AppProtocol, Raced, detect, detect_racing_server};

/// The header room of an HTTP/2 message, sent and received, both sides. h2's default is 16 KiB;
/// HTTP/1.1 requests carried between sidecars get Envoy's default instead (60 KiB, rounded up).
/// hyper's HTTP/1 takes up to about 400 KiB: the few requests between the two get 431 when
/// carried.
const MAX_HTTP2_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// Streams at once on a served HTTP/2 connection (hyper's default is 200): a peer's sidecar
/// carries every request in flight to this pod on one connection, as many as the HTTP/1
/// connections a service's circuit breaker allows by default.
const MAX_CONCURRENT_HTTP2_STREAMS: u32 = 1024;

/// Serves the HTTP requests the app sends on one outbound connection (`server::serve`: the
/// deadlines and the drain), each routed and forwarded by [`handle`].
pub async fn serve<D>(
    proxy: Arc<OutboundProxy>,
    downstream: D,
    protocol: AppProtocol,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) where
    D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut log = AccessLog::new(Direction::Outbound, peer, "unknown");
    log.orig_dst = Some(orig_dst);
    let connection = server::Downstream {
        inputs: proxy.inputs.clone(),
        log,
    };
    server::serve(downstream, protocol, connection, move |request| {
        handle(proxy.clone(), request, protocol, peer, orig_dst)
    })
    .await;
}

async fn handle(
    proxy: Arc<OutboundProxy>,
    request: Request<Incoming>,
    protocol: AppProtocol,
    peer: SocketAddr,
    orig_dst: SocketAddr,
) -> Response<ProxyBody> {
    // A snapshot per request: a reload applies to the next request of a kept-alive connection.
    let mesh = proxy.inputs.mesh.current();
    let routes = mesh.routes();
    let (mut parts, body) = request.into_parts();
    let request_protocol = request_protocol(protocol, &parts.headers);
    let mut record = RequestRecord::new(RequestOrigin {
        metrics: proxy.inputs.metrics.clone(),
        access_log: routes.config().access_log,
        labels: RequestLabels::outbound(
            &proxy.inputs.local.name,
            &proxy.inputs.local.namespace,
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
        Decision::Passthrough => (ServiceConfig::shared_passthrough(), None, None),
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
    let upstream = Upstream {
        inputs: &proxy.inputs,
        mesh: &mesh,
        service: &state,
        protocol,
    };
    if upgrade {
        // Boxed: rare, and its future (the relay after the switch) would size every request's.
        return Box::pin(upgrade::forward(
            upstream,
            proxy.app_activity.as_ref(),
            request,
            record,
        ))
        .await;
    }
    forward::forward(upstream, route, record, request).await
}

/// Istio's `request_protocol`: `grpc` for HTTP/2 requests of `application/grpc...`, else `http`.
fn request_protocol(protocol: AppProtocol, headers: &http::HeaderMap) -> &'static str {
    let grpc = protocol == AppProtocol::Http2
        && headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc { "grpc" } else { "http" }
}
