//! Stopping without cutting the app's last requests: Istio's `terminationDrainDuration` and
//! `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` together.
//!
//! The first stop request (SIGTERM, SIGINT, `POST /quitquitquit`, or the app idle for
//! `--exit-when-idle-after`) starts the drain: readiness fails at once, the listeners stay open
//! (the app's connections made while it shuts down are still served), and every HTTP
//! connection is asked to finish (`http::serve`): HTTP/1 answers its request in flight with
//! `Connection: close`, or is closed at once when idle between requests, as Go's
//! `Server.Shutdown` does; HTTP/2 gets GOAWAY and finishes its streams. A connection that has
//! not carried a request yet is asked once its first one arrives: the app opened it to send
//! one. Relayed TCP (and upgraded HTTP) is left to end by itself.
//!
//! The proxy exits as soon as no data-path connection is left, at the end of the drain period
//! with whatever is left, or at a second stop request, at once. The admin listeners' connections
//! (probes, scrapes) do not count, as Istio counts only downstream connections.
use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::Notify,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

/// Whether the proxy is draining, and the data-path connections it waits for.
#[derive(Default)]
pub struct Drain {
    started: CancellationToken,
    /// Every data-path connection's task (accepted, and upgraded HTTP).
    connections: TaskTracker,
}

impl Drain {
    /// Serves one connection in a task the drain waits for.
    pub fn spawn(&self, connection: impl Future<Output = ()> + Send + 'static) {
        self.connections.spawn(connection);
    }

    /// Completes once the drain has started (at once if it has).
    pub async fn started(&self) {
        self.started.cancelled().await;
    }

    /// Data-path connections open now.
    pub fn active(&self) -> usize {
        self.connections.len()
    }

    /// Drains for at most `period`; returns once no connection is left, when the period is
    /// over, or when `second_request` (the next stop request) completes.
    pub async fn run(&self, period: Duration, second_request: impl Future<Output = &'static str>) {
        self.started.cancel();
        self.connections.close();
        info!(
            ?period,
            active_connections = self.active(),
            "draining: readiness fails, listeners stay open, HTTP connections are asked to close"
        );
        tokio::select! {
            () = self.connections.wait() => info!("drained: no connection left; exiting"),
            () = tokio::time::sleep(period) => warn!(
                left = self.active(),
                "drain period over: exiting, closing the connections left"
            ),
            why = second_request => warn!(
                why,
                left = self.active(),
                "a second stop request: exiting at once"
            ),
        }
    }
}

/// What asks the proxy to stop: SIGTERM (the kubelet, podman), SIGINT (a terminal), and
/// `POST /quitquitquit`.
pub struct StopRequests {
    terminate: Signal,
    interrupt: Signal,
    quit: Arc<Notify>,
}

impl StopRequests {
    /// Installs the signal handlers; from here, these signals no longer kill the process.
    pub fn install(quit: Arc<Notify>) -> io::Result<StopRequests> {
        Ok(StopRequests {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            quit,
        })
    }

    /// The next request, named for the log.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
            () = self.quit.notified() => "POST /quitquitquit",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::{pending, ready};

    use tokio::{sync::oneshot, time::Instant};

    use super::*;

    /// A connection that stays open until the returned sender is used or dropped.
    fn open_connection(drain: &Drain) -> oneshot::Sender<()> {
        let (close, closed) = oneshot::channel::<()>();
        drain.spawn(async move {
            let _ = closed.await;
        });
        close
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_ends_as_soon_as_no_connection_is_left() {
        let drain = Drain::default();
        let close = open_connection(&drain);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(close);
        });
        let started = Instant::now();
        drain.run(Duration::from_secs(5), pending()).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(drain.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_connections_the_drain_ends_at_once() {
        let drain = Drain::default();
        let started = Instant::now();
        drain.run(Duration::from_secs(5), pending()).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_accepted_while_draining_is_waited_for_too() {
        let drain = Arc::new(Drain::default());
        let first = open_connection(&drain);
        let running = drain.clone();
        let started = Instant::now();
        let drained =
            tokio::spawn(async move { running.run(Duration::from_secs(5), pending()).await });
        drain.started().await;
        let late = open_connection(&drain);
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(late);
        drained.await.expect("the drain task");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_period_bounds_the_drain() {
        let drain = Drain::default();
        let _open = open_connection(&drain);
        let started = Instant::now();
        drain.run(Duration::from_secs(5), pending()).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(drain.active(), 1, "left to the runtime's end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_stop_request_ends_the_drain_at_once() {
        let drain = Drain::default();
        let _open = open_connection(&drain);
        let started = Instant::now();
        drain.run(Duration::from_secs(5), ready("SIGINT")).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
