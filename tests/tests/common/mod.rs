//! A pod with the sidecar, for the integration tests: capture installed by the real `sidecar
//! init`, the real proxy running inside the pod, an echo server in a second pod.
#![allow(dead_code)] // each test binary uses a different part of this harness

pub mod x509;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use sidecar_common::{AttachPoint, CaptureReport, StatusReport};
use sidecar_tests::{
    BpfCounters, ConnectReport, Lab, LabProcess, Pod, ProxyPlacement, SidecarPod, proxy_metrics,
    require_root, wait_for_proxy_metric, wait_for_tcp,
};

#[allow(unused_imports)] // as dead_code above: not every test binary names each of them
pub use sidecar_tests::{CaptureMode, MetricGoal, PROXY_ID};

/// Longer than the proxy's log flush interval (100 ms), with room for a busy machine.
pub const LOG_FLUSH_WAIT: Duration = Duration::from_millis(300);
pub const ECHO_PORT: u16 = 8080;
pub const OTHER_PORT: u16 = 9090;
const READY: Duration = Duration::from_secs(10);

/// The `sidecar` binary under test: `$SIDECAR_BIN` (set by `cargo xtask test`) or the debug build.
pub fn sidecar_bin() -> PathBuf {
    let path = std::env::var_os("SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sidecar"));
    assert!(
        path.is_file(),
        "the sidecar binary {} is missing: run the tests with `cargo xtask test` (or `cargo xtask build` first)",
        path.display()
    );
    path
}

pub fn labtool() -> &'static str {
    env!("CARGO_BIN_EXE_labtool")
}

/// Runs `sidecar ARGS` on the host (outside any pod: init needs the host's bpffs and cgroup tree).
/// The distribution's Python, for scripts run as another user than root: a version manager's
/// shim under /root is not readable by them. `cargo xtask setup` installs it.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn sidecar(args: &[&str]) -> Output {
    Command::new(sidecar_bin())
        .args(args)
        .output()
        .expect("cannot run the sidecar binary")
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `pod` with its sidecar's place ready: the proxy in the pod as UID/GID 1337, the Kubernetes
/// layout. Nothing installed or started yet.
pub fn sidecar_pod(lab: &Lab, pod: Pod) -> SidecarPod {
    SidecarPod::new(lab, pod, sidecar_bin(), ProxyPlacement::InPod).expect("the sidecar's cgroup")
}

/// How the capture is installed and where the proxy lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// eBPF on the pod cgroup; the proxy inside it under UID/GID 1337 (the Kubernetes layout).
    EbpfProxyInPod,
    /// eBPF on the pod cgroup; the proxy, as root, in a sibling cgroup that is never hooked.
    EbpfProxyInSibling,
    /// istio-init style iptables rules in the pod netns; the proxy runs as UID/GID 1337.
    Iptables,
}

impl Layout {
    fn capture(self) -> CaptureMode {
        match self {
            Layout::Iptables => CaptureMode::Iptables,
            Layout::EbpfProxyInPod | Layout::EbpfProxyInSibling => CaptureMode::Ebpf,
        }
    }

    fn placement(self) -> ProxyPlacement {
        match self {
            Layout::EbpfProxyInSibling => ProxyPlacement::Sibling,
            Layout::EbpfProxyInPod | Layout::Iptables => ProxyPlacement::InPod,
        }
    }
}

pub struct MeshLab {
    pub lab: Lab,
    pub client: SidecarPod,
    pub server: Pod,
    pub layout: Layout,
    pub app_cgroup: PathBuf,
    pub echo: LabProcess,
}

impl MeshLab {
    /// Two pods; an echo server in `server` on ports 8080 and 9090 (dual-stack).
    pub fn new(test: &str, layout: Layout) -> MeshLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new(test).expect("lab");
        let client = lab.add_pod("client").expect("client pod");
        let server = lab.add_pod("server").expect("server pod");
        let client = SidecarPod::new(&lab, client, sidecar_bin(), layout.placement())
            .expect("the client's sidecar cgroup");
        let app_cgroup = client.app_cgroup().expect("app cgroup");
        let echo = server
            .command(labtool())
            .args([
                "echo-server",
                "--listen",
                "[::]:8080",
                "--listen",
                "[::]:9090",
            ])
            .spawn()
            .expect("echo server");
        for port in [ECHO_PORT, OTHER_PORT] {
            wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), port), READY)
                .expect("echo server listening");
        }
        MeshLab {
            lab,
            client,
            server,
            layout,
            app_cgroup,
            echo,
        }
    }

    /// Installs capture with `extra` init options; it is removed at teardown.
    pub fn init(&self, extra: &[&str]) -> Output {
        let out = self.run_init(extra);
        assert!(out.status.success(), "sidecar init failed:\n{}", text(&out));
        out
    }

    pub fn run_init(&self, extra: &[&str]) -> Output {
        self.client
            .init(self.layout.capture(), extra)
            .expect("run sidecar init")
    }

    pub fn proxy_cgroup(&self) -> PathBuf {
        self.client.proxy_cgroup().to_path_buf()
    }

    /// Starts the proxy in the client pod and waits for its readiness endpoint.
    pub fn start_proxy(&mut self) {
        self.start_proxy_with(&[]);
    }

    /// [`MeshLab::start_proxy`] with `extra` proxy options.
    pub fn start_proxy_with(&mut self, extra: &[&str]) {
        let command = self
            .client
            .proxy_command()
            .args(["--log-format", "json", "--workload-name", "client"])
            .args(extra);
        if let Err(error) = self.client.start_proxy(command) {
            panic!("{error:#}");
        }
    }

    /// SIGKILLs the proxy (a crash: nothing of it runs on the way out) and reaps it.
    pub fn kill_proxy(&mut self) {
        let proxy = self.client.take_proxy().expect("proxy started");
        proxy.kill().expect("SIGKILL the proxy");
    }

    /// `labtool connect` from the client app (in the pod's app cgroup, optionally as a user).
    pub fn connect_as(
        &self,
        target: SocketAddr,
        user: Option<u32>,
    ) -> Result<ConnectReport, String> {
        let mut cmd = self
            .client
            .command(labtool())
            .in_cgroup(&self.app_cgroup)
            .args(["connect", &target.to_string()]);
        if let Some(id) = user {
            cmd = cmd.as_user(id, id);
        }
        let out = cmd.run().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(text(&out));
        }
        ConnectReport::from_output(&out).map_err(|e| format!("{e:#}\n{}", text(&out)))
    }

    pub fn connect(&self, target: SocketAddr) -> ConnectReport {
        self.connect_as(target, None)
            .unwrap_or_else(|e| panic!("connect to {target} failed: {e}"))
    }

    pub fn server_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().into(), port)
    }

    pub fn server_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv6().into(), port)
    }

    pub fn server_mapped(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().to_ipv6_mapped().into(), port)
    }

    /// Sum of a proxy metric over all its label sets.
    pub fn proxy_metric(&self, name: &str) -> u64 {
        proxy_metric(&self.client, name, &[])
    }

    /// Everything the proxy has logged, once the lines of what just happened are out: the
    /// proxy writes informational lines in batches, within 100 ms (`sidecar-proxy/src/telemetry/log_buffer.rs`).
    pub fn proxy_log(&self) -> String {
        std::thread::sleep(LOG_FLUSH_WAIT);
        assert!(self.client.proxy().is_some(), "proxy started");
        self.client.proxy_logs()
    }

    /// The kernel-side counters of the client pod's capture, from `sidecar status --json`.
    pub fn bpf_counters(&self) -> BpfCounters {
        BpfCounters::from(
            self.ebpf_status()
                .expect("capture installed for the client pod"),
        )
    }

    /// The client pod's entry in `sidecar status --json`, if any.
    pub fn ebpf_status(&self) -> Option<CaptureReport> {
        status_of(self.client.cgroup())
    }

    /// `iptables`/`ip6tables -t nat -S` inside the client pod.
    pub fn nat_rules(&self, cmd: &str) -> String {
        let out = self
            .client
            .command(cmd)
            .args(["-w", "-t", "nat", "-S"])
            .run_success()
            .expect("list rules");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// `sidecar status --json`, typed: a key missing or renamed fails here, naming it.
pub fn status_report() -> StatusReport {
    sidecar_tests::status_report(&sidecar_bin()).unwrap_or_else(|error| panic!("{error:#}"))
}

/// The entry of the capture of `cgroup` in `sidecar status --json`, if any.
pub fn status_of(cgroup: &Path) -> Option<CaptureReport> {
    status_report().capture_of(cgroup).cloned()
}

/// The capture of `cgroup` has its nine links, and each pod-cgroup hook has exactly its
/// own program attached to the cgroup.
pub fn assert_fully_attached(cgroup: &Path) {
    let capture = status_of(cgroup).unwrap_or_else(|| panic!("no capture for {cgroup:?}"));
    assert_eq!(capture.links.len(), 9, "{capture:?}");
    for link in capture
        .links
        .iter()
        .filter(|l| l.attached_to == AttachPoint::PodCgroup)
    {
        assert_eq!(
            link.attached_program_ids,
            [link.program_id],
            "{cgroup:?}: {link:?}"
        );
    }
}

/// Sum of the samples of `name` having every `label="value"` in the metrics of `pod`'s proxy
/// (which must be a valid exposition). The metric must be there with a series for those
/// labels: a misspelt or renamed one fails, naming what is there.
pub fn proxy_metric(pod: &Pod, name: &str, labels: &[(&str, &str)]) -> u64 {
    sidecar_tests::prometheus::sum(&scrape_proxy(pod), name, labels)
        .unwrap_or_else(|error| panic!("the proxy's metrics: {error}")) as u64
}

/// As [`proxy_metric`], but 0 while the metric has no series for those labels yet (a series
/// the proxy creates on first use): for waiting until it counts. The metric must be there.
pub fn proxy_metric_or_zero(pod: &Pod, name: &str, labels: &[(&str, &str)]) -> u64 {
    sidecar_tests::prometheus::sum_or_zero_if_family_present(&scrape_proxy(pod), name, labels)
        .unwrap_or_else(|error| panic!("the proxy's metrics: {error}")) as u64
}

/// As [`proxy_metric`], but None while the proxy does not export a series of `name` with those
/// labels at all (a gauge exported once it has something to say).
pub fn proxy_metric_if_exported(pod: &Pod, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    sidecar_tests::prometheus::sum_if_exported(&scrape_proxy(pod), name, labels)
        .unwrap_or_else(|error| panic!("the proxy's metrics do not parse: {error}"))
        .map(|value| value as u64)
}

fn scrape_proxy(pod: &Pod) -> String {
    proxy_metrics(pod).unwrap_or_else(|error| panic!("{error:#}"))
}

/// IPv4-mapped addresses as plain IPv4, so dual-stack servers' reports compare equal.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// How long a test waits for a metric to reach what it expects.
pub const METRIC_PATIENCE: Duration = Duration::from_secs(10);

/// Waits until the sum of `name`{`labels`} in `pod`'s proxy reaches `goal` (a series not there
/// yet counts 0; the metric must be in the exposition); panics with `logs()` if it never does.
pub fn wait_for_metric(
    pod: &Pod,
    name: &str,
    labels: &[(&str, &str)],
    goal: MetricGoal,
    logs: impl FnOnce() -> String,
) {
    if let Err(error) = wait_for_proxy_metric(pod, name, labels, goal, METRIC_PATIENCE) {
        panic!("{error:#}\n{}", logs());
    }
}
