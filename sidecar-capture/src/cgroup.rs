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
    cgroup2_mounts(mountinfo).into_iter().next()
}

/// Every cgroup2 mount point of a mountinfo text, in mount order.
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect()
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
        // A pod's cgroup is below the root: the root is every process of the node, and a path
        // that climbs with `..` is not the one the caller named.
        if path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            bail!(
                "cgroup path {} contains `..`: give the pod's cgroup itself",
                path.display()
            );
        }
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
        if std::fs::metadata(&root).is_ok_and(|r| r.ino() == meta.ino() && r.dev() == meta.dev()) {
            bail!(
                "refusing the cgroup v2 root {}: that is every process of the node, not a pod",
                candidate.display()
            );
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

    /// Every cgroup of the v2 tree by id, from one walk (for `status`, `cleanup` and the node
    /// agent: a capture whose cgroup id is not here belongs to a deleted pod; cgroup ids are
    /// 64-bit and never reused).
    pub fn all_by_id() -> Result<std::collections::HashMap<u64, PathBuf>> {
        let root = cgroup2_root()?;
        let mut found = std::collections::HashMap::new();
        let mut pending = vec![root];
        while let Some(dir) = pending.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue; // removed while we walk
            };
            if let Ok(entries) = std::fs::read_dir(&dir) {
                pending.extend(
                    entries
                        .filter_map(|e| e.ok())
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.path()),
                );
            }
            found.insert(meta.ino(), dir);
        }
        Ok(found)
    }

    /// `--cgroup auto`: the pod cgroup of the calling process, i.e. the parent of its own
    /// (container) cgroup. `cgroup_root` is where the host's cgroup v2 tree is mounted; by
    /// default every cgroup2 mount of this mount namespace is tried, the latest first (a
    /// hostPath mount over the runtime's own `/sys/fs/cgroup` comes later in mountinfo).
    pub fn pod_of_self(cgroup_root: Option<&Path>) -> Result<Cgroup> {
        let roots = match cgroup_root {
            Some(root) => vec![root.to_path_buf()],
            None => {
                let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                    .context("cannot read /proc/self/mountinfo")?;
                let mut mounts = cgroup2_mounts(&mountinfo);
                mounts.reverse();
                mounts.dedup();
                mounts
            }
        };
        if roots.is_empty() {
            bail!(
                "--cgroup auto: cgroup v2 is not mounted here; in a container, mount the host's \
                 /sys/fs/cgroup (hostPath) or pass --cgroup-root"
            );
        }
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .context("cannot read /proc/self/cgroup")?;
        let own = own_cgroup_path(&proc_cgroup)?;
        let (root, container) = if own == Path::new("/") {
            // A private cgroup namespace shows its root as "/": the namespace root is this
            // container's cgroup, so find the directory with the same inode in the host tree.
            let inode = cgroup_namespace_root_inode()?;
            roots
                .iter()
                .find_map(|root| find_below(root, inode).map(|dir| (root.clone(), dir)))
                .with_context(|| {
                    format!(
                        "--cgroup auto: this container's cgroup (inode {inode}, private cgroup \
                         namespace) is not below {}: mount the host's /sys/fs/cgroup with a \
                         hostPath volume (or pass --cgroup-root where it is mounted)",
                        display_paths(&roots)
                    )
                })?
        } else {
            let relative = own.strip_prefix("/").unwrap_or(&own);
            roots
                .iter()
                .map(|root| (root.clone(), root.join(relative)))
                .find(|(_, dir)| is_cgroup2_dir(dir))
                .with_context(|| {
                    format!(
                        "--cgroup auto: this container's cgroup {} is not found under {}: mount \
                         the host's /sys/fs/cgroup with a hostPath volume (or pass --cgroup-root)",
                        own.display(),
                        display_paths(&roots)
                    )
                })?
        };
        let pod = container
            .parent()
            .filter(|parent| parent.starts_with(&root) && *parent != root)
            .with_context(|| {
                format!(
                    "--cgroup auto: {} sits directly in the cgroup v2 root {}: refusing to \
                     capture the whole machine (is this running in a pod?)",
                    container.display(),
                    root.display()
                )
            })?;
        Cgroup::resolve(pod)
    }

    pub fn open(&self) -> Result<std::fs::File> {
        std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open cgroup {}", self.path.display()))
    }
}

/// The cgroup v2 path of this process, from the `0::PATH` line of `/proc/self/cgroup`.
fn own_cgroup_path(proc_cgroup: &str) -> Result<PathBuf> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(PathBuf::from)
        .context("--cgroup auto: /proc/self/cgroup has no cgroup v2 (\"0::\") line")
}

/// The inode of this cgroup namespace's root, read from a detached cgroup2 mount (new mount
/// API: no mount point needed, gone when the descriptor closes).
fn cgroup_namespace_root_inode() -> Result<u64> {
    use rustix::mount::{
        FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsmount, fsopen,
    };
    let context = "--cgroup auto: cannot mount cgroup2 to find this container's cgroup \
                   (the init container must be privileged)";
    let fs = fsopen("cgroup2", FsOpenFlags::FSOPEN_CLOEXEC).context(context)?;
    fsconfig_create(&fs).context(context)?;
    let mount = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY,
    )
    .context(context)?;
    Ok(rustix::fs::fstat(&mount).context(context)?.st_ino)
}

/// A directory strictly below `root` whose inode is `inode` (the root itself is the
/// namespaced view of the container's own cgroup, not a match in the host tree).
fn find_below(root: &Path, inode: u64) -> Option<PathBuf> {
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry.metadata().is_ok_and(|m| m.ino() == inode) {
                return Some(entry.path());
            }
            pending.push(entry.path());
        }
    }
    None
}

fn is_cgroup2_dir(path: &Path) -> bool {
    path.is_dir() && rustix::fs::statfs(path).is_ok_and(|fs| fs.f_type == CGROUP2_SUPER_MAGIC)
}

fn display_paths(paths: &[PathBuf]) -> String {
    let texts: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    texts.join(", ")
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
    fn lists_every_cgroup2_mount_in_order() {
        let shadowed = format!("{HYBRID}\n40 33 0:29 / /host/cgroup rw - cgroup2 cgroup2 rw");
        assert_eq!(
            cgroup2_mounts(&shadowed),
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/host/cgroup")
            ]
        );
    }

    #[test]
    fn reads_the_v2_line_of_proc_self_cgroup() {
        let podman =
            "12:pids:/libpod_parent/abc\n1:name=systemd:/x\n0::/libpod_parent/abc/libpod-def\n";
        assert_eq!(
            own_cgroup_path(podman).unwrap(),
            PathBuf::from("/libpod_parent/abc/libpod-def")
        );
        assert_eq!(own_cgroup_path("0::/\n").unwrap(), PathBuf::from("/"));
        let err = own_cgroup_path("1:cpu:/x\n").unwrap_err().to_string();
        assert!(err.contains("no cgroup v2"), "{err}");
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mountinfo("/mnt/my\\040cgroup"), "/mnt/my cgroup");
    }
}
