//! The BPF filesystem, where links and maps are pinned so capture outlives `sidecar init`.
use std::path::Path;

use anyhow::{Context, Result};
pub use sidecar_common::DEFAULT_BPFFS;
use sidecar_common::PinLayout;

// FsWord: statfs.f_type has a different integer type on each architecture.
const BPF_FS_MAGIC: rustix::fs::FsWord = 0xcafe_4a11;

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

/// An exclusive lock on this node's sidecar pins, held while a capture is installed or
/// removed: two `init` of one pod (a restarted init container racing its predecessor, say)
/// or an init and a cleanup never interleave. Released when dropped.
pub struct PinLock {
    _dir: std::os::fd::OwnedFd,
}

/// Takes the lock, waiting for whoever holds it (an install takes a fraction of a second).
/// The directory may be removed by a cleanup that held the lock before us: then the lock is
/// on a dead directory, so it is taken again on the current one.
pub fn lock(layout: &PinLayout) -> Result<PinLock> {
    use std::os::unix::fs::MetadataExt;

    use rustix::fs::{FlockOperation, Mode, OFlags, flock, fstat, open};
    let dir = layout.sidecar_dir();
    loop {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let fd = open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", dir.display()))?;
        flock(&fd, FlockOperation::LockExclusive)
            .with_context(|| format!("cannot lock {}", dir.display()))?;
        let locked = fstat(&fd)?.st_ino;
        if std::fs::metadata(&dir).is_ok_and(|now| now.ino() == locked) {
            return Ok(PinLock { _dir: fd });
        }
    }
}

/// Removes the node's sidecar directory if it is empty (under the lock).
pub fn remove_sidecar_dir_if_empty(layout: &PinLayout, _lock: &PinLock) {
    let _ = std::fs::remove_dir(layout.sidecar_dir());
}
