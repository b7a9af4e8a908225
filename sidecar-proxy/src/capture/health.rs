//! Is this pod's capture still in place? A pod whose capture vanished (its pins removed, a
//! cleanup run by mistake) would run unmeshed with nothing to show for it, the bypass Istio
//! users still report. The proxy has no BPF privilege, so it asks the kernel the way any
//! socket can: `getsockopt(SOL_IP, CAPTURE_STATUS_OPTNAME)`, answered by the capture's
//! getsockopt program, which is attached to the pod's cgroup with the others and removed with
//! them (the kernel refuses the unknown option without it). Checked at start and every
//! `--capture-check-interval`: `sidecar_capture_active{direction}`, a log line on each change,
//! and readiness 503 while outbound capture is missing. When `init` puts a vanished capture
//! back, its maps are new: the listeners listen again to register with them
//! (`accept/listener.rs`).
use std::{
    io,
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::ValueEnum;
use rustix::net::{AddressFamily, SocketType, socket};
use sidecar_common::CaptureStatus;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{capture::CaptureProbe, telemetry::metrics::Metrics};

/// Whether the proxy expects eBPF capture in its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CaptureCheck {
    /// Check once the capture has been seen (so iptables capture, or none, is never flagged).
    Auto,
    /// eBPF capture is required: not ready without it, from the start.
    Ebpf,
    /// No check.
    Off,
}

/// What the capture's getsockopt program says, or `None` when no program answered.
pub fn capture_status(capture: &dyn CaptureProbe) -> io::Result<Option<CaptureStatus>> {
    let probe = socket(AddressFamily::INET, SocketType::STREAM, None)?;
    capture.status_of(probe.as_fd())
}

/// What the watch reports to.
pub struct Watch {
    pub mode: CaptureCheck,
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
    /// What readiness reads.
    pub capture_ok: Arc<AtomicBool>,
    /// Bumped when the capture came back after it vanished.
    pub reinstalled: watch::Sender<u64>,
    /// How the capture is asked.
    pub capture: Arc<dyn CaptureProbe>,
}

/// Checks now and every `interval`, forever.
pub async fn watch(settings: Watch) {
    let Watch {
        mode,
        interval,
        metrics,
        capture_ok,
        reinstalled,
        capture,
    } = settings;
    if mode == CaptureCheck::Off {
        return;
    }
    let mut expected = mode == CaptureCheck::Ebpf;
    let mut last: Option<Option<u32>> = None;
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let flags = match capture_status(&*capture) {
            Ok(status) => status.map(|status| status.flags),
            Err(error) => {
                warn!(%error, "cannot check this pod's capture");
                continue;
            }
        };
        expected |= flags.is_some();
        if !expected {
            continue; // auto, and no eBPF capture seen yet: iptables, or none
        }
        let outbound = flags.is_some_and(|f| f & CaptureStatus::OUTBOUND != 0);
        let inbound = flags.is_some_and(|f| f & CaptureStatus::INBOUND != 0);
        metrics.set_capture_active(outbound, inbound);
        capture_ok.store(outbound, Ordering::Release);
        if last != Some(flags) {
            if last == Some(None) && flags.is_some() {
                reinstalled.send_modify(|count| *count += 1);
            }
            if outbound {
                info!(outbound, inbound, "this pod's eBPF capture is in place");
            } else {
                warn!(
                    "this pod's eBPF capture is gone (its programs are no longer attached, or \
                     not configured): the app's traffic is not meshed; not ready until \
                     `sidecar init` puts it back"
                );
            }
        }
        last = Some(flags);
    }
}
