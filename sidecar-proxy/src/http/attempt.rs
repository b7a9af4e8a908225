//! One try of a request upstream, the same for every try and for upgrades: the pick step (an
//! endpoint, by the balancer), the connect step (a connection from the endpoint's pool, within
//! the circuit breaker), the send; and how it ended, an [`Attempt`], which is all the retry
//! decision (`retry`) and the reply ([`Attempt::reply`]) look at.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use http::{Request, Response, StatusCode, Uri, Version, uri::Scheme};
use hyper::body::Incoming;

use super::{
    AppProtocol,
    balancer::{Endpoint, ServiceState},
    body::ProxyBody,
    h1_over_h2,
    metrics::ResponseFlag,
    pool::{self, AcquireError, Connection, Sender},
    record::RequestRecord,
    reply::{Recorded, local_reply, respond},
};
use crate::{
    inputs::ProxyInputs,
    mesh::{Mesh, UpstreamSecurity},
};

/// How one try ended.
pub enum Attempt {
    Responded(Response<Incoming>),
    Failed(Failure),
}

/// Why a try got no response. What went wrong is already in the request's record.
pub enum Failure {
    NoHealthyUpstream,
    /// The circuit breaker's limits are reached.
    Overflow,
    /// The connect (TCP, or its TLS handshake) failed.
    ConnectFailed,
    /// The connection failed before a response; `unsent` when the request never left.
    Reset {
        reused: bool,
        unsent: Option<Box<Request<ProxyBody>>>,
    },
    /// The per-try timeout (or the route's) ran out.
    TimedOut,
}

/// What the tries of one request go to.
pub struct Upstream<'a> {
    pub inputs: &'a ProxyInputs,
    /// The snapshot the request was routed with.
    pub mesh: &'a Mesh,
    pub service: &'a Arc<ServiceState>,
    pub protocol: AppProtocol,
}

impl Upstream<'_> {
    /// The pick step: an endpoint not ejected, by the service's balancer (and its index, for
    /// the pool to put its connection back).
    pub fn pick(&self, record: &mut RequestRecord) -> Result<(usize, &Endpoint), Failure> {
        let service = self.service;
        let picked = service.pick(Instant::now()).and_then(|picked| {
            let index = service
                .endpoints
                .iter()
                .position(|e| std::ptr::eq(e, picked))?;
            Some((index, picked))
        });
        let Some((index, endpoint)) = picked else {
            return Err(Failure::NoHealthyUpstream);
        };
        record.upstream = Some(endpoint.addr);
        Ok((index, endpoint))
    }

    /// The connect step: a connection to `endpoint` from its pool, within the circuit breaker
    /// (a peer sidecar's shared HTTP/2 one for a `carriable` HTTP/1.1 request); a failed
    /// connect counts against the endpoint (outlier detection).
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        carriable: bool,
        record: &mut RequestRecord,
    ) -> Result<Connection, Failure> {
        let metrics = &self.inputs.metrics.http;
        let acquired = pool::acquire(
            self.service,
            endpoint,
            self.protocol,
            carriable,
            self.mesh,
            &self.inputs.timeouts,
            metrics,
        );
        match acquired.await {
            Ok(connection) => {
                if let Some(mtls) = &connection.mtls {
                    record.set_mutual_tls(mtls);
                }
                Ok(connection)
            }
            Err(AcquireError::Overflow) => Err(Failure::Overflow),
            Err(AcquireError::Connect(failure)) => {
                endpoint.record_failure(self.service, metrics);
                record.upstream_connect_failed(failure);
                Err(Failure::ConnectFailed)
            }
        }
    }

    /// One try: pick, connect, send. A response goes to the endpoint's outlier detection, and
    /// its connection back to the pool.
    pub async fn send(&self, request: Request<ProxyBody>, record: &mut RequestRecord) -> Attempt {
        let (index, endpoint) = match self.pick(record) {
            Ok(picked) => picked,
            Err(failure) => return Attempt::Failed(failure),
        };
        let _active = Active::enter(&endpoint.active);
        let (mut parts, body) = request.into_parts();
        // Only an HTTP/1.1 request can be.
        let carriable = h1_over_h2::carriable(&parts);
        let mut connection = match self.connect(endpoint, carriable, record).await {
            Ok(connection) => connection,
            Err(failure) => return Attempt::Failed(failure),
        };
        if matches!(connection.security, UpstreamSecurity::OriginatedTls(_)) {
            https_scheme(&mut parts.uri);
        }
        // The app's HTTP/1.1 request, on a peer sidecar's shared HTTP/2 connection.
        let carried = carriable && matches!(connection.sender, Sender::Http2(_));
        if carried {
            h1_over_h2::carry(&mut parts);
        }
        let request = Request::from_parts(parts, body);
        let sent = match &mut connection.sender {
            Sender::Http1(sender) => sender.try_send_request(request).await,
            Sender::Http2(sender) => sender.try_send_request(request).await,
        };
        let metrics = &self.inputs.metrics.http;
        match sent {
            Ok(mut response) => {
                if carried {
                    *response.version_mut() = Version::HTTP_11;
                }
                if response.status().is_server_error() {
                    endpoint.record_failure(self.service, metrics);
                } else {
                    endpoint.record_success();
                }
                // Open until the response body ends, when the record goes.
                record.upstream_stream = connection.stream.take();
                let (service, mesh) = (self.service.clone(), self.inputs.mesh.clone());
                pool::release(connection, service, index, mesh);
                Attempt::Responded(response)
            }
            Err(mut failed) => {
                let unsent = failed.take_message().map(|request| {
                    if !carried {
                        return Box::new(request);
                    }
                    // A retry may take another connection: the request as the app sent it.
                    let (mut parts, body) = request.into_parts();
                    h1_over_h2::uncarry(&mut parts);
                    Box::new(Request::from_parts(parts, body))
                });
                record.connection_failed(&failed.into_error());
                Attempt::Failed(Failure::Reset {
                    reused: connection.reused,
                    unsent,
                })
            }
        }
    }
}

impl Attempt {
    /// The response the request ends with after this try: the upstream's, or the proxy's own
    /// with its flag.
    pub fn reply(self, record: RequestRecord) -> Response<ProxyBody> {
        match self {
            Attempt::Responded(response) => respond(record, response),
            Attempt::Failed(failure) => failure.reply(record),
        }
    }
}

impl Failure {
    /// The proxy's own response, with its flag.
    pub fn reply(self, record: RequestRecord) -> Response<ProxyBody> {
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        match self {
            Failure::NoHealthyUpstream => local_reply(
                record,
                unavailable,
                ResponseFlag::NoHealthyUpstream,
                "no healthy upstream",
            ),
            Failure::Overflow => local_reply(
                record,
                unavailable,
                ResponseFlag::UpstreamOverflow,
                "upstream overflow: the circuit breaker is open",
            ),
            Failure::ConnectFailed => local_reply(
                record,
                unavailable,
                ResponseFlag::UpstreamConnectFailure,
                "upstream connect failure",
            ),
            Failure::Reset { .. } => local_reply(
                record,
                unavailable,
                ResponseFlag::UpstreamConnectionTermination,
                "upstream connection failed before a response",
            ),
            Failure::TimedOut => local_reply(
                record,
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlag::UpstreamTimeout,
                "upstream request timeout",
            ),
        }
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

/// Counts a request in flight to an endpoint (least-request balancing) until dropped.
struct Active<'a>(&'a AtomicU64);

impl<'a> Active<'a> {
    fn enter(active: &'a AtomicU64) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Active(active)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
