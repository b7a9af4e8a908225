//! `--exit-when-idle-after`: for a Job's pod where the proxy cannot be a native sidecar
//! (podman, plain containers, Kubernetes before 1.29), the proxy stops by itself once the app
//! is done, which it tells by the app's own connections: none open for the given time, after
//! at least one. Then it drains as on SIGTERM.
//!
//! Only the app's outbound connections count: inbound ones (scrapes, callers) are other
//! workloads' doing and say nothing about whether the app is done. Waiting for a first
//! connection keeps a Job that computes before it calls anyone from losing its proxy; an app
//! that never connects through the proxy needs `POST /quitquitquit` instead.
use std::{sync::Arc, time::Duration};

use tokio::{
    sync::watch,
    time::{Instant, sleep_until},
};
use tracing::info;

/// The app's open connections, and since when there has been none.
pub struct AppActivity {
    usage: watch::Sender<Usage>,
    /// How long without a connection means the app is done.
    period: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    open: usize,
    /// Set when the last open connection closed; `None` while one is open, or before the first.
    idle_since: Option<Instant>,
}

/// One of the app's connections, open until dropped.
pub struct OpenConnection(Arc<AppActivity>);

impl AppActivity {
    pub fn new(period: Duration) -> AppActivity {
        AppActivity {
            usage: watch::Sender::default(),
            period,
        }
    }

    pub fn opened(self: &Arc<Self>) -> OpenConnection {
        self.usage.send_modify(|usage| {
            usage.open += 1;
            usage.idle_since = None;
        });
        OpenConnection(self.clone())
    }

    /// Completes once the app has had no connection open for the period, after at least one.
    pub async fn done(&self) {
        let mut usage = self.usage.subscribe();
        loop {
            let idle_since = usage.borrow_and_update().idle_since;
            // (No deadline when the period goes beyond the clock's range: never.)
            let deadline = idle_since.and_then(|since| since.checked_add(self.period));
            // The sender lives as long as `self`: `changed` never fails here.
            match deadline {
                Some(deadline) => tokio::select! {
                    () = sleep_until(deadline) => {
                        let period = humantime::format_duration(self.period);
                        info!("no connection of the app for {period}: it is done");
                        return;
                    }
                    _ = usage.changed() => {}
                },
                None => {
                    let _ = usage.changed().await;
                }
            }
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.usage.send_modify(|usage| {
            usage.open -= 1;
            if usage.open == 0 {
                usage.idle_since = Some(Instant::now());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(30);

    /// Whether `done` completes within `within`.
    async fn done_within(activity: &AppActivity, within: Duration) -> bool {
        tokio::time::timeout(within, activity.done()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn never_idle_before_the_first_connection() {
        let activity = AppActivity::new(PERIOD);
        assert!(!done_within(&activity, Duration::from_secs(24 * 3600)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_once_no_connection_has_been_open_for_the_period() {
        let activity = Arc::new(AppActivity::new(PERIOD));
        let first = activity.opened();
        let second = activity.opened();
        drop(first);
        // One still open, however long.
        assert!(!done_within(&activity, Duration::from_secs(3600)).await);
        drop(second);
        let closed = Instant::now();
        activity.done().await;
        assert_eq!(closed.elapsed(), PERIOD);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_within_the_period_starts_it_again() {
        let activity = Arc::new(AppActivity::new(PERIOD));
        drop(activity.opened());
        let waiting = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.done().await })
        };
        tokio::time::sleep(PERIOD - Duration::from_secs(1)).await;
        let again = activity.opened();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(again);
        let closed = Instant::now();
        waiting.await.expect("the waiting task");
        assert_eq!(closed.elapsed(), PERIOD);
    }
}
