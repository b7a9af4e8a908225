//! The eBPF captures installed on this node (one pin directory per pod cgroup) and whether
//! their pod still exists: what `status` lists, `cleanup --stale` and the node agent collect.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{bpffs, cgroup::Cgroup};

/// One pod's capture, as found under bpffs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub cgroup_id: u64,
    pub pin_dir: PathBuf,
    /// The pod's cgroup, or None when it is gone: the capture is stale.
    pub cgroup: Option<PathBuf>,
}

impl Capture {
    pub fn is_stale(&self) -> bool {
        self.cgroup.is_none()
    }
}

/// Every capture under `bpffs_root`, each with its cgroup looked up in one walk of the tree.
pub fn list(bpffs_root: &Path) -> Result<Vec<Capture>> {
    let pin_dirs = pin_dirs(bpffs_root);
    if pin_dirs.is_empty() {
        return Ok(Vec::new());
    }
    let mut cgroups = Cgroup::all_by_id()?;
    Ok(pin_dirs
        .into_iter()
        .map(|(cgroup_id, pin_dir)| Capture {
            cgroup_id,
            pin_dir,
            cgroup: cgroups.remove(&cgroup_id),
        })
        .collect())
}

/// `(cgroup id, pin directory)` of every capture, sorted by id.
fn pin_dirs(bpffs_root: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(bpffs::sidecar_dir(bpffs_root))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let id = name.strip_prefix("cgroup-")?.parse().ok()?;
                    Some((id, entry.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}
