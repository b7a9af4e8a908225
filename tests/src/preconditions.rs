//! The lab's requirements, checked up front so a test without them fails loudly.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use rustix::process::geteuid;

use crate::cgroup::cgroup2_root;

/// Panics with a clear message unless the lab can run here: root, a cgroup v2 mount, and
/// the `ip` (iproute2) and `setpriv` (util-linux) tools. Call it first in every lab test:
/// a test whose precondition is missing must fail, never skip and pass.
#[track_caller]
pub fn require_root() {
    if let Err(problem) = check_lab_preconditions() {
        panic!(
            "lab precondition missing: {problem:#}\n\
             These tests create network namespaces and cgroups: run them as root on Linux \
             with cgroup v2 mounted and iproute2 and util-linux installed."
        );
    }
}

fn check_lab_preconditions() -> Result<()> {
    let euid = geteuid();
    ensure!(
        euid.is_root(),
        "not running as root (effective uid {})",
        euid.as_raw()
    );
    let cgroup2 = cgroup2_root()?;
    ensure!(
        cgroup2.join("cgroup.procs").exists(),
        "{} has no cgroup.procs: not a usable cgroup v2 mount",
        cgroup2.display()
    );
    for (tool, version_flag, package) in [
        ("ip", "-V", "iproute2"),
        ("setpriv", "--version", "util-linux"),
    ] {
        let status = Command::new(tool)
            .arg(version_flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("`{tool}` not found (install {package})"))?;
        ensure!(
            status.success(),
            "`{tool} {version_flag}` failed with {status}"
        );
    }
    Ok(())
}
