//! The proxy notices when its pod's capture vanishes (root, real kernel): a cleanup run on a
//! live pod by mistake, or its pins removed, would leave the app unmeshed with nothing to show;
//! readiness goes 503 and `sidecar_capture_active` to 0 within the check period, and both come
//! back when `init` puts the capture back, with no proxy restart.
mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use sidecar_common::Counter;
use sidecar_tests::tools::http::{self, HttpResponse, HttpTarget};

const CHECK_INTERVAL: &str = "200ms";
const WITHIN: Duration = Duration::from_secs(2);

fn readiness(mesh: &MeshLab) -> HttpResponse {
    let target = HttpTarget::parse("http://127.0.0.1:15021/healthz/ready").unwrap();
    mesh.client
        .run_in_netns(|| http::get(&target, Duration::from_secs(1)))
        .expect("enter the pod")
        .expect("readiness answers")
}

/// The gauge, or None before the proxy's first capture check (exported only from then on).
fn capture_active(mesh: &MeshLab, direction: &str) -> Option<u64> {
    proxy_metric_if_exported(
        &mesh.client,
        "sidecar_capture_active",
        &[("direction", direction)],
    )
}

/// Waits until readiness answers `status` and both gauges read `active`.
fn wait_for(mesh: &MeshLab, status: u16, active: u64) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let ready = readiness(mesh);
        let gauges = [
            capture_active(mesh, "outbound"),
            capture_active(mesh, "inbound"),
        ];
        if ready.status == status && gauges == [Some(active), Some(active)] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not within {WITHIN:?}: readiness {ready:?}, gauges {gauges:?}\n{}",
            mesh.proxy_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vanished_capture_makes_the_proxy_unready_until_init_puts_it_back() {
    let mut mesh = MeshLab::new("capture-health", Layout::EbpfProxyInPod);
    mesh.init(&[]);
    mesh.start_proxy_with(&[
        "--capture-check",
        "ebpf",
        "--capture-check-interval",
        CHECK_INTERVAL,
    ]);
    wait_for(&mesh, 200, 1);

    let cgroup = mesh.client.cgroup().to_string_lossy().into_owned();
    let out = sidecar(&["cleanup", "--cgroup", &cgroup]);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(&mesh, 503, 0);
    assert!(
        readiness(&mesh).body.contains("capture is gone"),
        "{:?}",
        readiness(&mesh)
    );
    assert!(
        mesh.proxy_log().contains("capture is gone"),
        "{}",
        mesh.proxy_log()
    );

    mesh.init(&[]);
    wait_for(&mesh, 200, 1);
    assert_intercepted_once(&mesh);
}

/// The restored capture works both ways: the app's connection goes through the proxy, and an
/// inbound connection reaches the proxy's listener, which listened again to register with the
/// new maps (no app listens in this pod: the proxy's forward is refused, after the steering).
fn assert_intercepted_once(mesh: &MeshLab) {
    let report = mesh.connect(mesh.server_v4(ECHO_PORT));
    assert!(report.echo_ok);
    let client = SocketAddr::new(mesh.client.ipv4().into(), ECHO_PORT);
    let _ = mesh
        .server
        .command(labtool())
        .args(["connect", &client.to_string(), "--timeout-ms", "1000"])
        .run();
    let counters = mesh.bpf_counters();
    assert_eq!(counters[Counter::Redirected], 1, "{counters:?}");
    assert_eq!(counters[Counter::InboundRedirected], 1, "{counters:?}");
    assert_eq!(counters[Counter::InboundNoProxy], 0, "{counters:?}");
}
