//! The eBPF captures installed on this node (one pin directory per pod cgroup) and whether
//! their pod still exists: what `status` lists, `cleanup --stale` and the node agent collect.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{bpffs, cgroup::Cgroup, ebpf_capture};

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

/// Removes one capture's pins, which detaches its programs and frees them with their maps;
/// returns the pins removed. The caller holds the node's lock.
pub fn remove(pin_dir: &Path, _lock: &bpffs::PinLock) -> Result<Vec<String>> {
    Ok(ebpf_capture::remove_pins(pin_dir)?
        .into_iter()
        .map(|pin| format!("{}/{pin}", pin_dir.display()))
        .collect())
}

/// Once no capture is left, removes the node-wide state (the log ring) and the directory.
pub fn remove_node_state_if_unused(
    bpffs_root: &Path,
    lock: &bpffs::PinLock,
) -> Result<Vec<String>> {
    if !pin_dirs(bpffs_root).is_empty() {
        return Ok(Vec::new());
    }
    let removed = remove(&bpffs::node_dir(bpffs_root), lock)?;
    bpffs::remove_sidecar_dir_if_empty(bpffs_root, lock);
    Ok(removed)
}

/// The cgroup ids of the captures under `bpffs_root` (no walk of the cgroup tree).
pub fn ids(bpffs_root: &Path) -> Vec<u64> {
    pin_dirs(bpffs_root).into_iter().map(|(id, _)| id).collect()
}
