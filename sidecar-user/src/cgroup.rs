//! Finding cgroup v2 and the pod's cgroup in it.
//!
//! cgroup v2 lives at `/sys/fs/cgroup` on pure-v2 hosts and at `/sys/fs/cgroup/unified` on
//! hybrid ones, so the mount point is always read from `/proc/self/mountinfo`.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

const CGROUP2_SUPER_MAGIC: rustix::fs::FsWord = 0x6367_7270;

/// A cgroup v2 directory, identified by its inode number (the kernel's cgroup id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
}

/// The cgroup v2 mount point of this mount namespace.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    match find_cgroup2_mount(&mountinfo) {
        Some(root) => Ok(root),
        None => bail!(
            "cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mountinfo); \
             mount it with `mount -t cgroup2 none /sys/fs/cgroup` or boot with cgroup v2 enabled"
        ),
    }
}

/// Returns the first cgroup2 mount point listed in a mountinfo text.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal `\NNN`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.clone().take(3).collect();
            if let Ok(byte) = u8::from_str_radix(&code, 8) {
                out.push(byte as char);
                chars.nth(2);
                continue;
            }
        }
        out.push(c);
    }
    out
}

impl Cgroup {
    /// Resolves `--cgroup PATH`: an absolute path inside the cgroup v2 mount, or a path
    /// relative to the cgroup v2 root (`/kubepods/pod1` and `kubepods/pod1` both work).
    pub fn resolve(path: &Path) -> Result<Cgroup> {
        let root = cgroup2_root()?;
        let candidate = if path.starts_with(&root) {
            path.to_path_buf()
        } else {
            root.join(path.strip_prefix("/").unwrap_or(path))
        };
        let meta = std::fs::metadata(&candidate).with_context(|| {
            format!(
                "cgroup path {} does not exist (cgroup v2 is mounted at {})",
                candidate.display(),
                root.display()
            )
        })?;
        if !meta.is_dir() {
            bail!("cgroup path {} is not a directory", candidate.display());
        }
        let fs = rustix::fs::statfs(&candidate)
            .with_context(|| format!("cannot statfs {}", candidate.display()))?;
        if fs.f_type != CGROUP2_SUPER_MAGIC {
            bail!(
                "{} is not on a cgroup v2 filesystem (cgroup v2 is mounted at {})",
                candidate.display(),
                root.display()
            );
        }
        Ok(Cgroup {
            path: candidate,
            id: meta.ino(),
        })
    }

    /// Finds the cgroup whose id is `id` by walking the cgroup v2 tree (for `status`).
    pub fn find_by_id(id: u64) -> Option<PathBuf> {
        let root = cgroup2_root().ok()?;
        let mut pending = vec![root];
        while let Some(dir) = pending.pop() {
            if std::fs::metadata(&dir).map(|m| m.ino()).ok() == Some(id) {
                return Some(dir);
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                pending.extend(
                    entries
                        .filter_map(|e| e.ok())
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.path()),
                );
            }
        }
        None
    }

    pub fn open(&self) -> Result<std::fs::File> {
        std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open cgroup {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd";

    const PURE_V2: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw";

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_layouts() {
        assert_eq!(
            find_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2_mount(PURE_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            find_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw"),
            None
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mountinfo("/mnt/my\\040cgroup"), "/mnt/my cgroup");
    }
}
