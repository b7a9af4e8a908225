//! The proxy's lifecycle under eBPF capture, on the real kernel (root): what the app's connects
//! get while the proxy is down (`init --when-proxy-down refuse|direct`), and a proxy restarted
//! after SIGKILL taking over inbound and outbound capture again by itself, with no new `init`.
mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use sidecar_common::{Counter, WhenProxyDown};
use sidecar_tests::{BpfCounters, LabProcess};

/// The client pod's own app server, for inbound load (captured by the client's proxy).
const APP_PORT: u16 = 7070;

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

/// Steady load of short requests, one new connection each, to `host port` (the labtool echo
/// protocol) until `MARKS/stop` exists. Each request is tagged with the phase it started in,
/// read from marker files the test writes: `before` the proxy is killed, `at_kill` while the
/// SIGKILL is under way (`MARKS/killing`), the `gap` once it is dead (`MARKS/killed`),
/// `after_ready` once the new proxy answers its readiness check (`MARKS/ready`). Prints
/// `loaded` once ten requests succeeded, and at the end one JSON line with, per phase:
/// requests, failures by errno, how many successes went through the proxy (`via_proxy`: the
/// app's local address is loopback outbound; the server's peer is the proxy's passthrough
/// source 127.0.0.6 inbound), and the slowest failure.
const STEADY_LOAD: &str = r#"
import collections, errno, json, os, socket, sys, time
host, port, marks = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def phase():
    if os.path.exists(marks + '/ready'):
        return 'after_ready'
    if os.path.exists(marks + '/killed'):
        return 'gap'
    if os.path.exists(marks + '/killing'):
        return 'at_kill'
    return 'before'
stats = collections.defaultdict(lambda: {'requests': 0, 'ok': 0, 'via_proxy': 0,
                                         'failures': collections.Counter(), 'slowest_failure': 0.0})
while not os.path.exists(marks + '/stop'):
    tag, start = phase(), time.monotonic()
    failure = None
    via_proxy = False
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            local = s.getsockname()[0]
            s.sendall(b'ping')
            s.shutdown(socket.SHUT_WR)
            data = b''
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        line, _, echoed = data.partition(b'\n')
        report = json.loads(line)
        if echoed != b'ping':
            raise OSError(errno.EPROTO, 'bad echo %r' % data)
        peer = report['peer'].rsplit(':', 1)[0].strip('[]')
        via_proxy = local in ('127.0.0.1', '::1', '::ffff:127.0.0.1') or peer in ('127.0.0.6', '::6', '::ffff:127.0.0.6')
    except (OSError, ValueError) as e:
        failure = errno.errorcode.get(getattr(e, 'errno', None), type(e).__name__)
    # A request still in flight when the kill began belongs to the kill.
    if tag == 'before' and phase() != 'before':
        tag = 'at_kill'
    entry = stats[tag]
    entry['requests'] += 1
    if failure is None:
        entry['ok'] += 1
        entry['via_proxy'] += via_proxy
        if entry['ok'] == 10 and tag == 'before':
            print('loaded', flush=True)
    else:
        entry['failures'][failure] += 1
        entry['slowest_failure'] = max(entry['slowest_failure'], time.monotonic() - start)
    time.sleep(0.002)
print(json.dumps(stats), flush=True)
"#;

#[derive(Debug, serde::Deserialize)]
struct Attempt {
    target: String,
    outcome: String,
    seconds: f64,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct PhaseStats {
    requests: u64,
    ok: u64,
    via_proxy: u64,
    failures: std::collections::BTreeMap<String, u64>,
    slowest_failure: f64,
}

impl PhaseStats {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
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
    assert_eq!(
        mesh.ebpf_status().unwrap().when_proxy_down,
        WhenProxyDown::Direct
    );

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
    assert_eq!(counters[Counter::OutboundNoProxyDirect], 5, "{counters:?}");
    assert_eq!(counters[Counter::OutboundNoProxyRefused], 0, "{counters:?}");
    assert_eq!(counters[Counter::Redirected], 3, "{counters:?}");

    mesh.start_proxy();
    assert_captured(&mesh, &three_families(&mesh));
    let counters = mesh.bpf_counters();
    assert_eq!(counters[Counter::Redirected], 6, "{counters:?}");
    assert_eq!(counters[Counter::OutboundNoProxyDirect], 5, "{counters:?}");
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
    assert_eq!(
        mesh.ebpf_status().unwrap().when_proxy_down,
        WhenProxyDown::Refuse
    );

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
    assert_eq!(counters[Counter::OutboundNoProxyRefused], 5, "{counters:?}");
    assert_eq!(counters[Counter::OutboundNoProxyDirect], 0, "{counters:?}");

    mesh.start_proxy();
    assert_captured(&mesh, &three_families(&mesh));
    assert_eq!(mesh.bpf_counters()[Counter::OutboundNoProxyRefused], 5);
}

/// The load of one direction across a restart, by phase.
struct RestartRun {
    before: PhaseStats,
    at_kill: PhaseStats,
    gap: PhaseStats,
    after_ready: PhaseStats,
}

/// Steady load, outbound (the client app to the server pod) and inbound (the server pod to the
/// client app), across a SIGKILL of the client pod's proxy and a restart with no new `init`.
/// Prints each direction's numbers; checks what holds whatever the policy: no failure before
/// the kill, none after the new proxy is ready, all of those through the proxy, and every
/// failure in the gap refused at once. Returns (outbound, inbound) and the kernel counters.
fn restart_under_steady_load(test: &str, policy: &str) -> (RestartRun, RestartRun, BpfCounters) {
    let mut mesh = MeshLab::new(test, Layout::EbpfProxyInPod);
    mesh.init(&["--when-proxy-down", policy]);
    let app = mesh
        .client
        .command(labtool())
        .in_cgroup(&mesh.app_cgroup)
        .args(["echo-server", "--listen", &format!("[::]:{APP_PORT}")])
        .spawn()
        .expect("the client pod's app server");
    app.wait_for_stdout("listening", Duration::from_secs(5))
        .expect("app listening");
    mesh.start_proxy();
    let app_addr = SocketAddr::new(mesh.client.ipv4().into(), APP_PORT);

    let marks = mesh.lab.dir().join("restart-marks");
    std::fs::create_dir_all(&marks).unwrap();
    let marks_arg = marks.to_string_lossy().into_owned();
    let load = |pod: &sidecar_tests::Pod, cgroup: &Path, target: SocketAddr| -> LabProcess {
        pod.command("python3")
            .in_cgroup(cgroup)
            .args(["-c", STEADY_LOAD])
            .args([
                &target.ip().to_string(),
                &target.port().to_string(),
                &marks_arg,
            ])
            .spawn()
            .expect("steady load")
    };
    let outbound = load(&mesh.client, &mesh.app_cgroup, mesh.server_v4(ECHO_PORT));
    let inbound_cgroup = mesh.server.cgroup_child("load").unwrap();
    let inbound = load(&mesh.server, &inbound_cgroup, app_addr);

    // Slow machines (the kernel matrix runs under emulation) take a while to start Python.
    for process in [&outbound, &inbound] {
        process
            .wait_for_stdout("loaded", Duration::from_secs(20))
            .expect("steady load under way");
    }
    std::fs::write(marks.join("killing"), "").unwrap();
    mesh.kill_proxy();
    let killed = Instant::now();
    std::fs::write(marks.join("killed"), "").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    mesh.start_proxy();
    std::fs::write(marks.join("ready"), "").unwrap();
    let gap = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(marks.join("stop"), "").unwrap();

    let [outbound, inbound] =
        [("outbound", &outbound), ("inbound", &inbound)].map(|(direction, process)| {
            process
                .wait(Duration::from_secs(10))
                .expect("load finished");
            let summary = process.stdout_text();
            let phases: std::collections::BTreeMap<String, PhaseStats> =
                serde_json::from_str(summary.lines().last().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{direction} load summary: {e}: {summary:?}"));
            let phase = |name: &str| phases.get(name).cloned().unwrap_or_default();
            let run = RestartRun {
                before: phase("before"),
                at_kill: phase("at_kill"),
                gap: phase("gap"),
                after_ready: phase("after_ready"),
            };
            println!(
                "proxy restart ({policy}), {direction}: gap {:.0} ms (SIGKILL to the new proxy \
             ready); before: {} requests, {} failed; started during the kill: {}, failed {:?}; \
             during the gap: {} requests, {} failed {:?}, slowest failure {:.1} ms; after \
             ready: {} requests, {} failed, {} through the proxy",
                gap.as_secs_f64() * 1000.0,
                run.before.requests,
                run.before.failed(),
                run.at_kill.requests,
                run.at_kill.failures,
                run.gap.requests,
                run.gap.failed(),
                run.gap.failures,
                run.gap.slowest_failure * 1000.0,
                run.after_ready.requests,
                run.after_ready.failed(),
                run.after_ready.via_proxy,
            );
            let (before, during, after) = (&run.before, &run.gap, &run.after_ready);
            assert!(
                before.ok > 0 && before.via_proxy == before.ok,
                "{direction}: {before:?}"
            );
            assert_eq!(before.failed(), 0, "{direction}: {before:?}");
            // Nothing hangs while the proxy is away: a failure is a refusal, at once.
            assert!(
                during.failures.keys().all(|name| name == "ECONNREFUSED"),
                "{direction}: {during:?}"
            );
            assert!(during.slowest_failure < 1.0, "{direction}: {during:?}");
            assert!(
                after.requests >= 10,
                "{direction}: too little load: {after:?}"
            );
            assert_eq!(
                after.failed(),
                0,
                "{direction}: failures after the new proxy was ready"
            );
            assert_eq!(
                after.via_proxy, after.requests,
                "{direction}: not all captured: {after:?}"
            );
            run
        });
    let counters = mesh.bpf_counters();
    drop(app);
    (outbound, inbound, counters)
}

/// Under `refuse`, outbound and inbound requests are refused during the gap, and
/// the restarted proxy's listeners take over both directions by themselves.
#[test]
fn a_proxy_restarted_after_sigkill_takes_over_under_steady_load() {
    let (outbound, inbound, counters) = restart_under_steady_load("restart-load", "refuse");
    assert!(outbound.gap.failed() > 0, "{:?}", outbound.gap);
    assert!(inbound.gap.failed() > 0, "{:?}", inbound.gap);
    assert!(
        counters[Counter::OutboundNoProxyRefused] > 0,
        "{counters:?}"
    );
    assert!(counters[Counter::InboundNoProxy] > 0, "{counters:?}");
    assert_eq!(counters[Counter::OutboundNoProxyDirect], 0, "{counters:?}");
}

/// Under `direct`, no outbound request fails during the gap (they go to the server uncaptured);
/// inbound still fails closed; the restarted proxy captures both directions again.
#[test]
fn a_proxy_restarted_after_sigkill_takes_over_under_steady_load_direct() {
    let (outbound, inbound, counters) = restart_under_steady_load("restart-direct", "direct");
    assert_eq!(outbound.gap.failed(), 0, "{:?}", outbound.gap);
    assert!(
        outbound.gap.ok > outbound.gap.via_proxy,
        "{:?}",
        outbound.gap
    );
    assert!(inbound.gap.failed() > 0, "{:?}", inbound.gap);
    assert!(counters[Counter::OutboundNoProxyDirect] > 0, "{counters:?}");
    assert_eq!(counters[Counter::OutboundNoProxyRefused], 0, "{counters:?}");
}
