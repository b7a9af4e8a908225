//! Listeners and accept loops, shared by the outbound and inbound sides.
use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use rustix::{io::Errno, net::sockopt};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::{
    accept::connection_limit::{Admission, ConnectionLimit},
    io::keepalive,
    io::upstream::reset,
    lifecycle::drain::Drain,
    telemetry::metrics::Direction,
};

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
const BACKLOG: u32 = 1024;

/// Binds `port` on each address. An IPv6 address is skipped with a warning when the host has
/// IPv6 disabled; anything else that fails to bind is an error, as is binding nothing at all.
/// IPv6 listeners are IPv6-only, so `0.0.0.0` and `::` can share a port.
pub fn bind_listeners(
    direction: Direction,
    ips: &[IpAddr],
    port: u16,
) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(ips.len());
    for &ip in ips {
        let addr = SocketAddr::new(ip, port);
        match bind(addr) {
            Ok(listener) => {
                let addr = listener.local_addr()?;
                info!(%addr, direction = direction.name(), "listening");
                listeners.push(listener);
            }
            Err(error) if ip.is_ipv6() && ipv6_unavailable(&error) => {
                warn!(%addr, %error, "IPv6 is disabled on this host; not listening on it");
            }
            Err(error) => bail!("cannot listen on {addr}: {error}"),
        }
    }
    if listeners.is_empty() {
        bail!(
            "no {} listener could be bound on {ips:?} port {port}",
            direction.name()
        );
    }
    Ok(listeners)
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let socket = TcpSocket::new_v6()?;
            sockopt::set_ipv6_v6only(&socket, true)?;
            socket
        }
    };
    // As std's bind does: a restarted proxy must not wait out TIME_WAIT on its own port.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Closes `listener` and listens on its address again: a new listen() is what registers a
/// listener with the capture's new maps. The port is free at once (a listener leaves no
/// TIME_WAIT), and only the proxy may bind it (the capture's port guard).
fn listen_again(listener: TcpListener) -> Option<TcpListener> {
    let addr = listener.local_addr().ok()?;
    drop(listener);
    match bind(addr) {
        Ok(listener) => {
            info!(%addr, "listening again: registered with the re-installed capture");
            Some(listener)
        }
        Err(error) => {
            warn!(%addr, %error, "cannot listen again after the capture was re-installed");
            None
        }
    }
}

/// EADDRNOTAVAIL: `::1` is missing (disable_ipv6); EAFNOSUPPORT: no IPv6 in the kernel.
fn ipv6_unavailable(error: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(error),
        Some(Errno::ADDRNOTAVAIL | Errno::AFNOSUPPORT)
    )
}

/// A connection whose original destination is one of our listeners would loop forever (each
/// hop accepted again by us). Loopback and unspecified addresses reach the listener whatever
/// its bound address, as does the address the connection arrived on.
pub fn is_own_listener(
    listen_addrs: &[SocketAddr],
    orig_dst: SocketAddr,
    accepted: &TcpStream,
) -> bool {
    if !listen_addrs.iter().any(|l| l.port() == orig_dst.port()) {
        return false;
    }
    let ip = orig_dst.ip().to_canonical();
    ip.is_loopback()
        || ip.is_unspecified()
        || listen_addrs.iter().any(|l| l.ip() == ip)
        || accepted
            .local_addr()
            .is_ok_and(|local| local.ip().to_canonical() == ip)
}

/// What handles each accepted connection of a listener.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send;
}

/// The accept loops of every listener, run until shutdown.
#[derive(Default)]
pub struct AcceptLoops(JoinSet<()>);

/// What every connection accepted by a group of listeners (one data-path side) shares.
pub struct Accepting {
    /// Their open connections, together (v4 and v6 listeners share one cap).
    pub limit: Arc<ConnectionLimit>,
    /// TCP keepalive on each accepted connection (set on the listeners, which their accepted
    /// sockets inherit): idle time before the first probe.
    pub tcp_keepalive: Option<Duration>,
    /// Serves each connection, and knows when none is left.
    pub drain: Arc<Drain>,
    /// Changes when this pod's capture was re-installed after it vanished: its maps are new,
    /// so each listener listens again to register (`capture/health.rs`).
    pub relisten: Option<watch::Receiver<u64>>,
}

/// What an accept loop woke up for.
enum Event {
    Accepted(io::Result<(TcpStream, SocketAddr)>),
    CaptureReinstalled,
    NoMoreReinstalls,
}

impl AcceptLoops {
    pub fn add<H: Handler>(
        &mut self,
        listeners: Vec<TcpListener>,
        handler: Arc<H>,
        accepting: Accepting,
    ) {
        let accepting = Arc::new(accepting);
        for listener in listeners {
            self.0
                .spawn(accept_loop(listener, handler.clone(), accepting.clone()));
        }
    }

    /// Accepts until `stopped` completes: the listeners stay open while the proxy drains.
    /// Connections still open then are left to the runtime, which closes them when dropped.
    pub async fn run_until(mut self, stopped: impl Future<Output = ()>) {
        tokio::select! {
            () = stopped => info!("stopped: no longer accepting connections"),
            Some(ended) = self.0.join_next() => {
                // An accept loop only ends by panicking; a proxy missing a listener must not
                // keep looking healthy.
                warn!(error = ?ended.err(), "an accept loop ended unexpectedly; stopping");
            }
        }
        self.0.shutdown().await;
    }
}

async fn accept_loop<H: Handler>(
    mut listener: TcpListener,
    handler: Arc<H>,
    accepting: Arc<Accepting>,
) {
    keepalive::configure_listener(&listener, accepting.tcp_keepalive);
    let mut relisten = accepting.relisten.clone();
    loop {
        let event = match relisten.as_mut() {
            Some(reinstalls) => tokio::select! {
                accepted = listener.accept() => Event::Accepted(accepted),
                changed = reinstalls.changed() => match changed {
                    Ok(()) => Event::CaptureReinstalled,
                    Err(_) => Event::NoMoreReinstalls,
                },
            },
            None => Event::Accepted(listener.accept().await),
        };
        let accepted = match event {
            Event::Accepted(accepted) => accepted,
            Event::CaptureReinstalled => {
                match listen_again(listener) {
                    Some(new) => {
                        keepalive::configure_listener(&new, accepting.tcp_keepalive);
                        listener = new;
                    }
                    None => return, // a proxy missing a listener stops (see run_until)
                }
                continue;
            }
            Event::NoMoreReinstalls => {
                relisten = None;
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                // Data-path limits refuse (WhenFull::RefuseNew): none closes a proxied
                // connection to make room.
                let admitted = match accepting.limit.admit() {
                    Admission::Admitted(admitted)
                    | Admission::AdmittedAfterClosingOldest(admitted) => admitted,
                    Admission::Refused => {
                        debug!(%peer, "listener full: connection reset");
                        reset(stream);
                        continue;
                    }
                };
                // TCP_NODELAY and keepalive come from the listener (`keepalive`).
                let handler = handler.clone();
                accepting.drain.spawn(async move {
                    handler.handle(stream, peer).await;
                    drop(admitted);
                });
            }
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Addresses of `listeners`, e.g. for [`is_own_listener`].
pub fn local_addrs(listeners: &[TcpListener]) -> anyhow::Result<Vec<SocketAddr>> {
    listeners
        .iter()
        .map(|l| l.local_addr().context("listener address"))
        .collect()
}
