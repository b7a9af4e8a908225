//! `sidecar proxy`: the proxy (`sidecar-proxy`), asking this pod's capture through
//! `sidecar-capture`, which holds the `getsockopt` and the BPF library the proxy goes without.
use std::{io, os::fd::BorrowedFd, path::Path, sync::Arc};

use sidecar_capture::proxy_hooks;
use sidecar_common::CaptureStatus;
use sidecar_proxy::{CaptureProbe, ProxyArgs};

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    sidecar_proxy::run(args, Arc::new(KernelCapture))
}

/// The pod's capture, asked through the kernel.
struct KernelCapture;

impl CaptureProbe for KernelCapture {
    fn status_of(&self, socket: BorrowedFd<'_>) -> io::Result<Option<CaptureStatus>> {
        proxy_hooks::capture_status_of(socket)
    }

    fn counters(&self, bpffs_root: &Path) -> String {
        proxy_hooks::bpf_counters(bpffs_root)
    }
}
