//! `cargo xtask lab`: the demo. Two pods in network namespaces; a real HTTP request from the
//! client pod's app to the server pod, intercepted by the client pod's sidecar; the proxy's log
//! line, metrics and the capture counters printed; everything torn down.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use sidecar_tests::{Lab, Pod, wait_for_http_ok, wait_for_tcp};

use crate::{
    build::{self, BuildOptions},
    setup,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Ebpf,
    Iptables,
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

const PROXY_ID: u32 = 1337;
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
        .args(["http-server", "--listen", "[::]:8080", "--name", "server"])
        .spawn()?;
    wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), 8080), WAIT)?;

    println!("\n== sidecar init ({mode:?}) for the client pod");
    install_capture(lab, &client, &sidecar, mode)?;

    let proxy = client
        .command(&sidecar)
        .in_cgroup(client.cgroup_child("proxy")?)
        .as_user(PROXY_ID, PROXY_ID)
        .args([
            "proxy",
            "--workload-name",
            "client",
            "--workload-namespace",
            "lab",
        ])
        .spawn()?;
    wait_for_http_ok(&client, "http://127.0.0.1:15021/healthz/ready", WAIT)
        .context("the proxy did not become ready")?;
    println!(
        "proxy ready (UID {PROXY_ID}, cgroup {})",
        client.cgroup_child("proxy")?.display()
    );

    let url = format!("http://{}:8080/hello", server.ipv4());
    println!("\n== the app in the client pod runs: curl {url}");
    let response = client
        .command("curl")
        .in_cgroup(client.cgroup_child("app")?)
        .args(["-sS", "-i", "--max-time", "5", &url])
        .run_success()?;
    print!("{}", String::from_utf8_lossy(&response.stdout));

    std::thread::sleep(Duration::from_millis(200));
    println!("\n== the proxy's log");
    for line in proxy
        .stdout_text()
        .lines()
        .chain(proxy.stderr_text().lines())
    {
        println!("  {line}");
    }
    println!("\n== the proxy's metrics (127.0.0.1:15020/stats/prometheus)");
    let metrics = wait_for_http_ok(&client, "http://127.0.0.1:15020/stats/prometheus", WAIT)?.body;
    for line in metrics.lines().filter(|l| l.starts_with("istio_tcp_")) {
        println!("  {line}");
    }
    println!("\n== capture status");
    let status = match mode {
        Mode::Ebpf => Command::new(&sidecar).arg("status").output()?,
        Mode::Iptables => client.command(&sidecar).arg("status").run()?,
    };
    let text = String::from_utf8_lossy(&status.stdout);
    let ours = client.cgroup().display().to_string();
    let mut in_ours = false;
    for line in text.lines() {
        if line.starts_with("eBPF capture on") {
            in_ours = line.contains(&ours);
        } else if line.starts_with("iptables") || line.starts_with("eBPF capture:") {
            in_ours = mode == Mode::Iptables;
        }
        if in_ours {
            println!("  {line}");
        }
    }
    Ok(())
}

fn install_capture(lab: &Lab, client: &Pod, sidecar: &Path, mode: Mode) -> Result<()> {
    let output = match mode {
        Mode::Ebpf => {
            let cgroup: PathBuf = client.cgroup().to_path_buf();
            let out = Command::new(sidecar)
                .arg("init")
                .arg("--cgroup")
                .arg(&cgroup)
                .arg("--netns")
                .arg(client.netns_path())
                .output()?;
            let cleanup_bin = sidecar.to_path_buf();
            lab.on_teardown(move || {
                let _ = Command::new(cleanup_bin)
                    .arg("cleanup")
                    .arg("--cgroup")
                    .arg(cgroup)
                    .output();
            });
            out
        }
        Mode::Iptables => client
            .command(sidecar)
            .args(["init", "--mode", "iptables"])
            .run()?,
    };
    print!("{}", String::from_utf8_lossy(&output.stdout));
    if !output.status.success() {
        bail!(
            "sidecar init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
