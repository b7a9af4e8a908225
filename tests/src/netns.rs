//! Named network namespaces (`/run/netns/<name>`) and their links, managed with iproute2.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::panic;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::process::run_with_timeout;

/// iproute2 answers in milliseconds; this only stops a wedged `ip` from hanging a test.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

const NETNS_DIR: &str = "/run/netns";

/// The bind mount `ip netns add` creates for a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Runs `ip ARGS...` and fails with its stderr if it does not succeed.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let mut command = Command::new("ip");
    command.args(args);
    let output = run_with_timeout(command, IP_TIMEOUT)?;
    ensure!(
        output.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

pub(crate) fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])
}

/// Deletes a namespace; its veths go with it. Already gone is fine.
pub(crate) fn delete(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Names of all named network namespaces on the host.
pub(crate) fn list() -> Result<Vec<String>> {
    match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries
            .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()
            .with_context(|| format!("listing {NETNS_DIR}")),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error).with_context(|| format!("listing {NETNS_DIR}")),
    }
}

/// Runs `work` on a fresh thread that has entered namespace `name`.
///
/// setns(2) moves only the calling thread, so the rest of the test process stays where it
/// is. The thread is in no lab cgroup: its connections are never redirected by the sidecar.
pub fn run_in_netns<T: Send>(name: &str, work: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(name);
    let netns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    thread::scope(|scope| {
        let worker = scope.spawn(|| -> Result<T> {
            move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))
                .with_context(|| format!("entering network namespace {name}"))?;
            Ok(work())
        });
        worker
            .join()
            .unwrap_or_else(|payload| panic::resume_unwind(payload))
    })
}
