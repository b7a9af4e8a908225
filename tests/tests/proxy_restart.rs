//! The proxy's lifecycle under eBPF capture, on the real kernel (root): what the app's connects
//! get while the proxy is down (`init --when-proxy-down refuse|direct`), and a proxy restarted
//! after SIGKILL taking over inbound and outbound capture again by itself, with no new `init`.
mod common;

use std::net::SocketAddr;

use common::*;

/// Connects once to each `host:port` given, prints one JSON line per attempt: the outcome
/// (`connected`, or the errno's name, or `TimeoutError`) and how long it took.
const CONNECT_ATTEMPTS: &str = r#"
import errno, json, socket, sys, time
for spec in sys.argv[1:]:
    host, port = spec.rsplit(':', 1)
    host = host.strip('[]')
    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
    s.settimeout(5)
    start = time.monotonic()
    try:
        s.connect((host, int(port)))
        outcome = 'connected'
    except OSError as e:
        outcome = errno.errorcode.get(e.errno, type(e).__name__)
    print(json.dumps({'target': spec, 'outcome': outcome, 'seconds': time.monotonic() - start}), flush=True)
"#;

#[derive(Debug, serde::Deserialize)]
struct Attempt {
    target: String,
    outcome: String,
    seconds: f64,
}

/// The app's connects to IPv4, IPv6 and IPv4-mapped destinations reach the proxy, which dials
/// the original destination.
fn assert_captured(mesh: &MeshLab, targets: &[SocketAddr]) {
    for &target in targets {
        let report = mesh.connect(target);
        assert!(report.echo_ok, "echo through the proxy to {target}");
        assert!(
            is_loopback(report.local.ip()),
            "{target} was not sent to the proxy: {report:?}"
        );
        assert_eq!(canonical(report.server.local), canonical(target));
    }
}

fn three_families(mesh: &MeshLab) -> [SocketAddr; 3] {
    [
        mesh.server_v4(ECHO_PORT),
        mesh.server_v6(ECHO_PORT),
        mesh.server_mapped(ECHO_PORT),
    ]
}

/// `direct`: with the proxy killed, the app's connects go to their original destination,
/// uncaptured (fail open), each counted; a proxy started again captures the next ones, with no
/// new `init`. A live proxy is never bypassed, not even one that was listening before `init`
/// (the check asks the kernel's socket tables, not a registration made at listen()).
#[test]
fn when_proxy_down_direct_connects_go_to_their_destination_until_a_proxy_is_back() {
    let mut mesh = MeshLab::new("down-direct", Layout::EbpfProxyInPod);
    mesh.start_proxy();
    mesh.init(&["--when-proxy-down", "direct"]);
    assert_captured(&mesh, &three_families(&mesh));
    assert_eq!(mesh.ebpf_status().unwrap()["when_proxy_down"], "direct");

    mesh.kill_proxy();
    let [v4, v6, mapped] = three_families(&mesh);
    for target in [v4, v6, mapped, v4, v6] {
        let report = mesh.connect(target);
        assert!(report.echo_ok, "echo to {target}");
        assert!(
            !is_loopback(report.local.ip()),
            "{target} went to the dead proxy: {report:?}"
        );
        assert_eq!(report.peer, target, "getpeername");
        assert_eq!(canonical(report.server.local), canonical(target));
    }
    let counters = mesh.bpf_counters();
    assert_eq!(counters["outbound_no_proxy_direct"], 5, "{counters:?}");
    assert_eq!(counters["outbound_no_proxy_refused"], 0, "{counters:?}");
    assert_eq!(counters["redirected"], 3, "{counters:?}");

    mesh.start_proxy();
    assert_captured(&mesh, &three_families(&mesh));
    let counters = mesh.bpf_counters();
    assert_eq!(counters["redirected"], 6, "{counters:?}");
    assert_eq!(counters["outbound_no_proxy_direct"], 5, "{counters:?}");
}

/// `refuse` (the default): with the proxy killed, the app's connects fail at once with
/// ECONNREFUSED (what the loopback port answers, as under Istio's iptables), never a timeout,
/// each counted; a proxy started again captures the next ones, with no new `init`. The proxy
/// here lives in a sibling cgroup: the check looks in the pod's network namespace, wherever
/// the proxy's cgroup is.
#[test]
fn when_proxy_down_refuse_connects_fail_at_once_until_a_proxy_is_back() {
    let mut mesh = MeshLab::new("down-refuse", Layout::EbpfProxyInSibling);
    mesh.init(&[]);
    mesh.start_proxy();
    assert_captured(&mesh, &three_families(&mesh));
    assert_eq!(mesh.ebpf_status().unwrap()["when_proxy_down"], "refuse");

    mesh.kill_proxy();
    let [v4, v6, mapped] = three_families(&mesh);
    let targets: Vec<String> = [v4, v6, mapped, v4, v6]
        .iter()
        .map(ToString::to_string)
        .collect();
    let out = mesh
        .client
        .command("python3")
        .in_cgroup(&mesh.app_cgroup)
        .args(["-c", CONNECT_ATTEMPTS])
        .args(&targets)
        .run()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out));
    let attempts: Vec<Attempt> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("attempt line"))
        .collect();
    assert_eq!(attempts.len(), 5, "{}", text(&out));
    for attempt in &attempts {
        println!(
            "proxy down, refuse: connect to {} -> {} in {:.1} ms",
            attempt.target,
            attempt.outcome,
            attempt.seconds * 1000.0
        );
        assert_eq!(attempt.outcome, "ECONNREFUSED", "{attempt:?}");
        assert!(attempt.seconds < 1.0, "not at once: {attempt:?}");
    }
    let counters = mesh.bpf_counters();
    assert_eq!(counters["outbound_no_proxy_refused"], 5, "{counters:?}");
    assert_eq!(counters["outbound_no_proxy_direct"], 0, "{counters:?}");

    mesh.start_proxy();
    assert_captured(&mesh, &three_families(&mesh));
    assert_eq!(mesh.bpf_counters()["outbound_no_proxy_refused"], 5);
}
