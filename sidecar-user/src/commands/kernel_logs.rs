//! `sidecar kernel-logs`: prints what the pod's BPF programs log (aya-log), live.
//!
//! The programs log only what needs attention (a socket storage or handoff failure), never per
//! connection; records written while no reader is attached are dropped by the kernel. The log
//! ring is one per node (a ring per pod would cost more kernel memory than all its other
//! maps), so the records of every capture on the node come out here.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aya::programs::links::{FdLink, PinnedLink};
use aya_log::EbpfLogger;
use clap::Args;
use rustix::event::{PollFd, PollFlags, poll};

use sidecar_common::{AttachPoint, PinLayout};

use sidecar_capture::{bpffs, cgroup::Cgroup, ebpf_capture};

#[derive(Args, Debug)]
pub struct KernelLogsArgs {
    /// The pod cgroup given to `sidecar init`.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Stop after this long (e.g. `30s`); default: until interrupted.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long, default_value = bpffs::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Writes each kernel record as one line on stdout.
struct StdoutLog;

impl log::Log for StdoutLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        println!(
            "kernel {} {}: {}",
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

pub fn run(args: KernelLogsArgs) -> Result<()> {
    super::require_root("sidecar kernel-logs")?;
    let cgroup = Cgroup::resolve(&args.cgroup)?;
    // Every program shares the node's log ring: any of the pod's attached programs finds it.
    let link_pin = PinLayout::link_pin(
        &PinLayout::new(&args.bpffs).capture_dir(cgroup.id),
        ebpf_capture::POD_HOOKS[0].program,
        AttachPoint::PodCgroup,
    );
    let link = PinnedLink::from_pin(&link_pin).with_context(|| {
        format!(
            "no capture installed for {} (run `sidecar init`)",
            cgroup.path.display()
        )
    })?;
    let program_id = FdLink::from(link).info()?.program_id();
    let mut logger = EbpfLogger::init_from_id_with_logger(program_id, StdoutLog)
        .map_err(|e| anyhow!("cannot attach to the kernel log of program {program_id}: {e}"))?;
    eprintln!("sidecar kernel-logs: following {}", cgroup.path.display());
    let deadline = args.duration.map(|d| Instant::now() + d);
    loop {
        let wait = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) => left.min(Duration::from_millis(500)),
                None => return Ok(()),
            },
            None => Duration::from_millis(500),
        };
        let timeout = rustix::fs::Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: wait.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(&logger, PollFlags::IN)];
        poll(&mut fds, Some(&timeout)).context("poll on the kernel log ring buffer")?;
        logger.flush();
        use std::io::Write;
        std::io::stdout().flush()?;
    }
}
