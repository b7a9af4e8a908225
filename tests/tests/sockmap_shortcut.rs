//! The optional sockmap shortcut (`sidecar init --sockmap`) on the real kernel (root): two pods
//! with eBPF capture and the real proxy each, so a connection crosses the client's outbound
//! hop (app -> proxy) and the server's inbound hop (proxy -> app) through the shortcut. What
//! must hold: bytes arrive exact in both directions for small and large transfers, half-close
//! still ends the stream, nothing stalls, and the kernel counters show the shortcut was taken.
//! The proxies copy what they relay under the shortcut (splice(2) would never see the bytes
//! it delivers) and splice it without.
//! The lab's tools do their I/O like event-loop programs (see `tools::polled`): the kernel's
//! sockmap receive path can hand a blocking reader EAGAIN, so the shortcut is for them.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use sidecar_common::Counter;
use sidecar_tests::{
    BpfCounters, ConnectReport, Lab, LabProcess, Pod, SidecarPod, require_root,
    tools::load::{LoadSpec, Workload, client::report_from_output, histogram},
    wait_for_tcp,
};

const ECHO: u16 = 8080;
const PING: u16 = 7070;
const READY: Duration = Duration::from_secs(10);
/// Bounds every exchange: a stalled transfer fails the test instead of hanging it.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// No round trip may take this long: far beyond a slow one, far below a lost wake-up.
const STALL: Duration = Duration::from_secs(1);

struct ShortcutLab {
    _lab: Lab,
    client: SidecarPod,
    server: SidecarPod,
    _apps: Vec<LabProcess>,
}

impl ShortcutLab {
    /// Both pods captured with `init_extra`, each with its proxy; the server's app serves the
    /// echo protocol on 8080 and ping-pong on 7070.
    fn new(test: &str, init_extra: &[&str]) -> ShortcutLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new(test).expect("lab");
        let client = lab.add_pod("client").expect("client pod");
        let server = lab.add_pod("server").expect("server pod");
        let app = server.cgroup_child("app").expect("app cgroup");
        let apps = vec![
            server
                .command(labtool())
                .in_cgroup(&app)
                .args(["echo-server", "--listen", &format!("[::]:{ECHO}")])
                .spawn()
                .expect("echo server"),
            server
                .command(labtool())
                .in_cgroup(&app)
                .args(["load-server", "--listen", &format!("[::]:{PING}")])
                .spawn()
                .expect("ping-pong server"),
        ];
        for port in [ECHO, PING] {
            wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), port), READY)
                .expect("server app listening");
        }
        let mut pods = [sidecar_pod(&lab, client), sidecar_pod(&lab, server)];
        for pod in &pods {
            pod.install_capture(CaptureMode::Ebpf, init_extra)
                .expect("sidecar init");
        }
        // After init: the proxy's inbound listener is registered when it listens.
        for pod in &mut pods {
            let name = pod.name().to_owned();
            let proxy = pod.proxy_command().args(["--workload-name", &name]);
            pod.start_proxy(proxy).expect("proxy");
        }
        let [client, server] = pods;
        ShortcutLab {
            _lab: lab,
            client,
            server,
            _apps: apps,
        }
    }

    /// Every relayed connection both proxies logged relayed `mode` (`splice`, `copy`), and
    /// there was at least one on each side.
    fn assert_relayed_by(&self, mode: &str) {
        for pod in [&self.client, &self.server] {
            let logs = pod.proxy().expect("proxy started").stdout_text();
            let relayed: Vec<&str> = logs
                .lines()
                .filter(|line| line.contains("connection complete"))
                .collect();
            assert!(!relayed.is_empty(), "nothing relayed:\n{logs}");
            for line in relayed {
                assert!(
                    line.contains(&format!("relay=\"{mode}\"")),
                    "not relayed by {mode}: {line}"
                );
            }
        }
    }

    fn app_cgroup(&self) -> std::path::PathBuf {
        self.client.cgroup_child("app").expect("client app cgroup")
    }

    /// The echo exchange from the client's app: send `bytes`, half-close, read the echo.
    fn echo(&self, target: SocketAddr, bytes: usize) -> ConnectReport {
        let out = self
            .client
            .command(labtool())
            .in_cgroup(self.app_cgroup())
            .args(["connect", &target.to_string()])
            .args(["--payload-bytes", &bytes.to_string()])
            .args(["--timeout-ms", &EXCHANGE_TIMEOUT.as_millis().to_string()])
            // The exchange's own bound decides, not the runner's default (16 MiB each way
            // takes seconds in a qemu guest without KVM).
            .timeout(EXCHANGE_TIMEOUT + Duration::from_secs(5))
            .run()
            .expect("run labtool connect");
        ConnectReport::from_output(&out).unwrap_or_else(|e| {
            panic!(
                "{bytes} bytes to {target}: {e:#}\nclient pod counters: {:?}\nserver pod counters: {:?}",
                self.counters(&self.client),
                self.counters(&self.server)
            )
        })
    }

    /// Kernel counters of `pod`'s capture, from `sidecar status --json`.
    fn counters(&self, pod: &Pod) -> BpfCounters {
        BpfCounters::from(status_of(pod.cgroup()).expect("capture of the pod"))
    }

    fn server_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server.ipv4().into(), port)
    }
}

fn delta(after: &BpfCounters, before: &BpfCounters, counter: Counter) -> u64 {
    after[counter] - before[counter]
}

#[test]
fn transfers_are_byte_exact_both_ways_through_the_shortcut() {
    let mesh = ShortcutLab::new("shortcut-exact", &["--sockmap"]);
    let client_before = mesh.counters(&mesh.client);
    let server_before = mesh.counters(&mesh.server);
    // Small messages, one segment, a window's worth, and far more than any socket buffer.
    let sizes = [0, 1, 100, 65_536, 1_000_003, 16 * 1024 * 1024];
    for bytes in sizes {
        let target = mesh.server_v4(ECHO);
        let report = mesh.echo(target, bytes);
        assert!(report.echo_ok, "{bytes} bytes: the echo differs");
        assert_eq!(report.server.received, bytes as u64, "{bytes} bytes");
        assert_eq!(report.peer, target, "{bytes} bytes: getpeername");
    }
    let client = mesh.counters(&mesh.client);
    let server = mesh.counters(&mesh.server);
    let connections = sizes.len() as u64;
    // Two ends per hop and connection: the app's and the proxy's.
    assert_eq!(
        delta(&client, &client_before, Counter::ShortcutSockets),
        2 * connections,
        "client pod (outbound hop): {client:?}"
    );
    assert_eq!(
        delta(&server, &server_before, Counter::ShortcutSockets),
        2 * connections,
        "server pod (inbound hop): {server:?}"
    );
    for (pod, after, before) in [
        ("client", &client, &client_before),
        ("server", &server, &server_before),
    ] {
        assert!(
            delta(after, before, Counter::ShortcutMessages) >= connections,
            "{pod}: the bytes did not take the shortcut: {after:?}"
        );
        assert_eq!(delta(after, before, Counter::Errors), 0, "{pod}: {after:?}");
    }
    mesh.assert_relayed_by("copy");
}

/// Both IPv6 hops too: the inbound one since its source is the proxy's own `::6`.
#[test]
fn the_ipv6_hops_take_the_shortcut_too() {
    let mesh = ShortcutLab::new("shortcut-v6", &["--sockmap"]);
    let client_before = mesh.counters(&mesh.client);
    let server_before = mesh.counters(&mesh.server);
    let target = SocketAddr::new(mesh.server.ipv6().into(), ECHO);
    for bytes in [1, 300_000] {
        let report = mesh.echo(target, bytes);
        assert!(report.echo_ok, "{bytes} bytes over IPv6");
    }
    for (pod, after, before) in [
        ("client", mesh.counters(&mesh.client), &client_before),
        ("server", mesh.counters(&mesh.server), &server_before),
    ] {
        assert_eq!(
            delta(&after, before, Counter::ShortcutSockets),
            4,
            "{pod}: {after:?}"
        );
        assert!(
            delta(&after, before, Counter::ShortcutMessages) >= 2,
            "{pod}: {after:?}"
        );
    }
}

#[test]
fn many_small_round_trips_neither_stall_nor_corrupt() {
    let mesh = ShortcutLab::new("shortcut-pingpong", &["--sockmap"]);
    let before = mesh.counters(&mesh.client);
    let mut round_trips = 0;
    // Up to more than a socket buffer: writes end partially and must resume when drained.
    for message_bytes in [1, 64, 4096, 262_144] {
        let target = mesh.server_v4(PING);
        let spec = LoadSpec {
            workload: Workload::PingPong { message_bytes },
            connect_to: target,
            expect_server: target,
            warmup_ms: 0,
            duration_ms: 1500,
            start_file: None,
        };
        let out = mesh
            .client
            .command(labtool())
            .in_cgroup(mesh.app_cgroup())
            .args([
                "load-client",
                "--spec",
                &serde_json::to_string(&spec).unwrap(),
            ])
            .run()
            .expect("run the load client");
        assert!(out.status.success(), "{message_bytes} B: {}", text(&out));
        let report = report_from_output(&String::from_utf8_lossy(&out.stdout)).expect("report");
        // The load client checks every echo and fails an exchange that makes no progress for
        // 10 s: an error is a corrupted reply or a hard stall.
        assert_eq!(
            report.errors, 0,
            "{message_bytes} B: {:?}",
            report.first_error
        );
        assert!(report.operations > 0, "{message_bytes} B: no round trip");
        round_trips += report.operations;
        // A stall that recovers (a lost wake-up rescued by a timer) shows as a round trip far
        // slower than any other: none may take a second (slow VMs take ~40 ms at 256 KiB).
        let slowest = Duration::from_nanos(histogram::decode(&report.latency).unwrap().max());
        assert!(
            slowest < STALL,
            "{message_bytes} B: a round trip took {slowest:?}: stalled"
        );
    }
    let after = mesh.counters(&mesh.client);
    assert!(
        delta(&after, &before, Counter::ShortcutMessages) >= round_trips,
        "round trips did not take the shortcut: {after:?}"
    );
}

#[test]
fn the_shortcut_is_off_unless_asked_for() {
    let mesh = ShortcutLab::new("shortcut-off", &[]);
    let report = mesh.echo(mesh.server_v4(ECHO), 100_000);
    assert!(report.echo_ok);
    for pod in [&mesh.client, &mesh.server] {
        let counters = mesh.counters(pod);
        assert_eq!(
            counters[Counter::ShortcutSockets],
            0,
            "{}: {counters:?}",
            pod.name()
        );
        assert_eq!(
            counters[Counter::ShortcutMessages],
            0,
            "{}: {counters:?}",
            pod.name()
        );
    }
    let out = sidecar(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sockmap shortcut: off"),
        "{}",
        text(&out)
    );
    mesh.assert_relayed_by("splice");
}
