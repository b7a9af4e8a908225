//! Upgrades (WebSocket, h2c upgrade...) pass through: the request goes upstream on a connection
//! of its own, and on `101 Switching Protocols` both upgraded connections are joined and copied
//! until either side closes (`send_and_join`, which inbound upgrades use too). The connection
//! is never pooled again.
use std::{net::SocketAddr, sync::Arc};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{
    AppProtocol,
    attempt::Upstream,
    body::{self, ProxyBody},
    pool::Sender,
    record::RequestRecord,
    reply::{self, Recorded, respond},
};
use crate::lifecycle::{drain::Drain, idle_exit::AppActivity};

/// An outbound upgrade: one try, on a new HTTP/1 connection to the endpoint the balancer picks.
pub async fn forward(
    upstream: Upstream<'_>,
    app_activity: Option<&Arc<AppActivity>>,
    request: Request<Incoming>,
    mut record: RequestRecord,
) -> Response<ProxyBody> {
    let upstream = Upstream {
        protocol: AppProtocol::Http1,
        ..upstream
    };
    let connected = match upstream.pick(&mut record) {
        Ok((_, endpoint)) => {
            record.attempts = 1;
            upstream.connect(endpoint, false, &mut record).await
        }
        Err(failure) => Err(failure),
    };
    let mut connection = match connected {
        Ok(connection) => connection,
        Err(failure) => return failure.reply(record),
    };
    let sender = &mut connection.sender;
    let send = move |request: Request<ProxyBody>| async move {
        match sender {
            Sender::Http1(sender) => sender.send_request(request).await,
            Sender::Http2(sender) => sender.send_request(request).await,
        }
    };
    // Still the app's connection: the drain and the idle exit wait for it.
    let open = || app_activity.map(|activity| activity.opened());
    let (drain, peer) = (&upstream.inputs.drain, record.peer);
    send_and_join(request, send, record, drain, peer, open).await
}

/// Sends the upgrade `request` upstream with `send` (on a connection of its own, never pooled
/// again) and passes the response down; on `101 Switching Protocols` both upgraded connections
/// are joined (`join`, holding what `hold` gives). For both sides.
pub async fn send_and_join<R, S, F, H>(
    mut request: Request<Incoming>,
    send: S,
    mut record: R,
    drain: &Drain,
    peer: SocketAddr,
    hold: impl FnOnce() -> H,
) -> Response<ProxyBody>
where
    R: Recorded,
    S: FnOnce(Request<ProxyBody>) -> F,
    F: Future<Output = hyper::Result<Response<Incoming>>>,
    H: Send + 'static,
{
    let downstream_upgrade = hyper::upgrade::on(&mut request);
    let (parts, incoming) = request.into_parts();
    let request = Request::from_parts(parts, incoming.map_err(Into::into).boxed_unsync());
    let mut response = match send(request).await {
        Ok(response) => response,
        Err(error) => return reply::connection_failed(record, &error),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return respond(record, response);
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    join(drain, downstream_upgrade, upstream_upgrade, peer, hold());
    record.responded(StatusCode::SWITCHING_PROTOCOLS);
    record.finish();
    let (parts, _empty) = response.into_parts();
    Response::from_parts(parts, body::empty())
}

/// Joins both sides of an upgrade once each has switched, and copies between them until
/// either closes, in a task the drain waits for; `hold` is kept until then.
fn join(
    drain: &Drain,
    downstream: OnUpgrade,
    upstream: OnUpgrade,
    peer: SocketAddr,
    hold: impl Send + 'static,
) {
    drain.spawn(async move {
        let _hold = hold;
        match tokio::try_join!(downstream, upstream) {
            Ok((downstream, upstream)) => {
                let (mut downstream, mut upstream) =
                    (TokioIo::new(downstream), TokioIo::new(upstream));
                if let Err(error) =
                    tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
                {
                    debug!(%peer, %error, "upgraded connection ended with an error");
                }
            }
            Err(error) => debug!(%peer, %error, "the upgrade did not complete"),
        }
    });
}
