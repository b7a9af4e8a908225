//! The scenarios of docs/BENCHMARKS.md and the lab each one runs in: a fresh lab per run,
//! so no scenario inherits another's conntrack state, rules, programs or TIME_WAIT sockets.
//!
//! Topology: pod `client` (cgroups `app` for the load generator and `proxy` for its sidecar,
//! both pinned to CPU 0) and pod `server` (cgroups `app` for the server and `proxy` for its
//! sidecar in the two-sidecar scenarios, both pinned to CPU 1). Every proxy runs as UID/GID
//! 1337 in its pod's `proxy` cgroup: the one exemption criterion of both capture modes.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use sidecar_common::CaptureReport;
use sidecar_tests::{
    CaptureMode, Lab, LabProcess, PROXY_ID, Pod, PodCommand, ProxyPlacement, SidecarPod,
    prometheus, proxy_metrics, wait_for_tcp,
};

use super::{haproxy, mesh, metrics, workload::WorkloadKind};

pub const SERVER_PORT: u16 = 8080;
pub const OUTBOUND_PORT: u16 = 15001;
/// The CPU of each pod: the client's app and sidecar share one, like an app and its sidecar on
/// a node; the server pod has the other, like a second node.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;
/// Per-netns sysctls set in both pods: connection churn must not run out of ports.
pub const POD_SYSCTLS: &[&str] = &[
    "net.ipv4.ip_local_port_range=10000 65000",
    "net.ipv4.tcp_tw_reuse=1",
];
const READY: Duration = Duration::from_secs(10);

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ValueEnum,
)]
pub enum Scenario {
    #[value(name = "B0")]
    B0,
    #[value(name = "P0")]
    P0,
    /// B0 with conntrack switched on in both pods.
    #[value(name = "B0-ct")]
    #[serde(rename = "B0-ct")]
    B0Ct,
    /// P0 with conntrack switched on in both pods.
    #[value(name = "P0-ct")]
    #[serde(rename = "P0-ct")]
    P0Ct,
    #[value(name = "I1")]
    I1,
    #[value(name = "E1")]
    E1,
    #[value(name = "H1")]
    H1,
    #[value(name = "I2")]
    I2,
    #[value(name = "E2")]
    E2,
    #[value(name = "E2s")]
    E2s,
    #[value(name = "I2-mTLS")]
    #[serde(rename = "I2-mTLS")]
    I2Mtls,
    #[value(name = "E2-mTLS")]
    #[serde(rename = "E2-mTLS")]
    E2Mtls,
    /// H1 with HAProxy in `mode http`.
    #[value(name = "H1-http")]
    #[serde(rename = "H1-http")]
    H1Http,
    /// I1 with HTTP detection and routing on.
    #[value(name = "I1-http")]
    #[serde(rename = "I1-http")]
    I1Http,
    /// E1 with HTTP detection and routing on.
    #[value(name = "E1-http")]
    #[serde(rename = "E1-http")]
    E1Http,
    /// E2 with HTTP detection and routing on.
    #[value(name = "E2-http")]
    #[serde(rename = "E2-http")]
    E2Http,
    /// E2-mTLS with HTTP detection and routing on.
    #[value(name = "E2-mTLS-http")]
    #[serde(rename = "E2-mTLS-http")]
    E2MtlsHttp,
}

impl Scenario {
    pub const ALL: [Scenario; 17] = [
        Scenario::B0,
        Scenario::P0,
        Scenario::B0Ct,
        Scenario::P0Ct,
        Scenario::I1,
        Scenario::E1,
        Scenario::H1,
        Scenario::I2,
        Scenario::E2,
        Scenario::E2s,
        Scenario::I2Mtls,
        Scenario::E2Mtls,
        Scenario::H1Http,
        Scenario::I1Http,
        Scenario::E1Http,
        Scenario::E2Http,
        Scenario::E2MtlsHttp,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Scenario::B0 => "B0",
            Scenario::P0 => "P0",
            Scenario::B0Ct => "B0-ct",
            Scenario::P0Ct => "P0-ct",
            Scenario::I1 => "I1",
            Scenario::E1 => "E1",
            Scenario::H1 => "H1",
            Scenario::I2 => "I2",
            Scenario::E2 => "E2",
            Scenario::E2s => "E2s",
            Scenario::I2Mtls => "I2-mTLS",
            Scenario::E2Mtls => "E2-mTLS",
            Scenario::H1Http => "H1-http",
            Scenario::I1Http => "I1-http",
            Scenario::E1Http => "E1-http",
            Scenario::E2Http => "E2-http",
            Scenario::E2MtlsHttp => "E2-mTLS-http",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::B0 => "no proxy: the client dials the server",
            Scenario::P0 => "the client dials its proxy explicitly (--orig-dst explicit)",
            Scenario::B0Ct => {
                "B0 with conntrack on in both pods (a nat rule that rewrites nothing)"
            }
            Scenario::P0Ct => {
                "P0 with conntrack on in both pods (a nat rule that rewrites nothing)"
            }
            Scenario::I1 => "iptables REDIRECT (istio-init rules) to the client's proxy",
            Scenario::E1 => "eBPF connect-time redirect to the client's proxy",
            Scenario::H1 => "iptables REDIRECT to HAProxy (mode tcp, transparent)",
            Scenario::I2 => "iptables in both pods, outbound and inbound, two sidecars, plaintext",
            Scenario::E2 => {
                "eBPF in both pods (connect redirect, sk_lookup), two sidecars, plaintext"
            }
            Scenario::E2s => "E2 with the sockmap shortcut of both app-proxy hops (init --sockmap)",
            Scenario::I2Mtls => "I2 with mTLS between the sidecars (STRICT inbound)",
            Scenario::E2Mtls => "E2 with mTLS between the sidecars (STRICT inbound)",
            Scenario::H1Http => {
                "iptables REDIRECT to HAProxy in `mode http` (keep-alive to the server)"
            }
            Scenario::I1Http => "I1 with HTTP detection and routing on (the sidecar's default)",
            Scenario::E1Http => "E1 with HTTP detection and routing on (the sidecar's default)",
            Scenario::E2Http => "E2 with HTTP detection and routing on in both sidecars",
            Scenario::E2MtlsHttp => "E2-mTLS with HTTP detection and routing on in both sidecars",
        }
    }

    fn capture(self) -> Capture {
        match self {
            Scenario::B0 | Scenario::P0 => Capture::None,
            Scenario::B0Ct | Scenario::P0Ct => Capture::ConntrackOnly,
            Scenario::I1
            | Scenario::H1
            | Scenario::I2
            | Scenario::I2Mtls
            | Scenario::H1Http
            | Scenario::I1Http => Capture::Iptables,
            Scenario::E1
            | Scenario::E2
            | Scenario::E2s
            | Scenario::E2Mtls
            | Scenario::E1Http
            | Scenario::E2Http
            | Scenario::E2MtlsHttp => Capture::Ebpf,
        }
    }

    fn proxy(self) -> ProxyKind {
        match self {
            Scenario::B0 | Scenario::B0Ct => ProxyKind::None,
            Scenario::P0 | Scenario::P0Ct => ProxyKind::SidecarExplicit,
            Scenario::H1 | Scenario::H1Http => ProxyKind::Haproxy,
            _ => ProxyKind::Sidecar,
        }
    }

    /// Both pods captured in both directions, each with its sidecar.
    pub fn two_sidecars(self) -> bool {
        matches!(
            self,
            Scenario::I2
                | Scenario::E2
                | Scenario::E2s
                | Scenario::I2Mtls
                | Scenario::E2Mtls
                | Scenario::E2Http
                | Scenario::E2MtlsHttp
        )
    }

    /// The proxies parse HTTP and route each request (the sidecar's default, HAProxy's
    /// `mode http`); the other proxied scenarios relay the server port as opaque TCP.
    pub fn http_aware(self) -> bool {
        matches!(
            self,
            Scenario::H1Http
                | Scenario::I1Http
                | Scenario::E1Http
                | Scenario::E2Http
                | Scenario::E2MtlsHttp
        )
    }

    /// Whether `kind` is measured in this scenario: the HTTP-aware scenarios exist for the HTTP
    /// path, so they skip the opaque workloads the TCP scenarios measure already.
    pub fn runs(self, kind: WorkloadKind) -> bool {
        !self.http_aware() || kind.is_http()
    }

    pub fn uses_haproxy(self) -> bool {
        self.proxy() == ProxyKind::Haproxy
    }

    /// Both pods' app-proxy hops short-circuited with sockmap.
    pub fn sockmap_shortcut(self) -> bool {
        self == Scenario::E2s
    }

    fn mtls(self) -> bool {
        matches!(
            self,
            Scenario::I2Mtls | Scenario::E2Mtls | Scenario::E2MtlsHttp
        )
    }

    /// Whether this scenario's BPF programs are worth profiling with `bpf_stats`.
    pub fn uses_ebpf(self) -> bool {
        self.capture() == Capture::Ebpf
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.id())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    /// No redirect, but conntrack tracks every connection, as under any nat rule.
    ConntrackOnly,
    Iptables,
    Ebpf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ProxyKind {
    None,
    /// The sidecar with a fixed upstream: the proxy's cost without any redirect.
    SidecarExplicit,
    Sidecar,
    Haproxy,
}

/// The binaries every scenario runs: the same release build throughout.
pub struct Binaries {
    pub sidecar: PathBuf,
    pub labtool: PathBuf,
}

/// The `sidecar proxy` options of every sidecar in every scenario (recorded in the results);
/// each also gets `--mesh-config` (see `mesh`).
pub fn sidecar_proxy_args(workload: &str) -> Vec<String> {
    [
        "proxy",
        "--worker-threads",
        "1",
        "--workload-name",
        workload,
        "--workload-namespace",
        "bench",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// CPU time of the cgroups that do the work, in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CpuUsage {
    pub client_app: u64,
    pub client_proxy: u64,
    /// The server app.
    pub server: u64,
    #[serde(default)]
    pub server_proxy: u64,
}

impl CpuUsage {
    pub fn since(self, before: CpuUsage) -> CpuUsage {
        CpuUsage {
            client_app: self.client_app.saturating_sub(before.client_app),
            client_proxy: self.client_proxy.saturating_sub(before.client_proxy),
            server: self.server.saturating_sub(before.server),
            server_proxy: self.server_proxy.saturating_sub(before.server_proxy),
        }
    }

    pub fn proxies(self) -> u64 {
        self.client_proxy + self.server_proxy
    }

    pub fn total(self) -> u64 {
        self.client_app + self.server + self.proxies()
    }
}

/// One side of the lab: a pod with its sidecar's place (the proxy's cgroup), its app's cgroup,
/// and its CPU, which everything in the pod is pinned to.
struct Side {
    pod: SidecarPod,
    app_cgroup: PathBuf,
    cpu: usize,
}

impl Side {
    fn new(lab: &Lab, name: &str, cpu: usize, sidecar: &Path) -> Result<Side> {
        let pod = lab.add_pod(name)?;
        for sysctl in POD_SYSCTLS {
            pod.command("sysctl")
                .args(["-q", "-w", sysctl])
                .run_success()?;
        }
        Ok(Side {
            app_cgroup: pod.cgroup_child("app")?,
            pod: SidecarPod::new(lab, pod, sidecar, ProxyPlacement::InPod)?.pinned_to_cpu(cpu),
            cpu,
        })
    }

    /// `program` in this pod's app cgroup, pinned to its CPU (taskset execs: the pid stays the
    /// program's).
    fn app_command(&self, program: &Path) -> PodCommand {
        self.pod
            .command("taskset")
            .in_cgroup(&self.app_cgroup)
            .args(["-c", &self.cpu.to_string()])
            .arg(program)
    }

    fn scrape(&self) -> Result<String> {
        proxy_metrics(&self.pod)
    }

    /// Connections the sidecar's `listener` (`outbound`, `inbound`) has accepted, whatever
    /// their protocol.
    fn scrape_connections_accepted(&self, listener: &str) -> Result<u64> {
        let name = "sidecar_listener_connections_accepted_total";
        let accepted = prometheus::sum(&self.scrape()?, name, &[("listener", listener)])
            .map_err(|error| anyhow!("the proxy's metrics: {error}"))?;
        Ok(accepted as u64)
    }

    /// HTTP requests the sidecar has proxied as the source's reporter. Read once the warm-up
    /// has sent requests: a series missing then (a renamed metric) is an error.
    fn scrape_requests(&self) -> Result<u64> {
        let labels = [("reporter", "source")];
        let requests = prometheus::sum(&self.scrape()?, "istio_requests_total", &labels)
            .map_err(|error| anyhow!("the proxy's metrics: {error}"))?;
        Ok(requests as u64)
    }
}

/// A running scenario: pods, server, capture and proxies. Dropping it tears the lab down.
pub struct ScenarioLab {
    pub scenario: Scenario,
    lab: Lab,
    client: Side,
    server: Side,
    labtool: PathBuf,
    sidecar: PathBuf,
    processes: Vec<LabProcess>,
    /// The client's proxy (sidecar or HAProxy), for its peak RSS.
    proxy_pid: Option<u32>,
    haproxy_stats: Option<PathBuf>,
}

impl ScenarioLab {
    pub fn start(scenario: Scenario, bins: &Binaries) -> Result<ScenarioLab> {
        let lab = Lab::new(&format!("bench-{scenario}"))?;
        let mut this = ScenarioLab {
            scenario,
            client: Side::new(&lab, "client", CLIENT_CPU, &bins.sidecar)?,
            server: Side::new(&lab, "server", SERVER_CPU, &bins.sidecar)?,
            lab,
            labtool: bins.labtool.clone(),
            sidecar: bins.sidecar.clone(),
            processes: Vec::new(),
            proxy_pid: None,
            haproxy_stats: None,
        };
        this.start_server()?;
        this.install_capture()?;
        this.start_proxies()?;
        Ok(this)
    }

    /// Where the load generator connects: the server, or the proxy's port in P0.
    pub fn connect_to(&self) -> SocketAddr {
        match self.scenario.proxy() {
            ProxyKind::SidecarExplicit => (Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into(),
            _ => self.server_addr(),
        }
    }

    /// The address the server must see every connection arrive on.
    pub fn server_addr(&self) -> SocketAddr {
        (self.server.pod.ipv4(), SERVER_PORT).into()
    }

    pub fn dir(&self) -> &Path {
        self.lab.dir()
    }

    /// The load generator, in the client pod's app cgroup on the client CPU.
    pub fn load_client(&self, spec_json: &str) -> PodCommand {
        self.client
            .app_command(&self.labtool)
            .args(["load-client", "--spec", spec_json])
    }

    /// h2load, where the load generator runs.
    pub fn h2load(&self, args: &[String]) -> PodCommand {
        self.client.app_command(Path::new("h2load")).args(args)
    }

    /// The URL of the server as the app dials it.
    pub fn url(&self) -> String {
        format!("http://{}/", self.connect_to())
    }

    pub fn cpu_usage(&self) -> Result<CpuUsage> {
        Ok(CpuUsage {
            client_app: metrics::cgroup_cpu_usec(&self.client.app_cgroup)?,
            client_proxy: metrics::cgroup_cpu_usec(self.client.pod.proxy_cgroup())?,
            server: metrics::cgroup_cpu_usec(&self.server.app_cgroup)?,
            server_proxy: metrics::cgroup_cpu_usec(self.server.pod.proxy_cgroup())?,
        })
    }

    /// Connections the client's proxy has accepted so far (None without a proxy).
    pub fn proxy_connections(&self) -> Result<Option<u64>> {
        match self.scenario.proxy() {
            ProxyKind::None => Ok(None),
            ProxyKind::Sidecar | ProxyKind::SidecarExplicit => self
                .client
                .scrape_connections_accepted("outbound")
                .map(Some),
            ProxyKind::Haproxy => {
                let socket = self
                    .haproxy_stats
                    .as_deref()
                    .context("HAProxy not started")?;
                haproxy::frontend_total(socket, haproxy::Total::Connections).map(Some)
            }
        }
    }

    /// HTTP requests the client's proxy has handled so far (HTTP-aware scenarios only).
    pub fn proxy_requests(&self) -> Result<Option<u64>> {
        if !self.scenario.http_aware() {
            return Ok(None);
        }
        match &self.haproxy_stats {
            Some(socket) => haproxy::frontend_total(socket, haproxy::Total::Requests).map(Some),
            None => self.client.scrape_requests().map(Some),
        }
    }

    /// Connections the server's proxy has accepted so far (two-sidecar scenarios only).
    pub fn server_proxy_connections(&self) -> Result<Option<u64>> {
        if !self.scenario.two_sidecars() {
            return Ok(None);
        }
        self.server.scrape_connections_accepted("inbound").map(Some)
    }

    /// The client proxy's peak resident memory so far, in KiB.
    pub fn proxy_peak_rss_kib(&self) -> Result<Option<u64>> {
        self.proxy_pid.map(metrics::peak_rss_kib).transpose()
    }

    /// The kernel counters of the client pod's eBPF capture (None for other scenarios).
    pub fn capture_counters(&self) -> Result<Option<BTreeMap<String, u64>>> {
        self.counters_of(&self.client)
    }

    /// The kernel counters of the server pod's eBPF capture (two-sidecar eBPF scenarios).
    pub fn server_capture_counters(&self) -> Result<Option<BTreeMap<String, u64>>> {
        if !self.scenario.two_sidecars() {
            return Ok(None);
        }
        self.counters_of(&self.server)
    }

    /// Original destinations of the client pod waiting in the kernel's handoff for the proxy's
    /// end of their handshake (None for other scenarios): 0 once connects have settled.
    pub fn orig_dst_index_entries(&self) -> Result<Option<usize>> {
        if self.scenario.capture() != Capture::Ebpf {
            return Ok(None);
        }
        let pending = self.ebpf_status(&self.client)?.pending_handoffs;
        Ok(Some(usize::try_from(pending)?))
    }

    /// `(name, program id)` of every program attached for the pods; the server pod's programs
    /// are named `server/<program>`.
    pub fn bpf_programs(&self) -> Result<Vec<(String, u32)>> {
        let mut programs = self.programs_of(&self.client, "")?;
        if self.scenario.two_sidecars() {
            programs.extend(self.programs_of(&self.server, "server/")?);
        }
        Ok(programs)
    }

    /// Stops everything and fails if anything could not be removed.
    pub fn finish(self) -> Result<()> {
        self.lab.teardown()
    }

    fn counters_of(&self, side: &Side) -> Result<Option<BTreeMap<String, u64>>> {
        if self.scenario.capture() != Capture::Ebpf {
            return Ok(None);
        }
        Ok(Some(self.ebpf_status(side)?.counters))
    }

    fn programs_of(&self, side: &Side, prefix: &str) -> Result<Vec<(String, u32)>> {
        let capture = self.ebpf_status(side)?;
        Ok(capture
            .links
            .into_iter()
            .map(|link| (format!("{prefix}{}", link.program), link.program_id))
            .collect())
    }

    fn ebpf_status(&self, side: &Side) -> Result<CaptureReport> {
        side.pod
            .capture_report()?
            .with_context(|| format!("no eBPF capture listed for {}", side.pod.cgroup().display()))
    }

    fn start_server(&mut self) -> Result<()> {
        let server = self
            .server
            .app_command(&self.labtool)
            .args(["load-server", "--listen", &format!("[::]:{SERVER_PORT}")])
            .spawn()?;
        wait_for_tcp(&self.server.pod, self.server_addr(), READY)?;
        self.processes.push(server);
        Ok(())
    }

    fn install_capture(&self) -> Result<()> {
        if self.scenario.capture() == Capture::None {
            return Ok(());
        }
        if self.scenario.capture() == Capture::ConntrackOnly {
            for pod in [&self.client.pod, &self.server.pod] {
                switch_conntrack_on(pod)?;
            }
            return Ok(());
        }
        self.capture_pod(&self.client.pod)?;
        if self.scenario.two_sidecars() {
            self.capture_pod(&self.server.pod)?;
        }
        Ok(())
    }

    /// `sidecar init` for `pod`: outbound only in the one-sidecar scenarios, both directions
    /// in the two-sidecar ones. An eBPF capture is removed with the lab, even a half-done one.
    fn capture_pod(&self, pod: &SidecarPod) -> Result<()> {
        let mode = match self.scenario.capture() {
            Capture::None | Capture::ConntrackOnly => return Ok(()),
            Capture::Iptables => CaptureMode::Iptables,
            Capture::Ebpf => CaptureMode::Ebpf,
        };
        let mut options = Vec::new();
        if !self.scenario.two_sidecars() {
            options.push("--no-inbound-capture");
        }
        if self.scenario.sockmap_shortcut() {
            options.push("--sockmap");
        }
        check_init(pod.init(mode, &options)?, self.scenario, pod)
    }

    fn start_proxies(&mut self) -> Result<()> {
        match self.scenario.proxy() {
            ProxyKind::None => Ok(()),
            ProxyKind::Haproxy => self.start_haproxy(),
            ProxyKind::SidecarExplicit | ProxyKind::Sidecar => {
                let dir = self.lab.dir().join("mesh");
                let protocol = if self.scenario.http_aware() {
                    mesh::ServerPort::Detected
                } else {
                    mesh::ServerPort::OpaqueTcp
                };
                let configs = if self.scenario.mtls() {
                    let server_ip = self.server.pod.ipv4();
                    mesh::write_mtls(&self.sidecar, &dir, server_ip, protocol)?
                } else {
                    mesh::write_plaintext(&dir, protocol)?
                };
                let config_args =
                    |path: &Path| vec!["--mesh-config".to_owned(), path.display().to_string()];
                if self.scenario.two_sidecars() {
                    self.start_sidecar(Role::Server, &config_args(&configs.server))?;
                }
                let mut args = config_args(&configs.client);
                if self.scenario.proxy() == ProxyKind::SidecarExplicit {
                    let target = self.server_addr().to_string();
                    args.extend(["--orig-dst", "explicit", "--target", &target].map(str::to_owned));
                }
                let pid = self.start_sidecar(Role::Client, &args)?;
                self.proxy_pid = Some(pid);
                Ok(())
            }
        }
    }

    /// Starts a sidecar proxy in the client or server pod and waits for its readiness.
    fn start_sidecar(&mut self, role: Role, extra: &[impl AsRef<str>]) -> Result<u32> {
        let (side, name) = match role {
            Role::Client => (&mut self.client, "client"),
            Role::Server => (&mut self.server, "server"),
        };
        let command = side
            .pod
            .proxy_place_command(&self.sidecar)
            .args(sidecar_proxy_args(name))
            .args(extra.iter().map(AsRef::as_ref));
        let proxy = side
            .pod
            .start_proxy(command)
            .with_context(|| format!("the {name} proxy is not ready"))?;
        Ok(proxy.pid())
    }

    fn start_haproxy(&mut self) -> Result<()> {
        let mode = if self.scenario.http_aware() {
            haproxy::Mode::Http
        } else {
            haproxy::Mode::Tcp
        };
        let files = haproxy::write_config(self.lab.dir(), PROXY_ID, mode)?;
        let proxy = self
            .client
            .pod
            .proxy_place_command("haproxy")
            .args(["-db", "-f"])
            .arg(&files.config)
            .spawn()?;
        let listener = (Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into();
        wait_for_tcp(&self.client.pod, listener, READY).context("HAProxy is not listening")?;
        self.proxy_pid = Some(proxy.pid());
        self.processes.push(proxy);
        self.haproxy_stats = Some(files.stats_socket);
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Role {
    Client,
    Server,
}

fn check_init(output: Output, scenario: Scenario, pod: &SidecarPod) -> Result<()> {
    if !output.status.success() {
        bail!(
            "sidecar init for {scenario} in pod {} failed: {}",
            pod.name(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Makes conntrack track every connection of `pod` without rewriting any: a nat table rule
/// registers the nat hooks, which need conntrack (as istio-init's rules do), and RETURN
/// changes nothing. bench.md: B0/P0 with and without conntrack.
fn switch_conntrack_on(pod: &Pod) -> Result<()> {
    for table_rule in [
        ["-t", "nat", "-A", "OUTPUT"],
        ["-t", "nat", "-A", "PREROUTING"],
    ] {
        pod.command("iptables")
            .arg("-w")
            .args(table_rule)
            .args(["-p", "tcp", "-j", "RETURN"])
            .run_success()?;
    }
    Ok(())
}
