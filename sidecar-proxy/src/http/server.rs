//! Serving one downstream HTTP connection with hyper, for either side (the app's own requests
//! outbound, a peer's requests inbound): the idle and request-headers deadlines, the drain, and
//! what an error at the end means (a deadline, invalid HTTP, or the client going away). What a
//! request becomes is the caller's `handler`.
use std::{convert::Infallible, future::Future, pin::pin, sync::Arc};

use http::{Request, Response, StatusCode};
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

use super::{
    AppProtocol, MAX_CONCURRENT_HTTP2_STREAMS, MAX_HTTP2_HEADER_LIST_BYTES, body::ProxyBody,
};
use crate::{
    inputs::ProxyInputs,
    io::deadlines::{self, Deadlines, RequestHeads},
    io::gathered_writes,
    io::relay::record_refusal,
    io::small_writes::SmallWritesJoined,
    telemetry::access_log::AccessLog,
    telemetry::metrics::FailureReason,
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

/// What the server needs to know of the downstream connection besides its bytes.
pub struct Downstream {
    pub inputs: Arc<ProxyInputs>,
    /// The connection's side, client and original destination; logged (and the refusal
    /// counted) only when the client's bytes turn out not to be HTTP.
    pub log: AccessLog,
}

/// Serves the HTTP requests of one downstream connection until it ends, or until it is idle
/// for the idle timeout, or (HTTP/1) a request's headers are late. While the proxy drains it
/// is asked to finish: HTTP/1 closes after its request in flight (`Connection: close`) or at
/// once between requests, HTTP/2 sends GOAWAY; a connection that has carried no request yet is
/// asked once its first arrives, since its client opened it to send one.
pub async fn serve<D, H, F>(
    downstream: D,
    protocol: AppProtocol,
    connection: Downstream,
    handler: H,
) where
    D: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let Downstream { inputs, log } = connection;
    let (metrics, timeouts, drain) = (&inputs.metrics, inputs.timeouts, &inputs.drain);
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
        let serving = heads.request_started();
        let heads = heads.clone();
        // Boxed: the handler's future is kilobytes, and unboxed it was copied whole into this
        // block, again into hyper's slot and once more when awaited (memcpy was the proxy's
        // largest user-space cost per HTTP/1 request).
        let response = Box::pin(handler(request));
        async move {
            let response = response.await;
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
    let served = match protocol {
        AppProtocol::Http2 => {
            // The responses of the streams answered in one poll leave in one write.
            let (downstream, flusher) = gathered_writes::gather(downstream);
            let connection = http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(MAX_HTTP2_HEADER_LIST_BYTES)
                .max_concurrent_streams(MAX_CONCURRENT_HTTP2_STREAMS)
                .serve_connection(TokioIo::new(downstream), service);
            flusher
                .after_each_poll(async { finish_when!(connection, finish_when_draining) })
                .await
        }
        _ => {
            let connection = http1::Builder::new()
                // The client's header case goes upstream as written (linkerd2#2878).
                .preserve_header_case(true)
                .serve_connection(TokioIo::new(SmallWritesJoined(downstream)), service)
                .with_upgrades();
            finish_when!(connection, finish_when_draining)
        }
    };
    let Err(error) = served else {
        return;
    };
    let peer = log.src;
    if let Some(expired) = deadlines::expired(&error) {
        metrics.record_downstream_timeout(log.direction.name(), expired.timeout());
        debug!(%peer, %expired, "downstream HTTP connection closed");
    } else if error.is_parse() {
        // Not HTTP after all, or broken HTTP: hyper answered 400 (when it could) and closed.
        record_refusal(metrics, &log, FailureReason::HttpProtocolError, error);
    } else {
        // The client closed or reset mid-request: each request in flight was recorded with DC.
        debug!(%peer, %error, "downstream HTTP connection ended with an error");
    }
}
