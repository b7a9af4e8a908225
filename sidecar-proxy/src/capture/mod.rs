//! What the proxy asks of this pod's capture but does not do itself: the capture's getsockopt
//! option is read with a raw `getsockopt` (`unsafe`), and its pinned counters with the BPF
//! library, both kept out of this crate (`sidecar-capture` has them). The binary gives the
//! real probe when it starts the proxy; tests give a fake.
//!
//! `health`: whether this pod's capture is in place, checked at start and on an interval.
pub(crate) mod health;

use std::{io, os::fd::BorrowedFd, path::Path};

use sidecar_common::CaptureStatus;

pub trait CaptureProbe: Send + Sync {
    /// What the capture's getsockopt program says, asked on `socket` (it answers on any socket
    /// of the pod), or `None` when no program answered.
    fn status_of(&self, socket: BorrowedFd<'_>) -> io::Result<Option<CaptureStatus>>;

    /// The capture's kernel counters pinned under `bpffs_root`, summed over CPUs, one
    /// `bpf.<pin dir>.<counter>: value` line each; or why they cannot be read (the proxy
    /// usually runs without BPF privileges). For the admin `/stats`.
    fn counters(&self, bpffs_root: &Path) -> String;
}
