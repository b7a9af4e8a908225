//! The executables the VM runs: the sidecar-tests package's integration tests, compiled (not
//! run) by cargo, the labtool helper they call, and the sidecar binary under test.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{
    build::{self, BuildOptions},
    util::workspace_root,
};

pub struct TestBinaries {
    /// One executable per file in tests/tests/.
    pub tests: Vec<PathBuf>,
    pub labtool: PathBuf,
    pub sidecar: PathBuf,
}

/// The part of cargo's `--message-format=json` output we read.
#[derive(Deserialize)]
struct Message {
    reason: String,
    target: Option<Target>,
    profile: Option<Profile>,
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Profile {
    /// Set for test harnesses, including the unit tests of a binary.
    test: bool,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

/// Integration tests the VMs do not run, and why: the node agent's 500-pod churn would take
/// many minutes under emulation, and what it needs from the kernel (pins, links, memlock,
/// stale captures collected) is what `capture_lifecycle` checks on every kernel.
const HOST_ONLY_TESTS: &[&str] = &["node_agent"];

/// Single tests the VMs skip, and why:
/// - the iptables control of close_at_once. Under emulation (one vCPU), conntrack itself loses
///   the original destination of 4-7% of the IPv6 write-and-close connections (seen on 5.10
///   and 7.2: `orig_dst_unknown` from `IP6T_SO_ORIGINAL_DST`), which is iptables' behaviour,
///   not ours; the eBPF cases, the subject of the test, run everywhere;
/// - proxy_limits' 2000-connection flood of the readiness port: it asserts the bound
///   (readiness answers within 1 s), which one emulated CPU busy accepting and closing 2000
///   connections cannot meet (seen: 1.0 s timeouts under TCG); what it tests is the proxy's
///   own caps, not the kernel's. The other proxy_limits tests run everywhere.
///
/// docs/KERNELS.md.
pub const HOST_ONLY_TEST_CASES: &[&str] = &[
    "write_and_close_at_once_loses_nothing_under_iptables",
    "unfinished_requests_on_the_readiness_port_leave_readiness_and_the_data_path_working",
];

/// Builds the BPF object, the binaries and the integration tests.
pub fn build() -> Result<TestBinaries> {
    let profile_dir = build::build_all(&BuildOptions::default())?;
    println!("vm: cargo test --no-run (the integration tests, for the VM)");
    let output = Command::new("cargo")
        .current_dir(workspace_root())
        .args(["test", "--no-run", "--package", "sidecar-tests", "--tests"])
        .args(["--message-format", "json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        bail!("cargo test --no-run failed with {}", output.status);
    }
    let mut tests = Vec::new();
    let mut labtool = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let message: Message = serde_json::from_str(line)
            .with_context(|| format!("unexpected cargo output {line}"))?;
        let (Some(target), Some(profile), Some(executable)) =
            (message.target, message.profile, message.executable)
        else {
            continue;
        };
        if message.reason != "compiler-artifact" {
            continue;
        }
        if target.kind.iter().any(|kind| kind == "test") {
            if !HOST_ONLY_TESTS.contains(&target.name.as_str()) {
                tests.push(executable);
            }
        } else if target.name == "labtool" && !profile.test {
            labtool = Some(executable);
        }
    }
    if tests.is_empty() {
        bail!("cargo built no integration test for sidecar-tests");
    }
    tests.sort();
    Ok(TestBinaries {
        tests,
        labtool: labtool.context("cargo did not report the labtool binary")?,
        sidecar: profile_dir.join("sidecar"),
    })
}
