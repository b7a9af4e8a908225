//! `sidecar cleanup`: removes what `sidecar init` created, never a live pod's capture unless
//! told so by name (`--cgroup`) or explicitly (`--all --include-live`).
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use sidecar_common::PinLayout;

use sidecar_capture::{bpffs, captures, cgroup::Cgroup, iptables_capture};

#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// The pod cgroup given to `sidecar init`: its capture is removed (its programs detach).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Remove exactly the captures whose cgroup is gone (deleted pods). Live pods' captures
    /// are never touched: safe to run at any time on a node (`sidecar node-agent` does it).
    #[arg(long, conflicts_with = "cgroup")]
    pub stale: bool,
    /// Remove every capture on this node. Refused, with the live pods listed, while any pod
    /// still exists, unless --include-live is given too.
    #[arg(long, conflicts_with_all = ["cgroup", "stale"])]
    pub all: bool,
    /// With --all: also remove the captures of live pods. Their traffic then goes direct,
    /// uncaptured and in plaintext, until their capture is installed again.
    #[arg(long, requires = "all")]
    pub include_live: bool,
    /// Also remove the iptables-mode rules of the current network namespace.
    #[arg(long)]
    pub iptables: bool,
    #[arg(long, default_value = bpffs::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

pub fn run(args: CleanupArgs) -> Result<()> {
    super::require_root("sidecar cleanup")?;
    if args.cgroup.is_none() && !args.stale && !args.all && !args.iptables {
        bail!("say what to clean up: --cgroup PATH, --stale, --all, and/or --iptables");
    }
    let mut removed = Vec::new();
    if args.cgroup.is_some() || args.stale || args.all {
        let layout = PinLayout::new(&args.bpffs);
        let lock = bpffs::lock(&layout)?;
        let pin_dirs = if let Some(path) = &args.cgroup {
            vec![layout.capture_dir(Cgroup::resolve(path)?.id)]
        } else {
            let all = captures::list(&layout)?;
            let live: Vec<String> = all
                .iter()
                .filter_map(|c| c.cgroup.as_ref().map(|p| p.display().to_string()))
                .collect();
            if args.all && !args.include_live && !live.is_empty() {
                bail!(
                    "refusing to remove the capture of {} live pod(s): their traffic would go \
                     direct, uncaptured. Use --stale for deleted pods only, --cgroup PATH for one \
                     pod, or --all --include-live to remove them anyway. Live: {}",
                    live.len(),
                    live.join(", ")
                );
            }
            all.into_iter()
                .filter(|c| args.all || c.is_stale())
                .map(|c| c.pin_dir)
                .collect()
        };
        for dir in pin_dirs {
            removed.extend(captures::remove(&dir, &lock)?);
        }
        removed.extend(captures::remove_node_state_if_unused(&layout, &lock)?);
    }
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
