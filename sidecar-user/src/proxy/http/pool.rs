//! Pooled upstream connections of one endpoint, within the service's circuit breaker: at most
//! `maxConnections` open (one semaphore permit each, held by the connection's task), at most
//! `maxPendingRequests` waiting for one (beyond: overflow, 503 UO). Idle HTTP/1 connections are
//! closed after `idleTimeout`, below the apps' own keep-alive timeouts, so the proxy is not the
//! one reusing a connection the app is closing; HTTP/2 connections are shared.
use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use super::{
    balancer::{Endpoint, ServiceState},
    body::ProxyBody,
    detect::AppProtocol,
};
use crate::proxy::{
    Timeouts,
    mesh::Mesh,
    metrics::FailureReason,
    upstream::{self, ConnectFailure, MutualTls},
};

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
}

struct Idle {
    connection: Connection,
    since: Instant,
}

#[derive(Default)]
pub struct EndpointPool {
    idle: Mutex<Vec<Idle>>,
    shared_http2: Mutex<Option<(http2::SendRequest<ProxyBody>, Option<MutualTls>)>>,
    /// A task is closing this pool's idle connections at their timeout.
    reaper_running: AtomicBool,
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

/// A connection to `endpoint` speaking `protocol`: an idle one, a new one, or (at the
/// connection limit) the first one freed while this request waits as pending.
pub async fn acquire(
    service: &ServiceState,
    endpoint: &Endpoint,
    protocol: AppProtocol,
    mesh: &Mesh,
    timeouts: &Timeouts,
) -> Result<Connection, AcquireError> {
    loop {
        if let Some(connection) = reusable(service, endpoint, protocol) {
            return Ok(connection);
        }
        if let Ok(permit) = service.connection_permits.clone().try_acquire_owned() {
            return open(endpoint, protocol, mesh, timeouts, permit).await;
        }
        let Some(_pending) = Pending::enter(service) else {
            return Err(AcquireError::Overflow);
        };
        tokio::select! {
            permit = service.connection_permits.clone().acquire_owned() => {
                let permit = permit.map_err(|_closed| AcquireError::Overflow)?;
                return open(endpoint, protocol, mesh, timeouts, permit).await;
            }
            () = service.connection_returned.notified() => {}
        }
    }
}

fn reusable(
    service: &ServiceState,
    endpoint: &Endpoint,
    protocol: AppProtocol,
) -> Option<Connection> {
    let pool = &endpoint.pool;
    if protocol == AppProtocol::Http2 {
        let shared = pool
            .shared_http2
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (sender, mtls) = shared.as_ref().filter(|(sender, _)| !sender.is_closed())?;
        return Some(Connection {
            sender: Sender::Http2(sender.clone()),
            reused: true,
            requests: 0,
            mtls: mtls.clone(),
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
        if open && entry.since.elapsed() < idle_timeout {
            return Some(entry.connection);
        }
    }
    None
}

async fn open(
    endpoint: &Endpoint,
    protocol: AppProtocol,
    mesh: &Mesh,
    timeouts: &Timeouts,
    permit: OwnedSemaphorePermit,
) -> Result<Connection, AcquireError> {
    let established = upstream::establish(endpoint.addr, mesh, timeouts)
        .await
        .map_err(AcquireError::Connect)?;
    let io = TokioIo::new(established.io);
    let handshake_failed = |error: hyper::Error| {
        AcquireError::Connect(ConnectFailure {
            reason: FailureReason::ConnectError,
            error: format!("HTTP handshake failed: {error}"),
        })
    };
    let addr = endpoint.addr;
    let sender = if protocol == AppProtocol::Http2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(handshake_failed)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, %error, "upstream HTTP/2 connection ended with an error");
            }
            drop(permit);
        });
        *endpoint
            .pool
            .shared_http2
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some((sender.clone(), established.mtls.clone()));
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
    })
}

/// Puts an HTTP/1 connection back once its response is fully read (hyper says it is ready),
/// unless it reached `maxRequestsPerConnection`. HTTP/2 connections stay shared in the pool.
pub fn release(mut connection: Connection, service: Arc<ServiceState>, endpoint: usize) {
    if matches!(connection.sender, Sender::Http2(_)) {
        return;
    }
    connection.requests += 1;
    let limit = service.config.connection_pool.max_requests_per_connection;
    if limit.is_some_and(|limit| connection.requests >= limit) {
        return;
    }
    tokio::spawn(async move {
        let Sender::Http1(sender) = &mut connection.sender else {
            return;
        };
        if sender.ready().await.is_err() {
            return;
        }
        let Some(target) = service.endpoints.get(endpoint) else {
            return;
        };
        connection.reused = true;
        target
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Idle {
                connection,
                since: Instant::now(),
            });
        service.connection_returned.notify_one();
        if !target.pool.reaper_running.swap(true, Ordering::AcqRel) {
            reap_idle(&service, target).await;
        }
    });
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
