//! `sidecar node-agent` on a churning node: 500 short-lived captured pods (init, a few
//! redirected connections answered by the kernel's SO_ORIGINAL_DST, cgroup removed) are
//! collected by the agent alone, within seconds of their cgroup going, and leave no pin,
//! program or map behind; the pod alive throughout keeps every program attached. Runs as root
//! on the real kernel, alone in this binary (kernel-wide memlock sums).
mod common;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use sidecar_common::PinLayout;
use sidecar_tests::{
    Lab, Pod, require_root,
    tools::http::{self, HttpTarget},
};

const BATCHES: usize = 5;
const PODS_PER_BATCH: usize = 100;
/// Kernel memory may differ from the start by at most one pod's worth (the issue's bar).
const TOLERANCE_BYTES: u64 = 64 * 1024;
/// The agent's sweep is set far above this: collection within it proves the cgroup watch.
const COLLECTED_WITHIN: Duration = Duration::from_secs(10);

/// In a pod: listens where its proxy would (127.0.0.1:15001), makes three connections to a
/// remote address (redirected there by the capture) and checks each accepted socket's
/// SO_ORIGINAL_DST, as the proxy does. Only the proxy's UID may bind that port, so the
/// listener is bound as 1337 (real IDs, which the kernel checks; root kept as the saved ID),
/// then the app's connections are made as root, which the capture redirects.
const POD_TRAFFIC: &str = r#"
import os, socket, struct, sys
dst = (sys.argv[1], int(sys.argv[2]))
proxy = socket.socket()
proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
os.setresgid(1337, 1337, 0); os.setresuid(1337, 1337, 0)
proxy.bind(("127.0.0.1", 15001))
os.setresuid(0, 0, 0); os.setresgid(0, 0, 0)
proxy.listen(16)
for _ in range(3):
    app = socket.create_connection(dst, timeout=5)
    app.sendall(b"x")
    app.close()
    accepted, _ = proxy.accept()
    raw = accepted.getsockopt(socket.SOL_IP, 80, 16)
    got = (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
    assert got == dst, got
    accepted.close()
print("ok")
"#;

struct NodeAgent {
    child: Child,
    metrics_url: String,
    /// Its warnings and errors so far.
    stderr: Arc<Mutex<String>>,
}

impl NodeAgent {
    fn start() -> NodeAgent {
        let mut child = Command::new(sidecar_bin())
            .args([
                "node-agent",
                "--metrics-addr",
                "127.0.0.1:0",
                "--rescan-interval",
                "200ms",
                "--sweep-interval",
                "10min",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node-agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut errors = BufReader::new(child.stderr.take().unwrap());
        let collected = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while errors.read_line(&mut line).is_ok_and(|n| n > 0) {
                collected.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        // Its log goes on (a line per collection): keep the pipe from filling up.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no metrics address in: {first}"))
            .to_owned();
        NodeAgent {
            child,
            metrics_url: format!("http://{addr}/stats/prometheus"),
            stderr,
        }
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let target = HttpTarget::parse(&self.metrics_url).expect("metrics URL");
        let response = http::get(&target, Duration::from_secs(5)).expect("scrape the node agent");
        assert!(response.is_success(), "{}", response.body);
        let body = response.body;
        sidecar_tests::prometheus::sum(&body, name, labels)
            .unwrap_or_else(|error| panic!("the agent's metrics do not parse: {error}"))
            as u64
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn init(pod: &Pod) {
    let cgroup = pod.cgroup().to_string_lossy().into_owned();
    let netns = pod.netns_path().to_string_lossy().into_owned();
    let out = sidecar(&["init", "--cgroup", &cgroup, "--netns", &netns]);
    assert!(out.status.success(), "{}", text(&out));
}

fn pin_dirs() -> Vec<PathBuf> {
    PinLayout::default()
        .capture_dirs()
        .into_iter()
        .map(|(_, dir)| dir)
        .collect()
}

fn pin_dir_of(pod: &Pod) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata(pod.cgroup()).unwrap().ino();
    PinLayout::default().capture_dir(id)
}

fn node_bpf_memlock() -> u64 {
    sidecar_tests::bpf_memory::settled_bpf_memlock().expect("the node's BPF memory")
}

#[test]
fn the_node_agent_collects_500_deleted_pods_and_nothing_live() {
    require_root();
    sidecar_bin();
    let settle = sidecar(&["cleanup", "--stale"]);
    assert!(settle.status.success(), "{}", text(&settle));
    let home = Lab::new("agent").expect("lab");
    let keeper = home.add_pod("keeper").expect("pod");
    init(&keeper);
    let keeper_cgroup = keeper.cgroup().to_string_lossy().into_owned();
    home.on_teardown(move || {
        let _ = sidecar(&["cleanup", "--cgroup", &keeper_cgroup]);
    });
    let agent = NodeAgent::start();
    let start = node_bpf_memlock();

    let remote = "198.18.0.254:80";
    for batch in 0..BATCHES {
        let lab = Lab::new(&format!("churn{batch}")).expect("lab");
        let pods: Vec<Pod> = (0..PODS_PER_BATCH)
            .map(|i| lab.add_pod(&format!("c{i}")).expect("pod"))
            .collect();
        // Two at a time, as a node's kubelet starts pods (inits take the node's lock in turn).
        std::thread::scope(|scope| {
            for half in pods.chunks(PODS_PER_BATCH / 2) {
                scope.spawn(move || {
                    for pod in half {
                        init(pod);
                        let (ip, port) = remote.split_once(':').unwrap();
                        pod.command("python3")
                            .args(["-c", POD_TRAFFIC, ip, port])
                            .run_success()
                            .expect("traffic in the pod");
                    }
                });
            }
        });
        let pins: Vec<PathBuf> = pods.iter().map(pin_dir_of).collect();
        for pod in &pods {
            std::fs::remove_dir(pod.cgroup()).expect("delete the pod's cgroup");
        }
        let deleted = Instant::now();
        while pins.iter().any(|pin| pin_dirs().contains(pin)) {
            assert!(
                deleted.elapsed() < COLLECTED_WITHIN,
                "batch {batch}: deleted pods not collected within {COLLECTED_WITHIN:?}: {:?}",
                pin_dirs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_fully_attached(keeper.cgroup());
        lab.teardown().expect("teardown");
    }

    assert_eq!(
        agent.metric("sidecar_node_captures_collected_total", &[]),
        (BATCHES * PODS_PER_BATCH) as u64
    );
    assert_eq!(
        agent.metric("sidecar_node_captures", &[("state", "live")]),
        1
    );
    assert_eq!(
        agent.metric("sidecar_node_captures", &[("state", "stale")]),
        0
    );
    assert!(agent.metric("sidecar_node_kernel_memory_bytes", &[]) > 0);
    assert_eq!(pin_dirs(), vec![pin_dir_of(&keeper)], "pins left behind");
    let end = node_bpf_memlock();
    println!("kernel memory (memlock) at the start {start} bytes, after 500 pods {end} bytes");
    assert!(
        end.abs_diff(start) <= TOLERANCE_BYTES,
        "kernel memory moved from {start} to {end} bytes"
    );
    assert_fully_attached(keeper.cgroup());
    drop(agent);
    home.teardown().expect("teardown");
}

/// A process of the app's user binding the proxy's inbound port is refused by the kernel,
/// which only counts it; the agent logs it with the pod's cgroup and counts it.
#[test]
fn the_node_agent_reports_refused_binds_of_the_proxy_ports() {
    require_root();
    sidecar_bin();
    let lab = Lab::new("agent-binds").expect("lab");
    let pod = lab.add_pod("squatted").expect("pod");
    init(&pod);
    let cgroup = pod.cgroup().to_string_lossy().into_owned();
    let removal = cgroup.clone();
    lab.on_teardown(move || {
        let _ = sidecar(&["cleanup", "--cgroup", &removal]);
    });
    let agent = NodeAgent::start();
    let out = pod
        .command(SYSTEM_PYTHON)
        .in_cgroup(pod.cgroup_child("app").unwrap())
        .as_user(1000, 1000)
        .args([
            "-c",
            "import socket\ntry:\n    socket.socket(socket.AF_INET6).bind(('::', 15006))\nexcept PermissionError:\n    print('refused')\n",
        ])
        .run()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "refused",
        "{}",
        text(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.metric("sidecar_node_proxy_port_binds_refused_total", &[]) < 1 {
        assert!(
            Instant::now() < deadline,
            "not counted: {}",
            agent.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent.stderr.lock().unwrap().clone();
    assert!(
        log.contains(&format!(
            "pod cgroup {cgroup}: 1 bind(s) of the proxy's ports"
        )),
        "{log}"
    );
    drop(agent);
    lab.teardown().expect("teardown");
}
