//! Caps on the connections each listener holds open, so that no listener (and no client
//! opening connections it never uses) can take every file descriptor of the proxy: with the
//! descriptors gone, every listener stops accepting and every upstream connect fails.
//!
//! Two behaviours when a listener is full:
//! - the data path (outbound, inbound) refuses the new connection with a RST, as Envoy's
//!   listener connection limit does (`downstream_cx_overflow`): the connections already
//!   proxied carry on, the new one fails at once;
//! - the admin listeners (readiness, metrics, admin) close their *oldest* connection to make
//!   room. Their requests take microseconds, so a connection that has been open longest is an
//!   idle keep-alive or a client that never finished its request; and the newest one is the one
//!   that matters: the kubelet's probe, which must not fail because someone else holds the port.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::Notify;
use tracing::warn;

use crate::telemetry::metrics::ListenerMetrics;

/// Descriptors left for everything that is not a connection: the listeners themselves, the
/// mesh config and certificate files and their watches, the runtime, logs.
const SPARE_FDS: u64 = 128;
/// A proxied connection holds two descriptors: the downstream and the upstream.
const FDS_PER_CONNECTION: u64 = 2;
/// A pipe of the splice relay holds two: its read and write ends.
const FDS_PER_PIPE: u64 = 2;
/// The splice relay's pipes may take one descriptor in this many. A pipe is held only while
/// bytes are in flight, not for a connection's life, so far fewer are needed than connections.
const PIPE_SHARE: u64 = 8;
/// And never more pipes than this: their buffers are charged to the proxy's user, whose budget
/// (`fs.pipe-user-pages-soft`, 64 MiB by default) every proxy of that user on the node
/// shares. Bytes in flight beyond it are copied.
const MAX_PIPES: u64 = 1024;
/// The data path has two sides (outbound, inbound), each with its own cap.
const DATA_PATH_SIDES: u64 = 2;
/// The least a side is given, however low the open-file limit.
const MIN_DATA_PATH_CAP: usize = 64;

/// What a full listener does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuses it (RST), counted as overflow.
    RefuseNew,
    /// Closes the oldest open connection to make room, counted as overflow.
    CloseOldest,
}

/// The open connections of one listener (or of the listeners of one data-path side).
pub struct ConnectionLimit {
    max: usize,
    when_full: WhenFull,
    metrics: ListenerMetrics,
    /// Open connections by admission order (oldest first), each with its eviction signal.
    open: Mutex<Open>,
    /// Set while full, so overflow is logged once per episode, not per connection.
    full: AtomicBool,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    connections: BTreeMap<u64, Arc<Notify>>,
}

/// The place of an admitted connection; it leaves the listener's count when dropped.
pub struct Admitted {
    id: u64,
    evicted: Arc<Notify>,
    limit: Arc<ConnectionLimit>,
}

/// The outcome of [`ConnectionLimit::admit`].
pub enum Admission {
    Admitted(Admitted),
    /// Admitted after closing the oldest connection (which closes when its task next runs).
    AdmittedAfterClosingOldest(Admitted),
    Refused,
}

impl ConnectionLimit {
    pub fn new(max: usize, when_full: WhenFull, metrics: ListenerMetrics) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            max: max.max(1),
            when_full,
            metrics,
            open: Mutex::new(Open::default()),
            full: AtomicBool::new(false),
        })
    }

    pub fn metrics(&self) -> &ListenerMetrics {
        &self.metrics
    }

    /// Makes room for a new connection, or refuses it, as the listener's [`WhenFull`] says.
    pub fn admit(self: &Arc<Self>) -> Admission {
        self.metrics.accepted.inc();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed_oldest = false;
        if open.connections.len() >= self.max {
            self.metrics.overflow.inc();
            if !self.full.swap(true, Ordering::Relaxed) {
                warn!(
                    listener = self.metrics.name,
                    max = self.max,
                    when_full = ?self.when_full,
                    "listener full: connections beyond its cap are refused or replace the oldest"
                );
            }
            match self.when_full {
                WhenFull::RefuseNew => return Admission::Refused,
                WhenFull::CloseOldest => {
                    if let Some((_, oldest)) = open.connections.pop_first() {
                        // A stored permit: the signal is not lost if its task is not waiting yet.
                        oldest.notify_one();
                        closed_oldest = true;
                    }
                }
            }
        } else if open.connections.len() + 1 < self.max {
            self.full.store(false, Ordering::Relaxed);
        }
        let id = open.next_id;
        open.next_id += 1;
        let evicted = Arc::new(Notify::new());
        open.connections.insert(id, evicted.clone());
        self.metrics.connections.set(gauge(open.connections.len()));
        let admitted = Admitted {
            id,
            evicted,
            limit: self.clone(),
        };
        if closed_oldest {
            Admission::AdmittedAfterClosingOldest(admitted)
        } else {
            Admission::Admitted(admitted)
        }
    }
}

impl Admitted {
    /// Completes when the listener closed this connection to make room for a newer one.
    pub async fn closed_to_make_room(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .limit
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.connections.remove(&self.id);
        self.limit
            .metrics
            .connections
            .set(gauge(open.connections.len()));
    }
}

fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The default cap of each data-path side: what the open-file limit leaves once the admin
/// listeners are full, the splice relay's pipes ([`max_pipes`]) and [`SPARE_FDS`] are set
/// aside, shared by the two sides at two descriptors per connection. With the usual container
/// limit (1048576) that is about 261500 per side; with 1024, 96. `None` (no limit): no cap.
pub fn data_path_cap(open_file_limit: Option<u64>, admin_fds: usize) -> usize {
    let Some(limit) = open_file_limit else {
        return usize::MAX;
    };
    let pipe_fds = max_pipes(open_file_limit) as u64 * FDS_PER_PIPE;
    let left = limit
        .saturating_sub(admin_fds as u64)
        .saturating_sub(pipe_fds)
        .saturating_sub(SPARE_FDS);
    let cap = left / FDS_PER_CONNECTION / DATA_PATH_SIDES;
    usize::try_from(cap)
        .unwrap_or(usize::MAX)
        .max(MIN_DATA_PATH_CAP)
}

/// How many pipes the splice relay may hold open at once: [`PIPE_SHARE`] of the open-file
/// limit, at most [`MAX_PIPES`]. With 1024 descriptors, 64.
pub fn max_pipes(open_file_limit: Option<u64>) -> usize {
    let pipes = open_file_limit.map_or(MAX_PIPES, |limit| {
        (limit / PIPE_SHARE / FDS_PER_PIPE).min(MAX_PIPES)
    });
    usize::try_from(pipes).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{telemetry::metrics::Metrics, testing::local};

    fn limit(max: usize, when_full: WhenFull) -> anyhow::Result<(Arc<ConnectionLimit>, Metrics)> {
        let metrics = Metrics::new(&local("w"))?;
        let listener = metrics.listener("test", max);
        Ok((ConnectionLimit::new(max, when_full, listener), metrics))
    }

    #[test]
    fn a_full_data_path_listener_refuses_until_a_connection_closes() -> anyhow::Result<()> {
        let (limit, _metrics) = limit(2, WhenFull::RefuseNew)?;
        let Admission::Admitted(first) = limit.admit() else {
            panic!("room for the first")
        };
        let Admission::Admitted(_second) = limit.admit() else {
            panic!("room for the second")
        };
        assert!(matches!(limit.admit(), Admission::Refused));
        assert_eq!(limit.metrics().overflow.get(), 1);
        assert_eq!(limit.metrics().connections.get(), 2);
        drop(first);
        assert_eq!(limit.metrics().connections.get(), 1);
        assert!(matches!(limit.admit(), Admission::Admitted(_)));
        // Every accepted connection counts, the refused one included (Envoy's downstream_cx_total).
        assert_eq!(limit.metrics().accepted.get(), 4);
        Ok(())
    }

    #[tokio::test]
    async fn a_full_admin_listener_closes_its_oldest_connection() -> anyhow::Result<()> {
        let (limit, _metrics) = limit(2, WhenFull::CloseOldest)?;
        let Admission::Admitted(oldest) = limit.admit() else {
            panic!("room")
        };
        let Admission::Admitted(middle) = limit.admit() else {
            panic!("room")
        };
        let Admission::AdmittedAfterClosingOldest(newest) = limit.admit() else {
            panic!("the oldest makes room")
        };
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            oldest.closed_to_make_room(),
        )
        .await?;
        assert_eq!(limit.metrics().overflow.get(), 1);
        assert_eq!(limit.metrics().connections.get(), 2);
        drop(oldest);
        assert_eq!(limit.metrics().connections.get(), 2, "already counted out");
        let Admission::AdmittedAfterClosingOldest(_) = limit.admit() else {
            panic!("the next oldest makes room")
        };
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            middle.closed_to_make_room(),
        )
        .await?;
        drop(newest);
        Ok(())
    }

    #[test]
    fn the_data_path_shares_what_the_open_file_limit_leaves() {
        // 1024 - 384 admin - 128 pipe descriptors - 128 spare, at 2 per connection, 2 sides.
        assert_eq!(data_path_cap(Some(1024), 3 * 128), 96);
        assert_eq!(data_path_cap(Some(1_048_576), 3 * 128), 261_504);
        assert_eq!(data_path_cap(Some(256), 3 * 128), MIN_DATA_PATH_CAP);
        assert_eq!(data_path_cap(None, 3 * 128), usize::MAX);
    }

    #[test]
    fn splice_pipes_take_a_bounded_share_of_the_descriptors() {
        assert_eq!(max_pipes(Some(1024)), 64);
        assert_eq!(max_pipes(Some(1_048_576)), 1024);
        assert_eq!(max_pipes(Some(8)), 0);
        assert_eq!(max_pipes(None), 1024);
    }
}
