//! `sidecar cleanup`: removes every program, link, pin and rule `sidecar init` created.
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::{bpffs, cgroup::Cgroup, ebpf_capture, iptables_capture};

#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// The pod cgroup given to `sidecar init`: its pins are removed, detaching the programs.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Remove the pins of every captured cgroup, including ones whose cgroup is gone.
    #[arg(long, conflicts_with = "cgroup")]
    pub all: bool,
    /// Also remove the iptables-mode rules of the current network namespace.
    #[arg(long)]
    pub iptables: bool,
    #[arg(long, default_value = bpffs::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

pub fn run(args: CleanupArgs) -> Result<()> {
    super::require_root("sidecar cleanup")?;
    if args.cgroup.is_none() && !args.all && !args.iptables {
        bail!("say what to clean up: --cgroup PATH, --all, and/or --iptables");
    }
    let mut removed = Vec::new();
    let pin_dirs = if args.all {
        std::fs::read_dir(bpffs::sidecar_dir(&args.bpffs))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    } else if let Some(path) = &args.cgroup {
        vec![bpffs::pin_dir(&args.bpffs, Cgroup::resolve(path)?.id)]
    } else {
        Vec::new()
    };
    for dir in pin_dirs {
        for pin in ebpf_capture::remove_pins(&dir)? {
            removed.push(format!("{}/{pin}", dir.display()));
        }
    }
    // The parent directory goes too once no capture is left in it.
    let _ = std::fs::remove_dir(bpffs::sidecar_dir(&args.bpffs));
    if args.iptables {
        removed.extend(iptables_capture::remove()?);
    }
    if removed.is_empty() {
        println!("sidecar cleanup: nothing to remove");
    }
    for item in removed {
        println!("sidecar cleanup: removed {item}");
    }
    Ok(())
}
