//! The eBPF captures installed on this node (one pin directory per pod cgroup) and whether
//! their pod still exists: what `status` lists, `cleanup --stale` and the node agent collect.
use std::path::{Path, PathBuf};

use anyhow::Result;
use sidecar_common::PinLayout;

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

/// Every capture under `layout`, each with its cgroup looked up in one walk of the tree.
pub fn list(layout: &PinLayout) -> Result<Vec<Capture>> {
    let pin_dirs = layout.capture_dirs();
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
    layout: &PinLayout,
    lock: &bpffs::PinLock,
) -> Result<Vec<String>> {
    if !layout.capture_dirs().is_empty() {
        return Ok(Vec::new());
    }
    let removed = remove(&layout.node_dir(), lock)?;
    bpffs::remove_sidecar_dir_if_empty(layout, lock);
    Ok(removed)
}

/// The cgroup ids of the captures under `layout` (no walk of the cgroup tree).
pub fn ids(layout: &PinLayout) -> Vec<u64> {
    layout
        .capture_dirs()
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}
