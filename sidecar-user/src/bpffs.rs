//! The BPF filesystem, where links and maps are pinned so capture outlives `sidecar init`.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

// FsWord: statfs.f_type has a different integer type on each architecture.
const BPF_FS_MAGIC: rustix::fs::FsWord = 0xcafe_4a11;
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at `root` unless one is already there.
pub fn ensure_mounted(root: &Path) -> Result<()> {
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    rustix::mount::mount("bpf", root, "bpf", rustix::mount::MountFlags::empty(), None)
        .with_context(|| format!("cannot mount bpffs at {}", root.display()))
}

pub fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path)
        .map(|fs| fs.f_type == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Where the pins of the capture for the cgroup with inode `cgroup_id` live.
pub fn pin_dir(root: &Path, cgroup_id: u64) -> PathBuf {
    sidecar_dir(root).join(format!("cgroup-{cgroup_id}"))
}

/// The directory holding one sub-directory per captured cgroup.
pub fn sidecar_dir(root: &Path) -> PathBuf {
    root.join("sidecar")
}
