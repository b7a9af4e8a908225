//! Pooled upstream connections of one endpoint, within the service's circuit breaker: at most
//! `maxConnections` open (one semaphore permit each, held until the connection is closed), at most
//! `maxPendingRequests` waiting for one (beyond: overflow, 503 UO). Idle HTTP/1 connections are
//! closed after `idleTimeout`, below the apps' own keep-alive timeouts, so the proxy is not the
//! one reusing a connection the app is closing; HTTP/2 connections are shared, and closed once
//! no stream has been open on them for `idleTimeout` (Istio's meaning for both). A connection
//! serves a request only under the security it was made under (plaintext, mesh mTLS with its
//! policy, or the service's TLS origination with its files): after a reload that changes it
//! for its endpoint, it is closed. So a TLS and a plaintext connection are never mixed. A peer
//! sidecar's shared HTTP/2 connection carries the apps' HTTP/1.1 requests to it as well.
use std::{
    pin::pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::{
    AppProtocol, MAX_HTTP2_HEADER_LIST_BYTES,
    balancer::{Endpoint, ServiceState},
    body::ProxyBody,
    metrics::HttpMetrics,
};
use crate::{
    Timeouts,
    io::small_writes::SmallWritesJoined,
    io::upstream::{self, ConnectFailure, Established, MeshOffer, MutualTls},
    mesh::{Mesh, MeshHandle, UpstreamSecurity},
    telemetry::metrics::FailureReason,
    tls::origination::Alpn,
};

/// How long the shared HTTP/2 connection may hear nothing while requests are in flight before
/// it PINGs, and how long it then waits for the answer.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

pub enum Sender {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

/// A connection taken from (or opened for) the pool, for one request.
pub struct Connection {
    pub sender: Sender,
    /// It served a request before: it may have been closed by the server meanwhile.
    pub reused: bool,
    requests: u32,
    pub mtls: Option<MutualTls>,
    /// What it was made under.
    pub security: UpstreamSecurity,
    /// This request's stream on the shared HTTP/2 connection: to be held until the response
    /// body ends (the request's record holds it).
    pub stream: Option<OpenStream>,
}

struct Idle {
    connection: Connection,
    since: Instant,
}

/// The multiplexed HTTP/2 connection of an endpoint.
struct SharedHttp2 {
    sender: http2::SendRequest<ProxyBody>,
    mtls: Option<MutualTls>,
    security: UpstreamSecurity,
    /// The peer's sidecar agreed to take HTTP/1.1 requests on it.
    carrying_http1: bool,
    usage: Arc<Usage>,
}

/// How much a shared HTTP/2 connection is used, for its idle timeout; shared by the pool's
/// entry, the task driving the connection and its open streams, the last of which releases the
/// connection's permit. (hyper's own task for the connection outlives the one we drive while
/// streams are open, so that task's end does not mean the connection is closed.)
struct Usage {
    /// Streams opened and ended on it, ever.
    events: AtomicU64,
    /// Streams open now: from the request until its response body ends.
    open: AtomicUsize,
    _permit: OwnedSemaphorePermit,
}

/// A request's stream on a shared HTTP/2 connection, open until dropped.
pub struct OpenStream(Arc<Usage>);

impl OpenStream {
    fn open(usage: &Arc<Usage>) -> Self {
        usage.events.fetch_add(1, Ordering::Relaxed);
        usage.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(usage.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.events.fetch_add(1, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an endpoint's shared HTTP/2 connection is kept (the task driving it looks there).
type SharedSlot = Mutex<Option<SharedHttp2>>;

#[derive(Default)]
pub struct EndpointPool {
    idle: Mutex<Vec<Idle>>,
    shared_http2: Arc<SharedSlot>,
    /// Held while the shared HTTP/2 connection is being opened, so that the requests arriving
    /// meanwhile wait for it rather than each opening one; holds the failure of the last try,
    /// which the requests that waited for it get at once (rather than each trying in turn).
    opening_http2: tokio::sync::Mutex<Option<ConnectFailure>>,
    /// The endpoint's sidecar does not take HTTP/1.1 carried over HTTP/2 (an older version,
    /// or a port declared `tcp`): the requests to it keep HTTP/1.
    refuses_carrying: AtomicBool,
    /// A task is closing this pool's idle connections at their timeout.
    reaper_running: AtomicBool,
}

impl EndpointPool {
    /// Closes the idle connections made under another security than `current`, the one the
    /// reloaded config gives their endpoint (`None`: none may be used); the shared HTTP/2
    /// connection, no longer handed out, closes once its requests in flight are done.
    pub fn close_stale(&self, current: Option<&UpstreamSecurity>) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|entry| Some(&entry.connection.security) == current);
        let mut shared = self
            .shared_http2
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shared
            .as_ref()
            .is_some_and(|shared| Some(&shared.security) != current)
        {
            *shared = None;
        }
    }
}

pub enum AcquireError {
    /// The circuit breaker's limits are reached.
    Overflow,
    Connect(ConnectFailure),
}

/// Leaves the pending count when the wait ends, however it ends.
struct Pending<'a>(&'a ServiceState);

impl<'a> Pending<'a> {
    fn enter(service: &'a ServiceState) -> Option<Self> {
        let max = service.config.connection_pool.max_pending_requests;
        let before = service.pending.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            service.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Pending(service))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection is taken or opened for, besides the endpoint.
struct Opening<'a> {
    service: &'a ServiceState,
    protocol: AppProtocol,
    /// An HTTP/1.1 request to be carried (`protocol` is then HTTP/2).
    carried: bool,
    security: UpstreamSecurity,
    mesh: &'a Mesh,
    timeouts: &'a Timeouts,
    metrics: &'a HttpMetrics,
}

/// A connection to `endpoint` speaking `protocol`: an idle one, a new one, or (at the
/// connection limit) the first one freed while this request waits as pending; the shared
/// HTTP/2 one is opened once for all the requests arriving meanwhile. A request `carriable`
/// (HTTP/1.1 that may ride HTTP/2) gets it when the endpoint is a peer sidecar that takes it
/// and the service's `h2UpgradePolicy` allows (`h1_over_h2`). Failed TLS originations are
/// counted in `metrics`.
pub async fn acquire(
    service: &ServiceState,
    endpoint: &Endpoint,
    protocol: AppProtocol,
    carriable: bool,
    mesh: &Mesh,
    timeouts: &Timeouts,
    metrics: &HttpMetrics,
) -> Result<Connection, AcquireError> {
    let Some(security) = mesh.upstream_security(&service.config, endpoint.addr) else {
        // The routing and this snapshot disagree on the service's `tls`: never plaintext.
        let failure = ConnectFailure {
            reason: FailureReason::TlsHandshakeFailed,
            error: format!(
                "service {}: its `tls` is not built in this config",
                service.config.name
            ),
        };
        metrics.record_tls_origination_failure(&service.config.name, failure.reason.name());
        return Err(AcquireError::Connect(failure));
    };
    let carried = carriable
        && matches!(security, UpstreamSecurity::MeshMtls(_))
        && service.config.connection_pool.carries_http1()
        && !endpoint.pool.refuses_carrying.load(Ordering::Acquire);
    let opening = Opening {
        service,
        protocol: if carried {
            AppProtocol::Http2
        } else {
            protocol
        },
        carried,
        security,
        mesh,
        timeouts,
        metrics,
    };
    if opening.protocol != AppProtocol::Http2 {
        return take_or_open(endpoint, &opening).await;
    }
    if let Some(connection) = reusable(endpoint, &opening) {
        return Ok(connection);
    }
    let pool = &endpoint.pool;
    let (mut last_failure, waited) = match pool.opening_http2.try_lock() {
        Ok(opening) => (opening, false),
        Err(_busy) => (pool.opening_http2.lock().await, true),
    };
    if waited && let Some(failure) = last_failure.as_ref() {
        return Err(AcquireError::Connect(failure.clone()));
    }
    if opening.carried && pool.refuses_carrying.load(Ordering::Acquire) {
        // The connection opened meanwhile told that the peer does not take it.
        drop(last_failure);
        let http1 = Opening {
            protocol: AppProtocol::Http1,
            carried: false,
            ..opening
        };
        return take_or_open(endpoint, &http1).await;
    }
    let acquired = take_or_open(endpoint, &opening).await;
    *last_failure = match &acquired {
        Err(AcquireError::Connect(failure)) => Some(failure.clone()),
        _ => None,
    };
    acquired
}

/// A pooled connection, a new one, or (at the connection limit) the first one freed while
/// this request waits as pending.
async fn take_or_open(
    endpoint: &Endpoint,
    opening: &Opening<'_>,
) -> Result<Connection, AcquireError> {
    let service = opening.service;
    loop {
        if let Some(connection) = reusable(endpoint, opening) {
            return Ok(connection);
        }
        // Boxed: opening (connect, TLS handshake, HTTP handshake) is a large future, rarely
        // awaited; inline, it would size every request's future (boxed per request by
        // `server::serve`), and so each request's allocation.
        if let Ok(permit) = service.connection_permits.clone().try_acquire_owned() {
            return Box::pin(open(endpoint, opening, permit)).await;
        }
        let Some(_pending) = Pending::enter(service) else {
            return Err(AcquireError::Overflow);
        };
        tokio::select! {
            permit = service.connection_permits.clone().acquire_owned() => {
                let permit = permit.map_err(|_closed| AcquireError::Overflow)?;
                return Box::pin(open(endpoint, opening, permit)).await;
            }
            () = service.connection_returned.notified() => {}
        }
    }
}

/// A pooled connection to `endpoint` made under the security in force (and, for a carried
/// request, one the peer takes it on); the idle ones passed over are closed.
fn reusable(endpoint: &Endpoint, opening: &Opening<'_>) -> Option<Connection> {
    let (service, security) = (opening.service, &opening.security);
    let pool = &endpoint.pool;
    if opening.protocol == AppProtocol::Http2 {
        let shared = pool
            .shared_http2
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shared = shared.as_ref().filter(|shared| {
            !shared.sender.is_closed()
                && shared.security == *security
                && (shared.carrying_http1 || !opening.carried)
        })?;
        return Some(Connection {
            sender: Sender::Http2(shared.sender.clone()),
            reused: true,
            requests: 0,
            mtls: shared.mtls.clone(),
            security: shared.security.clone(),
            stream: Some(OpenStream::open(&shared.usage)),
        });
    }
    let idle_timeout = service.config.connection_pool.idle_timeout;
    let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
    // Most recently used first: the warmest connection, the least likely to be closed.
    while let Some(entry) = idle.pop() {
        let open = match &entry.connection.sender {
            Sender::Http1(sender) => sender.is_ready(),
            Sender::Http2(sender) => !sender.is_closed(),
        };
        if open && entry.since.elapsed() < idle_timeout && entry.connection.security == *security {
            return Some(entry.connection);
        }
    }
    None
}

async fn open(
    endpoint: &Endpoint,
    opening: &Opening<'_>,
    permit: OwnedSemaphorePermit,
) -> Result<Connection, AcquireError> {
    let protocol = opening.protocol;
    let established = match &opening.security {
        UpstreamSecurity::OriginatedTls(origination) => {
            let alpn = match protocol {
                AppProtocol::Http2 => Alpn::Http2,
                _ => Alpn::Http1,
            };
            match origination
                .connect(endpoint.addr, alpn, opening.timeouts)
                .await
            {
                Ok(stream) => Established {
                    io: Box::new(stream),
                    mtls: None,
                    carrying_http1: false,
                },
                Err(failure) => {
                    opening.metrics.record_tls_origination_failure(
                        &opening.service.config.name,
                        failure.reason.name(),
                    );
                    return Err(AcquireError::Connect(failure));
                }
            }
        }
        UpstreamSecurity::Plaintext | UpstreamSecurity::MeshMtls(_) => {
            // Any HTTP/2 connection to a peer's sidecar offers to carry HTTP/1.1 too: it is
            // the endpoint's one shared connection.
            let offer = match protocol {
                AppProtocol::Http2 => MeshOffer::CarryingHttp1,
                _ => MeshOffer::Bytes,
            };
            upstream::establish(endpoint.addr, opening.mesh, opening.timeouts, offer)
                .await
                .map_err(AcquireError::Connect)?
        }
    };
    let refused = protocol == AppProtocol::Http2
        && matches!(opening.security, UpstreamSecurity::MeshMtls(_))
        && !established.carrying_http1;
    if refused {
        endpoint
            .pool
            .refuses_carrying
            .store(true, Ordering::Release);
    }
    // A carried request the peer does not take goes as HTTP/1.1 on this connection instead.
    let protocol = if refused && opening.carried {
        AppProtocol::Http1
    } else {
        protocol
    };
    let carrying_http1 = established.carrying_http1;
    let io = TokioIo::new(SmallWritesJoined(established.io));
    let handshake_failed = |error: hyper::Error| {
        AcquireError::Connect(ConnectFailure {
            reason: FailureReason::ConnectError,
            error: format!("HTTP handshake failed: {error}"),
        })
    };
    let addr = endpoint.addr;
    let mut stream = None;
    let sender = if protocol == AppProtocol::Http2 {
        // Every request to the endpoint rides this connection: a peer gone without a reset
        // (its node lost) must not hold them until TCP gives up. A PING unanswered within
        // the timeout, while requests are in flight, closes it (Linkerd pings its peers too).
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
            .max_header_list_size(MAX_HTTP2_HEADER_LIST_BYTES)
            .handshake(io)
            .await
            .map_err(handshake_failed)?;
        let usage = Arc::new(Usage {
            events: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            _permit: permit,
        });
        stream = Some(OpenStream::open(&usage));
        let slot = Arc::downgrade(&endpoint.pool.shared_http2);
        let idle_timeout = opening.service.config.connection_pool.idle_timeout;
        let watched = usage.clone();
        tokio::spawn(async move {
            let mut connection = pin!(connection);
            let ended = tokio::select! {
                ended = &mut connection => {
                    // Closed by the peer or failed: not to be handed out.
                    unshare(&slot, &watched);
                    ended
                }
                () = idle_for(&watched, idle_timeout) => {
                    // No longer handed out, it ends once its open streams are done.
                    unshare(&slot, &watched);
                    connection.await
                }
            };
            if let Err(error) = ended {
                debug!(%addr, %error, "upstream HTTP/2 connection ended with an error");
            }
        });
        *endpoint
            .pool
            .shared_http2
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(SharedHttp2 {
            sender: sender.clone(),
            mtls: established.mtls.clone(),
            security: opening.security.clone(),
            carrying_http1,
            usage,
        });
        Sender::Http2(sender)
    } else {
        let (sender, connection) = http1::Builder::new()
            // The app's header case reaches the server as written (some servers care).
            .preserve_header_case(true)
            .handshake(io)
            .await
            .map_err(handshake_failed)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(%addr, %error, "upstream HTTP/1 connection ended with an error");
            }
            drop(permit);
        });
        Sender::Http1(sender)
    };
    Ok(Connection {
        sender,
        reused: false,
        requests: 0,
        mtls: established.mtls,
        security: opening.security.clone(),
        stream,
    })
}

/// Returns once the shared HTTP/2 connection measured by `usage` has had no stream open and
/// none opened or ended for a whole `idle_timeout`: between one and two timeouts after its last
/// stream ended (checking counts once a timeout costs the requests nothing; stamping a time on
/// each would not).
async fn idle_for(usage: &Usage, idle_timeout: Duration) {
    let mut seen = usage.events.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(idle_timeout).await;
        let events = usage.events.load(Ordering::Relaxed);
        if events == seen && usage.open.load(Ordering::Relaxed) == 0 {
            return;
        }
        seen = events;
    }
}

/// Takes the shared HTTP/2 connection measured by `usage` out of its endpoint's `slot`, if it is
/// still there. A request that took it just before holds its own handle and stream.
fn unshare(slot: &Weak<SharedSlot>, usage: &Arc<Usage>) {
    let Some(slot) = slot.upgrade() else {
        return;
    };
    let mut shared = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if shared
        .as_ref()
        .is_some_and(|shared| Arc::ptr_eq(&shared.usage, usage))
    {
        *shared = None;
    }
}

/// Puts an HTTP/1 connection back once its response is fully read (hyper says it is ready),
/// unless it reached `maxRequestsPerConnection` or a reload changed its security meanwhile.
/// HTTP/2 connections stay shared in the pool. A small response is usually read whole with its
/// head, so the connection is ready at once and goes back without a task of its own.
pub fn release(
    mut connection: Connection,
    service: Arc<ServiceState>,
    endpoint: usize,
    mesh: Arc<MeshHandle>,
) {
    let Sender::Http1(sender) = &connection.sender else {
        return;
    };
    connection.requests += 1;
    let limit = service.config.connection_pool.max_requests_per_connection;
    if limit.is_some_and(|limit| connection.requests >= limit) {
        return;
    }
    if sender.is_ready() {
        put_back(connection, &service, endpoint, &mesh);
        return;
    }
    tokio::spawn(async move {
        let Sender::Http1(sender) = &mut connection.sender else {
            return;
        };
        if sender.ready().await.is_ok() {
            put_back(connection, &service, endpoint, &mesh);
        }
    });
}

/// Pools a connection ready for its next request, if its security is still the one in force.
fn put_back(
    mut connection: Connection,
    service: &Arc<ServiceState>,
    endpoint: usize,
    mesh: &MeshHandle,
) {
    let Some(target) = service.endpoints.get(endpoint) else {
        return;
    };
    connection.reused = true;
    {
        let mut idle = target
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Read under the lock: a reload either shows here, or its sweep of the pool comes
        // after this push.
        let current = mesh
            .current()
            .upstream_security(&service.config, target.addr);
        if current.as_ref() != Some(&connection.security) {
            return;
        }
        idle.push(Idle {
            connection,
            since: Instant::now(),
        });
    }
    service.connection_returned.notify_one();
    if !target.pool.reaper_running.swap(true, Ordering::AcqRel) {
        let service = service.clone();
        tokio::spawn(async move {
            if let Some(target) = service.endpoints.get(endpoint) {
                reap_idle(&service, target).await;
            }
        });
    }
}

/// Closes idle connections as they reach the idle timeout (dropping the sender closes the
/// connection), so the proxy closes before the server does; ends when none is left idle.
async fn reap_idle(service: &ServiceState, endpoint: &Endpoint) {
    let idle_timeout = service.config.connection_pool.idle_timeout;
    loop {
        let next_expiry = {
            let mut idle = endpoint
                .pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            idle.retain(|entry| entry.since.elapsed() < idle_timeout);
            match idle.iter().map(|entry| entry.since).min() {
                Some(oldest) => oldest + idle_timeout,
                None => {
                    // Under the lock: a connection pushed after this starts a new reaper.
                    endpoint.pool.reaper_running.store(false, Ordering::Release);
                    return;
                }
            }
        };
        tokio::time::sleep_until(next_expiry.into()).await;
    }
}
