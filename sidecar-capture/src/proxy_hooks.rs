//! What the proxy asks of the capture and cannot do itself (`sidecar-proxy` holds no `unsafe`
//! and no BPF library): the capture's status, asked on a socket of the pod, and the pinned
//! counters for its admin `/stats`. The binary hands these to the proxy.
use std::{fmt::Write as _, io, os::fd::BorrowedFd, path::Path};

use sidecar_common::{CAPTURE_STATUS_OPTNAME, CaptureStatus, SOL_IP};

use sidecar_common::PinLayout;

use crate::{ebpf_capture, sys};

/// What the capture's getsockopt program says, asked on `socket` (it answers on any socket of
/// the pod), or `None` when no program answered (iptables capture, or none).
pub fn capture_status_of(socket: BorrowedFd<'_>) -> io::Result<Option<CaptureStatus>> {
    let mut answer = [0u8; size_of::<CaptureStatus>()];
    match sys::getsockopt_bytes(socket, SOL_IP, CAPTURE_STATUS_OPTNAME, &mut answer) {
        Ok(len) if len == answer.len() => {
            let word = |i: usize| u32::from_ne_bytes(answer[i..i + 4].try_into().expect("4"));
            let status = CaptureStatus {
                magic: word(0),
                flags: word(4),
            };
            Ok((status.magic == CaptureStatus::MAGIC).then_some(status))
        }
        Ok(_) => Ok(None),
        Err(error) if error.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(None),
        Err(error) => Err(error),
    }
}

/// The capture's kernel counters, summed over CPUs, one `bpf.<pin dir>.<counter>: value` line
/// each; or why they cannot be read (the proxy usually runs without BPF privileges).
pub fn bpf_counters(bpffs_root: &Path) -> String {
    let layout = PinLayout::new(bpffs_root);
    let dir = layout.sidecar_dir();
    if let Err(error) = std::fs::read_dir(&dir) {
        return format!("bpf: unavailable: cannot read {}: {error}\n", dir.display());
    }
    let mut out = String::new();
    for (_, capture_dir) in layout.capture_dirs() {
        let name = capture_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        match ebpf_capture::read_counters(&capture_dir) {
            Ok(counters) => {
                for (counter, value) in counters {
                    let _ = writeln!(out, "bpf.{name}.{}: {value}", counter.name());
                }
            }
            Err(error) => {
                let _ = writeln!(out, "bpf.{name}: unavailable: {error:#}");
            }
        }
    }
    if out.is_empty() {
        out = format!(
            "bpf: unavailable: no capture pinned under {}\n",
            dir.display()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_say_why_they_cannot_be_read() {
        let stats = bpf_counters(Path::new("/nonexistent-bpffs"));
        assert!(
            stats.starts_with("bpf: unavailable: cannot read /nonexistent-bpffs/sidecar"),
            "{stats}"
        );
    }
}
