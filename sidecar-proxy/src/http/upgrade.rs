//! Upgrades (WebSocket, h2c upgrade...) pass through: the request goes upstream on a connection
//! of its own, and on `101 Switching Protocols` both upgraded connections are joined and copied
//! until either side closes (`join`, which inbound upgrades use too). The connection is never
//! pooled again.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::{
    balancer::ServiceState,
    body::{self, ProxyBody},
    detect::AppProtocol,
    forward::respond,
    local_reply,
    metrics::ResponseFlag,
    pool::{self, AcquireError, Sender},
    record::RequestRecord,
};
use crate::{lifecycle::drain::Drain, mesh::Mesh, outbound::OutboundProxy};

pub async fn forward(
    proxy: &OutboundProxy,
    mesh: &Mesh,
    service: &Arc<ServiceState>,
    mut request: Request<Incoming>,
    mut record: RequestRecord,
) -> Response<ProxyBody> {
    let downstream_upgrade = hyper::upgrade::on(&mut request);
    let Some(endpoint) = service.pick(Instant::now()) else {
        return local_reply(
            record,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NoHealthyUpstream,
            "no healthy upstream",
        );
    };
    record.upstream = Some(endpoint.addr);
    record.attempts = 1;
    let acquired = pool::acquire(
        service,
        endpoint,
        AppProtocol::Http1,
        mesh,
        &proxy.timeouts,
        &proxy.metrics.http,
    );
    let mut connection = match acquired.await {
        Ok(connection) => connection,
        Err(AcquireError::Overflow) => {
            return local_reply(
                record,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamOverflow,
                "upstream overflow: the circuit breaker is open",
            );
        }
        Err(AcquireError::Connect(failure)) => {
            endpoint.record_failure(service, &proxy.metrics.http);
            record.upstream_connect_failed(failure);
            return local_reply(
                record,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectFailure,
                "upstream connect failure",
            );
        }
    };
    if let Some(mtls) = &connection.mtls {
        record.set_mutual_tls(mtls);
    }
    let (parts, incoming) = request.into_parts();
    let request = Request::from_parts(parts, incoming.map_err(Into::into).boxed_unsync());
    let sent = match &mut connection.sender {
        Sender::Http1(sender) => sender.send_request(request).await,
        Sender::Http2(sender) => sender.send_request(request).await,
    };
    let mut response = match sent {
        Ok(response) => response,
        Err(error) => {
            record.error = Some(format!("upstream connection failed: {error}"));
            return local_reply(
                record,
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectionTermination,
                "upstream connection failed before a response",
            );
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return respond(record, response);
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    // Still the app's connection: the drain and the idle exit wait for it.
    let open = proxy
        .app_activity
        .as_ref()
        .map(|activity| activity.opened());
    join(
        &proxy.drain,
        downstream_upgrade,
        upstream_upgrade,
        record.peer,
        open,
    );
    record.labels.response_code = StatusCode::SWITCHING_PROTOCOLS.as_u16();
    record.finish();
    let (parts, _empty) = response.into_parts();
    Response::from_parts(parts, body::empty())
}

/// Joins both sides of an upgrade once each has switched, and copies between them until
/// either closes, in a task the drain waits for; `hold` is kept until then.
pub fn join(
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
