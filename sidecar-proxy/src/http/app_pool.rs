//! Keep-alive connections to the app, for inbound HTTP. Each is made from the passthrough
//! address (which capture lets through) to the address the peer dialled (the app's pod IP and
//! port). HTTP/1: one request at a time; a connection goes back to its address's idle list
//! once its response has been read, is reused most recent first, and is closed after
//! [`IDLE_TIMEOUT`] idle, below the keep-alive timeout of common servers, so that the proxy is
//! rarely the one reusing a connection the app is closing (when it is, the request is sent
//! again on a new one: `inbound.rs`). HTTP/2: one shared connection per address.
//!
//! An address enters the pool only once the app has accepted a connection there, so a peer
//! trying every port of the pod leaves nothing behind.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::{AppProtocol, MAX_HTTP2_HEADER_LIST_BYTES, body::ProxyBody};
use crate::{
    Timeouts,
    io::small_writes::SmallWritesJoined,
    io::upstream::{self, ConnectFailure, Source},
    telemetry::metrics::FailureReason,
};

/// Below the 5 s keep-alive of Node, Apache and uvicorn: an app connection is local, so making
/// a new one costs little, while reusing one the app is closing fails the request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub enum AppSender {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(http2::SendRequest<ProxyBody>),
}

/// A connection to the app, for one request.
pub struct AppConnection {
    pub sender: AppSender,
    /// It served a request before: the app may have closed it meanwhile.
    pub reused: bool,
    addr: SocketAddr,
}

/// The idle connections of every app address.
#[derive(Default)]
pub struct AppPool {
    apps: Mutex<HashMap<SocketAddr, Arc<AppAddress>>>,
}

/// The pooled connections to one app address.
#[derive(Default)]
struct AppAddress {
    idle: Mutex<Vec<(http1::SendRequest<ProxyBody>, Instant)>>,
    shared_http2: Mutex<Option<http2::SendRequest<ProxyBody>>>,
    /// A task is closing this address's idle connections at their timeout.
    reaper_running: AtomicBool,
}

impl AppPool {
    /// A connection to the app at `addr` speaking `protocol`: an idle one, or a new one.
    pub async fn acquire(
        self: &Arc<Self>,
        addr: SocketAddr,
        protocol: AppProtocol,
        timeouts: &Timeouts,
    ) -> Result<AppConnection, ConnectFailure> {
        if let Some(sender) = self.reusable(addr, protocol) {
            return Ok(AppConnection {
                sender,
                reused: true,
                addr,
            });
        }
        // Boxed: opening a connection is a large future, rarely awaited; inline, it would
        // size (and be copied with) every request's future.
        Box::pin(self.connect(addr, protocol, timeouts)).await
    }

    /// A new connection, pooled after its request like any other.
    pub async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
        protocol: AppProtocol,
        timeouts: &Timeouts,
    ) -> Result<AppConnection, ConnectFailure> {
        let sender = if protocol == AppProtocol::Http2 {
            let sender = open_http2(addr, timeouts).await?;
            *self
                .address(addr)
                .shared_http2
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
            AppSender::Http2(sender)
        } else {
            AppSender::Http1(open_http1(addr, timeouts, false).await?)
        };
        Ok(AppConnection {
            sender,
            reused: false,
            addr,
        })
    }

    /// Takes an HTTP/1 connection back once its response is fully read (hyper then says it is
    /// ready for another request); one the app or the response closed is dropped. HTTP/2
    /// connections stay shared. A small response is usually read whole with its head, so the
    /// connection is ready at once and goes back without a task of its own.
    pub fn release(self: &Arc<Self>, connection: AppConnection) {
        let AppSender::Http1(mut sender) = connection.sender else {
            return;
        };
        if sender.is_ready() {
            self.put_back(connection.addr, sender);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put_back(connection.addr, sender);
            }
        });
    }

    /// Pools a connection ready for its next request.
    fn put_back(&self, addr: SocketAddr, sender: http1::SendRequest<ProxyBody>) {
        let address = self.address(addr);
        address
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((sender, Instant::now()));
        if !address.reaper_running.swap(true, Ordering::AcqRel) {
            tokio::spawn(async move { reap_idle(&address).await });
        }
    }

    fn address(&self, addr: SocketAddr) -> Arc<AppAddress> {
        self.apps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr)
            .or_default()
            .clone()
    }

    /// The most recently used idle connection still open (HTTP/1), or the shared one (HTTP/2).
    fn reusable(&self, addr: SocketAddr, protocol: AppProtocol) -> Option<AppSender> {
        let address = self
            .apps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr)?
            .clone();
        if protocol == AppProtocol::Http2 {
            let shared = address
                .shared_http2
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            return shared
                .as_ref()
                .filter(|sender| !sender.is_closed())
                .map(|sender| AppSender::Http2(sender.clone()));
        }
        let mut idle = address.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((sender, since)) = idle.pop() {
            if sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(AppSender::Http1(sender));
            }
        }
        None
    }
}

/// A connection of its own for an upgrade (WebSocket...): never pooled, as it becomes the
/// upgraded connection.
pub async fn connect_for_upgrade(
    addr: SocketAddr,
    timeouts: &Timeouts,
) -> Result<http1::SendRequest<ProxyBody>, ConnectFailure> {
    open_http1(addr, timeouts, true).await
}

fn handshake_failed(error: hyper::Error) -> ConnectFailure {
    ConnectFailure {
        reason: FailureReason::ConnectError,
        error: format!("HTTP handshake with the app failed: {error}"),
    }
}

async fn open_http1(
    addr: SocketAddr,
    timeouts: &Timeouts,
    upgrades: bool,
) -> Result<http1::SendRequest<ProxyBody>, ConnectFailure> {
    let stream = upstream::connect(addr, Source::Passthrough, timeouts).await?;
    let (sender, connection) = http1::Builder::new()
        // The peer's header case reaches the app as written (some apps care).
        .preserve_header_case(true)
        .handshake(TokioIo::new(SmallWritesJoined(stream)))
        .await
        .map_err(handshake_failed)?;
    tokio::spawn(async move {
        let ended = if upgrades {
            connection.with_upgrades().await
        } else {
            connection.await
        };
        if let Err(error) = ended {
            debug!(%addr, %error, "HTTP/1 connection to the app ended with an error");
        }
    });
    Ok(sender)
}

async fn open_http2(
    addr: SocketAddr,
    timeouts: &Timeouts,
) -> Result<http2::SendRequest<ProxyBody>, ConnectFailure> {
    let stream = upstream::connect(addr, Source::Passthrough, timeouts).await?;
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(MAX_HTTP2_HEADER_LIST_BYTES)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(handshake_failed)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%addr, %error, "HTTP/2 connection to the app ended with an error");
        }
    });
    Ok(sender)
}

/// Closes idle connections as they reach the idle timeout (dropping the sender closes the
/// connection); ends when none is left idle.
async fn reap_idle(address: &AppAddress) {
    loop {
        let next_expiry = {
            let mut idle = address.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|(_, since)| since.elapsed() < IDLE_TIMEOUT);
            match idle.iter().map(|(_, since)| *since).min() {
                Some(oldest) => oldest + IDLE_TIMEOUT,
                None => {
                    // Under the lock: a connection pushed after this starts a new reaper.
                    address.reaper_running.store(false, Ordering::Release);
                    return;
                }
            }
        };
        tokio::time::sleep_until(next_expiry.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::testing::{LOCALHOST, timeouts};

    #[tokio::test]
    async fn an_address_enters_the_pool_only_once_the_app_accepted_a_connection_there()
    -> anyhow::Result<()> {
        let pool = Arc::new(AppPool::default());
        let closed = TcpListener::bind((LOCALHOST, 0)).await?.local_addr()?;
        for protocol in [AppProtocol::Http1, AppProtocol::Http2] {
            assert!(pool.acquire(closed, protocol, &timeouts()).await.is_err());
        }
        assert!(
            pool.apps
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        );

        let app = TcpListener::bind((LOCALHOST, 0)).await?;
        let addr = app.local_addr()?;
        let connection = pool.acquire(addr, AppProtocol::Http2, &timeouts()).await;
        assert!(connection.is_ok_and(|connection| !connection.reused));
        assert!(
            pool.apps
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&addr)
        );
        Ok(())
    }
}
