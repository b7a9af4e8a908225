//! `cargo xtask lab`: the demo. Two pods in network namespaces, each with its sidecar; a real
//! HTTP request from the client pod's app to the server pod, captured outbound on one side and
//! inbound on the other, carried over mTLS between the two proxies; both proxies' access lines
//! (with the peer identities), their request metrics (the client's as Istio's source reports
//! them, the server's as its destination does) and the capture counters printed; all torn down.
use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use sidecar_common::StatusReport;
use sidecar_tests::{
    CaptureMode, Lab, MeshPki, PROXY_ID, Pod, ProxyPlacement, SidecarPod, identity_config,
    proxy_metrics, status_report, wait_for_tcp,
};

use crate::{
    build::{self, BuildOptions},
    setup,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    fn capture(self) -> CaptureMode {
        match self {
            Mode::Ebpf => CaptureMode::Ebpf,
            Mode::Iptables => CaptureMode::Iptables,
        }
    }
}

#[derive(Args)]
pub struct LabOptions {
    /// Capture mechanism for the client pod.
    #[arg(long, value_enum, default_value = "ebpf")]
    pub mode: Mode,
    /// Use release binaries.
    #[arg(long)]
    pub release: bool,
}

const WAIT: Duration = Duration::from_secs(10);

pub fn run(opts: &LabOptions) -> Result<()> {
    setup::run()?;
    let bin = build::build_all(&BuildOptions {
        release: opts.release,
    })?;
    if !rustix::process::geteuid().is_root() {
        bail!("the lab creates network namespaces and loads BPF programs: run it as root");
    }
    let lab = Lab::new("demo")?;
    let result = demo(&lab, &bin, opts.mode);
    println!("\n== teardown");
    lab.teardown()?;
    println!("lab: pods, namespaces, cgroups, programs and pins removed");
    result
}

fn demo(lab: &Lab, bin: &Path, mode: Mode) -> Result<()> {
    let sidecar = bin.join("sidecar");
    let labtool = bin.join("labtool");
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    println!("== pods");
    for pod in [&client, &server] {
        println!(
            "  {:<7} netns {:<22} {} / {}  cgroup {}",
            pod.name(),
            pod.netns(),
            pod.ipv4(),
            pod.ipv6(),
            pod.cgroup().display()
        );
    }

    let _http = server
        .command(&labtool)
        .in_cgroup(server.cgroup_child("app")?)
        .args(["http-server", "--listen", "[::]:8080", "--name", "server"])
        .spawn()?;
    wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), 8080), WAIT)?;

    println!("\n== certificates (sidecar certs): a lab CA, one SPIFFE identity per pod");
    let pki = MeshPki::create(&sidecar, lab.dir().join("certs"), Some(TRUST_DOMAIN))?;
    for pod in [&client, &server] {
        pki.issue(pod.name(), NAMESPACE, pod.name(), &[])?;
        println!("  {}: {}", pod.name(), spiffe_id(pod.name()));
    }
    write_mesh_config(&pki.dir().join("client"), MeshRole::Client(&server))?;
    write_mesh_config(&pki.dir().join("server"), MeshRole::Server)?;

    let mut pods = Vec::new();
    for pod in [&client, &server] {
        println!("\n== sidecar init ({mode:?}) for the {} pod", pod.name());
        let mut pod = SidecarPod::new(lab, pod.clone(), &sidecar, ProxyPlacement::InPod)?;
        let output = pod.install_capture(mode.capture(), &[])?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        let mesh_config = pki.dir().join(pod.name()).join("mesh.yaml");
        let name = pod.name().to_owned();
        let proxy = pod
            .proxy_command()
            .args(["--workload-name", &name, "--workload-namespace", NAMESPACE])
            .arg("--mesh-config")
            .arg(&mesh_config);
        pod.start_proxy(proxy)?;
        println!(
            "proxy ready (UID {PROXY_ID}, cgroup {})",
            pod.proxy_cgroup().display()
        );
        pods.push(pod);
    }

    let url = format!("http://{}:8080/hello", server.ipv4());
    println!("\n== the app in the client pod runs: curl {url}");
    let response = client
        .command("curl")
        .in_cgroup(client.cgroup_child("app")?)
        .args(["-sS", "-i", "--max-time", "5", &url])
        .run_success()?;
    print!("{}", String::from_utf8_lossy(&response.stdout));
    println!("(the server app sees the connection at its own pod IP, from the proxy's 127.0.0.6)");

    std::thread::sleep(Duration::from_millis(200));
    for pod in &pods {
        println!("\n== the {} proxy's access log", pod.name());
        for line in pod.proxy_logs().lines().filter(|l| l.contains("access")) {
            println!("  {line}");
        }
        println!(
            "== the {} proxy's request metrics (127.0.0.1:15020/stats/prometheus)",
            pod.name()
        );
        let metrics = proxy_metrics(pod)?;
        let requests: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("istio_requests_total"))
            .collect();
        if requests.is_empty() {
            bail!("the {} proxy reported no request", pod.name());
        }
        for line in requests {
            println!("  {line}");
        }
    }
    println!("\n== capture status (client pod)");
    print_status(&client, &sidecar, mode)
}

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "lab";

fn spiffe_id(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

enum MeshRole<'a> {
    /// Dials the server pod, which must prove the server identity.
    Client(&'a Pod),
    /// Accepts only mTLS, and only from the client identity.
    Server,
}

/// Writes `mesh.yaml` (docs/MESH_CONFIG.md) next to the pod's certificate files.
fn write_mesh_config(dir: &Path, role: MeshRole<'_>) -> Result<()> {
    let mut yaml = identity_config(TRUST_DOMAIN);
    // The demo shows each request's access line (off by default, as in Istio).
    yaml.push_str("http:\n  accessLog: true\n");
    match role {
        MeshRole::Client(server) => yaml.push_str(&format!(
            "workloads:\n  - name: server\n    addresses: [\"{}\", \"{}\"]\n    identities: [{}]\n",
            server.ipv4(),
            server.ipv6(),
            spiffe_id("server")
        )),
        MeshRole::Server => yaml.push_str(&format!(
            "inbound:\n  mode: STRICT\n  ports:\n    - port: 8080\n      allow:\n        - principal: {}\n",
            spiffe_id("client")
        )),
    }
    std::fs::write(dir.join("mesh.yaml"), yaml).context("cannot write mesh.yaml")
}

fn print_status(client: &Pod, sidecar: &Path, mode: Mode) -> Result<()> {
    let status = match mode {
        Mode::Ebpf => status_report(sidecar)?,
        Mode::Iptables => {
            let output = client.command(sidecar).args(["status", "--json"]).run()?;
            if !output.status.success() {
                bail!(
                    "sidecar status failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            StatusReport::from_json(&output.stdout).map_err(|error| anyhow!(error))?
        }
    };
    let text = match mode {
        Mode::Ebpf => status
            .capture_of(client.cgroup())
            .with_context(|| format!("no eBPF capture listed for {:?}", client.cgroup()))?
            .to_string(),
        Mode::Iptables if status.iptables.is_empty() => bail!("no iptables capture in the pod"),
        Mode::Iptables => format!(
            "iptables capture (the pod's netns):\n{}",
            status.iptables.join("\n")
        ),
    };
    for line in text.lines() {
        println!("  {line}");
    }
    Ok(())
}
