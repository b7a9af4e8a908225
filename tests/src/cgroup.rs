//! cgroup v2 discovery and removal of the lab's cgroup subtrees.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rustix::process::{Pid, Signal, kill_process};

/// Where the cgroup v2 hierarchy is mounted, read from `/proc/self/mountinfo`
/// (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure-v2 hosts).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount_point(&mountinfo)
        .ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted (checked /proc/self/mountinfo)"))
}

/// Finds the mount point of the whole cgroup2 hierarchy in mountinfo text.
///
/// Line format (proc(5)): `id parent major:minor root mount-point options [optional...] - fstype source super-options`.
/// Only mounts of the hierarchy's root (`root` field `/`) count: a bind mount of a
/// subtree would make every path below it wrong.
pub fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount_fields, fs_fields) = line.split_once(" - ")?;
        let fs_type = fs_fields.split_whitespace().next()?;
        let mut fields = mount_fields.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fs_type == "cgroup2" && root == "/").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGKILLs every process in `root` and its descendants until none is left.
///
/// Reads `cgroup.procs` rather than writing `cgroup.kill`, which kernels before 5.14 lack.
pub(crate) fn kill_all_processes(root: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = processes_in_subtree(root)?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes {pids:?} still in {} after SIGKILL",
                root.display()
            );
        }
        for pid in pids.into_iter().filter_map(Pid::from_raw) {
            // ESRCH only means it exited between the read and the kill.
            let _ = kill_process(pid, Signal::KILL);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn processes_in_subtree(root: &Path) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    for dir in subtree_deepest_first(root)? {
        let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error).context(format!("reading {}/cgroup.procs", dir.display()));
            }
        };
        pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<i32>().ok()),
        );
    }
    Ok(pids)
}

/// Removes `root` and every cgroup below it, children before parents.
///
/// rmdir answers EBUSY for a short while after the last process was killed, so it is retried
/// until `timeout`.
pub(crate) fn remove_subtree(root: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for dir in subtree_deepest_first(root)? {
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                Err(error)
                    if error.kind() == io::ErrorKind::ResourceBusy && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(error) => {
                    return Err(error).context(format!("removing cgroup {}", dir.display()));
                }
            }
        }
    }
    Ok(())
}

/// `root` and all directories below it, each listed after its descendants.
fn subtree_deepest_first(root: &Path) -> Result<Vec<PathBuf>> {
    let mut ordered = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).context(format!("listing {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            }
        }
        ordered.push(dir);
    }
    // Parents were pushed before their children: reversed, children come first.
    ordered.reverse();
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_HOST: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const PURE_V2_HOST: &str = "\
24 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
35 24 0:31 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_unified_mount_on_hybrid_host() {
        assert_eq!(
            cgroup2_mount_point(HYBRID_HOST),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup_root_on_pure_v2_host() {
        assert_eq!(
            cgroup2_mount_point(PURE_V2_HOST),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn skips_bind_mounts_of_a_subtree_and_v1_hierarchies() {
        let text = "\
50 1 0:38 /kubepods/pod1 /host/cgroup rw - cgroup2 cgroup2 rw
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
";
        assert_eq!(cgroup2_mount_point(text), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let text = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_point(text),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn lists_children_before_parents() {
        let root = std::env::temp_dir().join(format!("sidecar-tests-order-{}", std::process::id()));
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join("c")).unwrap();
        let order = subtree_deepest_first(&root).unwrap();
        let position = |p: &Path| order.iter().position(|d| d == p).unwrap();
        assert!(position(&root.join("a/b")) < position(&root.join("a")));
        assert!(position(&root.join("a")) < position(&root));
        assert!(position(&root.join("c")) < position(&root));
        remove_subtree(&root, Duration::from_secs(1)).unwrap();
        assert!(!root.exists());
    }
}
