//! A pod with its sidecar, as the integration tests, the lab demo and the bench all build it:
//! the capture installed by the real `sidecar init` (eBPF from the host, or iptables inside the
//! pod's namespace), the real proxy started in its place (UID/GID 1337 in the pod's `proxy`
//! cgroup, or root in a sibling cgroup that is never hooked) and waited for, and the reading of
//! what it says: its metrics, its access lines, its capture's status.
//!
//! Teardown removes this pod's capture only (`sidecar cleanup --cgroup <its cgroup>`, never a
//! global cleanup), when the `SidecarPod` is dropped or the lab is torn down, whichever comes
//! first; iptables rules go with the pod's namespace.

use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use sidecar_common::{CaptureReport, StatusReport};

use crate::lab::{Lab, Pod};
use crate::process::{LabProcess, PodCommand};
use crate::prometheus;
use crate::wait::wait_for_http_ok;

/// The proxy's UID and GID: the one exemption criterion of both capture modes.
pub const PROXY_ID: u32 = 1337;
/// The proxy's readiness endpoint, as the kubelet probes it.
pub const PROXY_READY_URL: &str = "http://127.0.0.1:15021/healthz/ready";
/// The proxy's Prometheus endpoint.
pub const PROXY_METRICS_URL: &str = "http://127.0.0.1:15020/stats/prometheus";
/// How long a proxy gets to become ready, and a scrape to answer.
pub const PROXY_READY_TIMEOUT: Duration = Duration::from_secs(10);

const METRIC_POLL: Duration = Duration::from_millis(50);
const ACCESS_LINE_POLL: Duration = Duration::from_millis(20);

/// How `sidecar init` captures the pod's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// The BPF programs on the pod's cgroup and network namespace, installed from the host.
    Ebpf,
    /// istio-init's rules in the pod's namespace, installed from inside it.
    Iptables,
}

/// Where the proxy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyPlacement {
    /// In the pod's `proxy` cgroup as UID/GID 1337 (the Kubernetes layout).
    InPod,
    /// As root in the lab cgroup `<pod>-proxy`, outside the pod and never hooked (eBPF only:
    /// `init --proxy-cgroup` gives it the getsockopt answer there).
    Sibling,
}

/// A lab pod and its sidecar. Derefs to its [`Pod`], for everything a pod does.
pub struct SidecarPod {
    pod: Pod,
    sidecar: PathBuf,
    placement: ProxyPlacement,
    proxy_cgroup: PathBuf,
    cpu: Option<usize>,
    removal: Arc<CaptureRemoval>,
    proxy: Option<LabProcess>,
}

impl SidecarPod {
    /// Gives `pod` a place for its sidecar (the proxy's cgroup), with `sidecar` the binary to
    /// run; nothing is installed or started yet.
    pub fn new(
        lab: &Lab,
        pod: Pod,
        sidecar: impl Into<PathBuf>,
        placement: ProxyPlacement,
    ) -> Result<SidecarPod> {
        let sidecar = sidecar.into();
        let proxy_cgroup = match placement {
            ProxyPlacement::InPod => pod.cgroup_child("proxy")?,
            ProxyPlacement::Sibling => lab.sibling_cgroup(&format!("{}-proxy", pod.name()))?,
        };
        let removal = Arc::new(CaptureRemoval {
            sidecar: sidecar.clone(),
            cgroup: pod.cgroup().to_path_buf(),
            installed: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        });
        let on_teardown = Arc::clone(&removal);
        lab.on_teardown(move || on_teardown.remove());
        Ok(SidecarPod {
            pod,
            sidecar,
            placement,
            proxy_cgroup,
            cpu: None,
            removal,
            proxy: None,
        })
    }

    /// Pins the proxy (and whatever else runs in its place) to `cpu`, through taskset.
    pub fn pinned_to_cpu(mut self, cpu: usize) -> SidecarPod {
        self.cpu = Some(cpu);
        self
    }

    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    /// The `sidecar` binary this pod runs.
    pub fn sidecar_bin(&self) -> &Path {
        &self.sidecar
    }

    pub fn placement(&self) -> ProxyPlacement {
        self.placement
    }

    /// The cgroup the proxy runs in.
    pub fn proxy_cgroup(&self) -> &Path {
        &self.proxy_cgroup
    }

    /// The pod's `app` cgroup (created on first use), where its captured apps run.
    pub fn app_cgroup(&self) -> Result<PathBuf> {
        self.pod.cgroup_child("app")
    }

    /// Runs `sidecar init` for this pod with `extra` options and returns its output whatever
    /// its exit status: eBPF on the host (`--cgroup`, `--netns`, and `--proxy-cgroup` for a
    /// sibling proxy), iptables inside the pod's namespace. An eBPF capture is removed at
    /// teardown even if this init failed half-way.
    pub fn init(&self, mode: CaptureMode, extra: &[&str]) -> Result<Output> {
        match mode {
            CaptureMode::Ebpf => {
                self.removal.installed.store(true, Ordering::SeqCst);
                let mut command = Command::new(&self.sidecar);
                command
                    .arg("init")
                    .arg("--cgroup")
                    .arg(self.pod.cgroup())
                    .arg("--netns")
                    .arg(self.pod.netns_path());
                if self.placement == ProxyPlacement::Sibling {
                    command.arg("--proxy-cgroup").arg(&self.proxy_cgroup);
                }
                command
                    .args(extra)
                    .output()
                    .with_context(|| format!("running {}", self.sidecar.display()))
            }
            CaptureMode::Iptables => {
                ensure!(
                    self.placement == ProxyPlacement::InPod,
                    "iptables capture exempts the proxy by its UID: the proxy must run in the pod"
                );
                self.pod
                    .command(&self.sidecar)
                    .args(["init", "--mode", "iptables"])
                    .args(extra)
                    .run()
            }
        }
    }

    /// [`SidecarPod::init`], failing with its output unless it succeeds.
    pub fn install_capture(&self, mode: CaptureMode, extra: &[&str]) -> Result<Output> {
        let output = self.init(mode, extra)?;
        ensure!(
            output.status.success(),
            "sidecar init ({mode:?}) for pod {} failed with {}\nstdout: {}\nstderr: {}",
            self.pod.name(),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
        Ok(output)
    }

    /// `program` in the proxy's place: its cgroup, its user (1337 in the pod, root in a
    /// sibling cgroup), its CPU if pinned (taskset execs: the pid stays the program's).
    pub fn proxy_place_command(&self, program: impl AsRef<OsStr>) -> PodCommand {
        let command = match self.cpu {
            Some(cpu) => self
                .pod
                .command("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(program),
            None => self.pod.command(program),
        };
        let command = command.in_cgroup(&self.proxy_cgroup);
        match self.placement {
            ProxyPlacement::InPod => command.as_user(PROXY_ID, PROXY_ID),
            ProxyPlacement::Sibling => command,
        }
    }

    /// `sidecar proxy` in the proxy's place: add its options, then [`SidecarPod::start_proxy`].
    pub fn proxy_command(&self) -> PodCommand {
        self.proxy_place_command(&self.sidecar).arg("proxy")
    }

    /// Spawns `command` (from [`SidecarPod::proxy_command`]) and waits until the proxy says it
    /// is ready; the pod keeps it (stopped when the pod or the lab goes).
    pub fn start_proxy(&mut self, command: PodCommand) -> Result<&LabProcess> {
        let proxy = command.spawn()?;
        if let Err(error) = wait_for_http_ok(&self.pod, PROXY_READY_URL, PROXY_READY_TIMEOUT) {
            bail!(
                "the proxy in {} is not ready: {error:#}\n{}{}",
                self.pod.name(),
                proxy.stdout_text(),
                proxy.stderr_text()
            );
        }
        Ok(&*self.proxy.insert(proxy))
    }

    /// The running proxy, if started.
    pub fn proxy(&self) -> Option<&LabProcess> {
        self.proxy.as_ref()
    }

    /// Hands the proxy over (to kill or stop it); the pod no longer holds it.
    pub fn take_proxy(&mut self) -> Option<LabProcess> {
        self.proxy.take()
    }

    /// Everything the proxy has written so far, stdout then stderr (empty if not started).
    pub fn proxy_logs(&self) -> String {
        self.proxy
            .as_ref()
            .map(|proxy| format!("{}{}", proxy.stdout_text(), proxy.stderr_text()))
            .unwrap_or_default()
    }

    /// The proxy's access lines so far (`--log-format json`: the lines of target `access`).
    pub fn access_lines(&self) -> Vec<Value> {
        let Some(proxy) = &self.proxy else {
            return Vec::new();
        };
        proxy
            .stdout_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["target"] == "access")
            .collect()
    }

    /// The access lines so far, once one satisfies `wanted` or `timeout` has passed: the proxy
    /// writes its log lines out in batches, within 100 ms (`sidecar-proxy/src/telemetry/log_buffer.rs`).
    pub fn wait_for_access_line(
        &self,
        wanted: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.access_lines();
            if lines.iter().any(&wanted) || Instant::now() >= deadline {
                return lines;
            }
            thread::sleep(ACCESS_LINE_POLL);
        }
    }

    /// This pod's entry in `sidecar status --json` (eBPF captures), if listed.
    pub fn capture_report(&self) -> Result<Option<CaptureReport>> {
        Ok(status_report(&self.sidecar)?
            .capture_of(self.pod.cgroup())
            .cloned())
    }
}

impl Deref for SidecarPod {
    type Target = Pod;

    fn deref(&self) -> &Pod {
        &self.pod
    }
}

impl Drop for SidecarPod {
    /// The proxy first, then the capture it ran under.
    fn drop(&mut self) {
        drop(self.proxy.take());
        self.removal.remove();
    }
}

/// `sidecar cleanup --cgroup <the pod's cgroup>`, once, if an eBPF init ran.
struct CaptureRemoval {
    sidecar: PathBuf,
    cgroup: PathBuf,
    installed: AtomicBool,
    removed: AtomicBool,
}

impl CaptureRemoval {
    fn remove(&self) {
        if self.installed.load(Ordering::SeqCst) && !self.removed.swap(true, Ordering::SeqCst) {
            let _ = Command::new(&self.sidecar)
                .arg("cleanup")
                .arg("--cgroup")
                .arg(&self.cgroup)
                .output();
        }
    }
}

/// `sidecar status --json` run on the host, typed: a key missing or renamed fails here,
/// naming it.
pub fn status_report(sidecar: &Path) -> Result<StatusReport> {
    let output = Command::new(sidecar)
        .args(["status", "--json"])
        .output()
        .with_context(|| format!("running {} status", sidecar.display()))?;
    ensure!(
        output.status.success(),
        "sidecar status failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    StatusReport::from_json(&output.stdout).map_err(|error| anyhow!(error))
}

/// The metrics of `pod`'s proxy (a scrape of [`PROXY_METRICS_URL`] from inside the pod).
pub fn proxy_metrics(pod: &Pod) -> Result<String> {
    Ok(
        wait_for_http_ok(pod, PROXY_METRICS_URL, PROXY_READY_TIMEOUT)
            .context("scraping the proxy's metrics")?
            .body,
    )
}

/// What a waited-for metric must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricGoal {
    Exactly(u64),
    AtLeast(u64),
}

impl MetricGoal {
    fn reached(self, value: u64) -> bool {
        match self {
            MetricGoal::Exactly(expected) => value == expected,
            MetricGoal::AtLeast(expected) => value >= expected,
        }
    }
}

/// Waits until the sum of `name`{`labels`} in `pod`'s proxy's metrics reaches `goal`; a series
/// not there yet counts 0 (the proxy creates some on first use), but the metric must be in the
/// exposition. Returns the value reached; an error names the last value seen.
pub fn wait_for_proxy_metric(
    pod: &Pod,
    name: &str,
    labels: &[(&str, &str)],
    goal: MetricGoal,
    patience: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + patience;
    loop {
        let value = prometheus::sum_or_zero_if_family_present(&proxy_metrics(pod)?, name, labels)
            .map_err(|error| anyhow!("the proxy's metrics: {error}"))? as u64;
        if goal.reached(value) {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!(
                "{name}{labels:?} in {}'s proxy never reached {goal:?} within {patience:?} (is {value})",
                pod.name()
            );
        }
        thread::sleep(METRIC_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_goals_are_exact_or_lower_bounds() {
        assert!(MetricGoal::Exactly(3).reached(3));
        assert!(!MetricGoal::Exactly(3).reached(4));
        assert!(MetricGoal::AtLeast(3).reached(4));
        assert!(!MetricGoal::AtLeast(3).reached(2));
    }
}
