//! Outbound capture by the eBPF programs, on the real kernel (run as root).
mod common;

use std::{net::SocketAddr, process::Command};

use common::*;
use sidecar_common::{AttachPoint, Counter, PinLayout, map_names};

/// The app's connects to IPv4, IPv6 and IPv4-mapped IPv6 destinations reach the proxy, which
/// dials the original destination; the app's getpeername shows the real peer.
fn assert_intercepted(mesh: &MeshLab, targets: &[SocketAddr]) {
    let opened_before = mesh.proxy_metric("istio_tcp_connections_opened_total");
    for &target in targets {
        let report = mesh.connect(target);
        assert!(report.echo_ok, "echo through the proxy to {target}");
        assert_eq!(report.peer, target, "getpeername must show the real peer");
        assert!(
            is_loopback(report.local.ip()),
            "app socket was not redirected to the proxy: {report:?}"
        );
        assert_eq!(
            canonical(report.server.local),
            canonical(target),
            "proxy dialled the wrong destination"
        );
        let client_ip = if target.is_ipv6() && target.ip().to_canonical().is_ipv6() {
            mesh.client.ipv6().into()
        } else {
            std::net::IpAddr::from(mesh.client.ipv4())
        };
        assert_eq!(
            canonical(report.server.peer).ip(),
            client_ip,
            "server sees the client pod"
        );
    }
    let log = mesh.proxy_log();
    for target in targets {
        let orig = canonical(*target).to_string();
        assert!(
            log.lines()
                .any(|l| l.contains("orig_dst") && l.contains(&orig)),
            "no proxy log line with orig_dst {orig}:\n{log}"
        );
    }
    let opened = mesh.proxy_metric("istio_tcp_connections_opened_total") - opened_before;
    assert_eq!(opened, targets.len() as u64, "proxy connections opened");
}

#[test]
fn intercepts_ipv4_ipv6_and_mapped_with_the_proxy_in_the_pod() {
    let mut mesh = MeshLab::new("ebpf-pod", Layout::EbpfProxyInPod);
    mesh.init(&[]);
    mesh.start_proxy();
    let targets = [
        mesh.server_v4(ECHO_PORT),
        mesh.server_v6(ECHO_PORT),
        mesh.server_mapped(ECHO_PORT),
    ];
    assert_intercepted(&mesh, &targets);
    let counters = mesh.bpf_counters();
    assert_eq!(counters[Counter::Redirected], 3, "{counters:?}");
    assert_eq!(counters[Counter::OrigDstServed], 3, "{counters:?}");
    // The proxy's own three upstream connects, exempt by UID 1337, are not captured again.
    assert_eq!(counters[Counter::BypassedUidGid], 3, "{counters:?}");
    assert_eq!(counters[Counter::Errors], 0, "{counters:?}");
    assert_eq!(mesh.proxy_metric("sidecar_outbound_failures_total"), 0);
    // Each original destination moved to the proxy's socket: nothing waits in the handoff.
    let status = mesh.ebpf_status().expect("status");
    assert_eq!(
        status.pending_handoffs, 0,
        "handoff entries left behind: {status:?}"
    );
}

#[test]
fn proxy_in_a_sibling_cgroup_is_never_captured() {
    let mut mesh = MeshLab::new("ebpf-sibling", Layout::EbpfProxyInSibling);
    // No UID/GID exemption at all: only the cgroup keeps the proxy's upstream direct.
    mesh.init(&["--proxy-uid", "none", "--proxy-gid", "none"]);
    mesh.start_proxy();
    assert_intercepted(
        &mesh,
        &[mesh.server_v4(ECHO_PORT), mesh.server_v6(ECHO_PORT)],
    );
    let counters = mesh.bpf_counters();
    assert_eq!(counters[Counter::Redirected], 2, "{counters:?}");
    assert_eq!(counters[Counter::BypassedUidGid], 0, "{counters:?}");
    assert_eq!(
        counters[Counter::Loopback],
        0,
        "the proxy's upstream must not reach the hooks: {counters:?}"
    );
}

#[test]
fn excluded_port_cidr_and_proxy_uid_go_direct() {
    let mut mesh = MeshLab::new("ebpf-excl", Layout::EbpfProxyInSibling);
    let excluded_cidr = format!("{}/128", mesh.server.ipv6());
    mesh.init(&[
        "--exclude-ports",
        "9000-9100",
        "--exclude-cidrs",
        &excluded_cidr,
    ]);
    mesh.start_proxy();

    let direct = |report: &sidecar_tests::ConnectReport, target: SocketAddr| {
        assert!(report.echo_ok);
        assert!(
            !is_loopback(report.local.ip()),
            "{target} should have gone direct: {report:?}"
        );
        assert_eq!(canonical(report.server.local), canonical(target));
    };
    let by_port = mesh.server_v4(OTHER_PORT);
    direct(&mesh.connect(by_port), by_port);
    let by_cidr = mesh.server_v6(ECHO_PORT);
    direct(&mesh.connect(by_cidr), by_cidr);
    let by_uid = mesh.server_v4(ECHO_PORT);
    direct(
        &mesh
            .connect_as(by_uid, Some(PROXY_ID))
            .expect("connect as UID 1337"),
        by_uid,
    );

    let counters = mesh.bpf_counters();
    assert_eq!(counters[Counter::ExcludedPort], 1, "{counters:?}");
    assert_eq!(counters[Counter::ExcludedCidr], 1, "{counters:?}");
    assert_eq!(counters[Counter::BypassedUidGid], 1, "{counters:?}");
    assert_eq!(counters[Counter::Redirected], 0, "{counters:?}");
    assert_eq!(mesh.proxy_metric("istio_tcp_connections_opened_total"), 0);

    // The same app, on a port that is not excluded, is captured.
    assert_intercepted(&mesh, &[by_uid]);
    let status = mesh.ebpf_status().expect("status");
    assert_eq!(status.excluded_ports, "9000-9100");
    assert_eq!(status.excluded_cidrs, [excluded_cidr]);
}

fn attached_ids(mesh: &MeshLab) -> Vec<(String, Vec<u32>)> {
    let status = mesh.ebpf_status().expect("status");
    status
        .links
        .into_iter()
        .map(|link| (link.pin, link.attached_program_ids))
        .collect()
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool (installed by cargo xtask setup)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn init_twice_replaces_and_cleanup_leaves_nothing() {
    let mut mesh = MeshLab::new("ebpf-idem", Layout::EbpfProxyInPod);
    mesh.init(&[]);
    mesh.start_proxy();
    assert_intercepted(&mesh, &[mesh.server_v4(ECHO_PORT)]);
    let first = attached_ids(&mesh);
    mesh.init(&["--exclude-ports", "22"]);
    let second = attached_ids(&mesh);
    assert_eq!(
        second.len(),
        9,
        "eight cgroup hooks and the netns one: {second:?}"
    );
    // The kernel is asked about the cgroup hooks (the netns link is checked by behaviour).
    let netns_link = PinLayout::link_pin_name("steer_inbound", AttachPoint::Netns);
    for (pin, ids) in second.iter().filter(|(pin, _)| *pin != netns_link) {
        assert_eq!(
            ids.len(),
            1,
            "{pin}: exactly one program attached after init twice: {second:?}"
        );
    }
    assert_ne!(first, second, "the second init must attach new programs");
    let cgroup = mesh.client.cgroup().to_string_lossy().into_owned();
    let listed = bpftool(&["cgroup", "show", &cgroup]);
    assert_eq!(
        listed
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .count(),
        8,
        "{listed}"
    );
    // Counters and live state survive the replacement; capture still works.
    assert_intercepted(&mesh, &[mesh.server_v4(ECHO_PORT)]);
    assert_eq!(mesh.bpf_counters()[Counter::Redirected], 2);

    // Every program our links hold, the netns one included, must be unloaded by cleanup.
    let status = mesh.ebpf_status().unwrap();
    let loaded: Vec<u32> = status.links.iter().map(|l| l.program_id).collect();
    assert_eq!(loaded.len(), 9);
    let pin_dir = status.pin_dir;
    let out = sidecar(&["cleanup", "--cgroup", &cgroup]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!pin_dir.exists(), "pins left in {pin_dir:?}");
    assert!(mesh.ebpf_status().is_none(), "status still lists the pod");
    let listed = bpftool(&["cgroup", "show", &cgroup]);
    assert!(
        !listed
            .lines()
            .any(|l| l.trim_start().starts_with(char::is_numeric)),
        "still attached:\n{listed}"
    );
    let programs = bpftool(&["prog", "show"]);
    for id in &loaded {
        assert!(
            !programs.lines().any(|l| l.starts_with(&format!("{id}:"))),
            "program {id} still loaded"
        );
    }
    // Cleanup is idempotent, and the app now connects directly.
    let again = sidecar(&["cleanup", "--cgroup", &cgroup]);
    assert!(
        again.status.success()
            && String::from_utf8_lossy(&again.stdout).contains("nothing to remove")
    );
    let report = mesh.connect(mesh.server_v4(ECHO_PORT));
    assert!(
        !is_loopback(report.local.ip()),
        "still captured after cleanup: {report:?}"
    );
}

#[test]
fn getsockopt_passes_other_options_through_untouched() {
    let mut mesh = MeshLab::new("ebpf-sockopt", Layout::EbpfProxyInPod);
    mesh.init(&["--exclude-ports", "9090"]);
    mesh.start_proxy();
    // Runs inside the hooked cgroup, on a socket that went direct (port 9090 is excluded):
    // ordinary options, oversized buffers, option 80 at a level that is not SOL_IP, the
    // kernel's own SO_ORIGINAL_DST error, and a value larger than a page (SO_PEERGROUPS of a
    // peer in 1500 groups: 6000 bytes) that must come back whole.
    let script = format!(
        r#"
import ctypes, errno, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
def getsockopt(sock, level, name, size):
    # Python caps buffers at 1024 bytes: call libc directly to pass a large one.
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if libc.getsockopt(sock.fileno(), level, name, buf, ctypes.byref(length)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return buf.raw[:length.value]
s = socket.create_connection(("{server}", 9090))
assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 0
assert len(getsockopt(s, socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)) == 4
assert len(getsockopt(s, socket.IPPROTO_TCP, socket.TCP_INFO, 8192)) >= 104
for level, expected in ((socket.IPPROTO_TCP, {{errno.ENOPROTOOPT}}), (socket.SOL_IP, {{errno.ENOENT, errno.ENOPROTOOPT}})):
    try:
        getsockopt(s, level, 80, 16)
        raise SystemExit("option 80 at level %d was answered for a direct socket" % level)
    except OSError as e:
        assert e.errno in expected, "level %d: %s" % (level, e)
groups = list(range(100000, 101500))
os.setgroups(groups)
a, b = socket.socketpair()
raw = getsockopt(a, socket.SOL_SOCKET, 59, 8192)  # SO_PEERGROUPS
got = sorted(struct.unpack("%dI" % (len(raw) // 4), raw))
assert set(groups) <= set(got), "SO_PEERGROUPS truncated: %d bytes" % len(raw)
print("ok")
"#,
        server = mesh.server.ipv4(),
    );
    let out = mesh
        .client
        .command("python3")
        .in_cgroup(&mesh.app_cgroup)
        .args(["-c", &script])
        .run()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out));
    let counters = mesh.bpf_counters();
    assert_eq!(counters[Counter::ExcludedPort], 1, "{counters:?}");
    assert_eq!(counters[Counter::OrigDstMissing], 1, "{counters:?}");
    assert_eq!(counters[Counter::OrigDstServed], 0, "{counters:?}");
}

#[test]
fn long_lived_connections_hold_no_kernel_entry_and_kernel_logs_follow() {
    let mut mesh = MeshLab::new("ebpf-held", Layout::EbpfProxyInPod);
    mesh.init(&[]);
    mesh.start_proxy();
    let cgroup = mesh.client.cgroup().to_string_lossy().into_owned();
    let mut logs = std::process::Command::new(sidecar_bin())
        .args(["kernel-logs", "--cgroup", &cgroup, "--duration", "2s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kernel-logs");
    let mut following = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(logs.stderr.take().unwrap()),
        &mut following,
    )
    .unwrap();
    assert!(
        following.contains("following"),
        "kernel-logs did not start: {following}"
    );
    // Open connections keep their original destination on the proxy's socket only: no map
    // entry per connection, so no capacity to exhaust with long-lived connections.
    let holder = mesh
        .client
        .command("python3")
        .in_cgroup(&mesh.app_cgroup)
        .args(["-c", &format!("import socket,time; c=[socket.create_connection(('{}', 8080)) for _ in range(20)]; print('held', flush=True); time.sleep(3)", mesh.server.ipv4())])
        .spawn()
        .expect("holder");
    holder
        .wait_for_stdout("held", std::time::Duration::from_secs(5))
        .expect("holder connected");
    let status = mesh.ebpf_status().expect("status");
    assert_eq!(status.pending_handoffs, 0, "{status:?}");
    assert!(mesh.connect(mesh.server_v4(ECHO_PORT)).echo_ok);
    let counters = mesh.bpf_counters();
    assert_eq!(counters[Counter::Errors], 0, "{counters:?}");
    assert_eq!(counters[Counter::OrigDstServed], 21, "{counters:?}");
    let out = logs.wait_with_output().expect("kernel-logs output");
    assert!(out.status.success(), "kernel-logs: {out:?}");
    drop(holder);
}

#[test]
fn init_mounts_bpffs_where_it_is_missing() {
    let mesh = MeshLab::new("ebpf-bpffs", Layout::EbpfProxyInPod);
    let dir = mesh.lab.dir().join("bpffs");
    std::fs::create_dir_all(&dir).unwrap();
    let bpffs = dir.to_string_lossy().into_owned();
    let cgroup = mesh.client.cgroup().to_string_lossy().into_owned();
    let unmount = bpffs.clone();
    mesh.lab.on_teardown(move || {
        let _ = std::process::Command::new("umount").arg(&unmount).status();
    });
    let out = sidecar(&[
        "init",
        "--cgroup",
        &cgroup,
        "--no-inbound-capture",
        "--bpffs",
        &bpffs,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&bpffs) && l.contains(" bpf ")),
        "bpffs not mounted at {bpffs}"
    );
    let status = sidecar(&["status", "--bpffs", &bpffs]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains(&cgroup),
        "{}",
        text(&status)
    );
    let out = sidecar(&["cleanup", "--cgroup", &cgroup, "--bpffs", &bpffs]);
    assert!(out.status.success(), "{}", text(&out));
    let layout = PinLayout::new(&dir);
    assert!(!layout.sidecar_dir().exists(), "pins left under {bpffs}");
}

#[test]
fn reinit_over_an_older_layout_replaces_its_maps() {
    let mesh = MeshLab::new("ebpf-upgrade", Layout::EbpfProxyInPod);
    mesh.init(&[]);
    let pin_dir = mesh.ebpf_status().expect("status").pin_dir;
    // What an older build left: a map this build no longer has, one of another type under a
    // name this build uses (the port exclusions were an array before they were a trie), and
    // counters without the newer reasons.
    const GONE_MAP: &str = "ORIG_DST_BY_PEER";
    for (map, kind, key, value) in [
        (GONE_MAP, "hash", "20", "20"),
        (map_names::EXCLUDED_PORTS, "array", "4", "8"),
        (map_names::COUNTERS, "percpu_array", "4", "8"),
    ] {
        let path = PinLayout::map_pin(&pin_dir, map);
        std::fs::remove_file(&path).ok();
        let made = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(["type", kind, "key", key, "value", value, "entries", "8"])
            .args(["name", "old_layout"])
            .output()
            .expect("bpftool");
        assert!(made.status.success(), "{made:?}");
    }
    mesh.init(&["--exclude-ports", "9000-9100"]);
    assert!(!PinLayout::map_pin(&pin_dir, GONE_MAP).exists());
    let status = mesh.ebpf_status().expect("status");
    assert_eq!(status.excluded_ports, "9000-9100", "{status:?}");
    assert!(
        status.counter(Counter::OutboundNoProxyDirect).is_some(),
        "the counters of the older layout were kept: {status:?}"
    );
    let map = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(PinLayout::map_pin(&pin_dir, map_names::EXCLUDED_PORTS))
        .output()
        .expect("bpftool");
    assert!(
        String::from_utf8_lossy(&map.stdout).contains("lpm_trie"),
        "{map:?}"
    );
}
