//! Apps that write and close at once (syslog, Graphite, `printf | nc` style clients) must lose
//! no byte under capture: `connect(); send(1 KiB); close()`, no shutdown, no waiting, several
//! senders on the proxy's CPU. The original destination must stay answerable until the proxy
//! has read it, however fast the app's socket is gone. Runs as root on the real kernel.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use sidecar_common::Counter;
use sidecar_tests::{LabProcess, wait_for_tcp};

const SINK_PORT: u16 = 7070;
const MESSAGE_BYTES: usize = 1024;
const MESSAGES_PER_SENDER: usize = 500;
/// Per family: two blocking and two nonblocking senders.
const SENDERS: [&str; 4] = ["blocking", "nonblocking", "blocking", "nonblocking"];

/// One sender: `COUNT` times connect, send `SIZE` bytes, close (no shutdown). Python's socket
/// module, as an app would use it. Prints `sent N failed M`.
const SENDER: &str = r#"
import select, socket, sys
host, port, count, size, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
payload = b"m" * size
sent = failed = 0
for _ in range(count):
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if mode == "nonblocking":
            s.setblocking(False)
            s.connect_ex((host, port))
            view = memoryview(payload)
            while view:
                select.select([], [s], [], 5)
                try:
                    view = view[s.send(view):]
                except BlockingIOError:
                    pass
        else:
            s.connect((host, port))
            s.sendall(payload)
        sent += 1
    except OSError as error:
        failed += 1
        print("error", error, file=sys.stderr)
    finally:
        s.close()
print("sent", sent, "failed", failed)
"#;

/// The receiving app: one event loop (no thread per connection, so an emulated kernel in the
/// matrix keeps up) counting the bytes of each connection, one line per connection at its end
/// of stream.
const SINK: &str = r#"
import selectors, socket, sys
listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", int(sys.argv[1])))
listener.listen(4096)
listener.setblocking(False)
loop = selectors.DefaultSelector()
loop.register(listener, selectors.EVENT_READ)
received = {}
print("listening", flush=True)
while True:
    for key, _ in loop.select():
        sock = key.fileobj
        if sock is listener:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            received[conn] = 0
            loop.register(conn, selectors.EVENT_READ)
            continue
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            chunk = b""
        if chunk:
            received[sock] += len(chunk)
            continue
        loop.unregister(sock)
        print("received", received.pop(sock), flush=True)
        sock.close()
"#;

struct Delivery {
    sent: usize,
    failed: usize,
    received_whole: usize,
    received_partial: usize,
}

/// Pins the proxy and the senders to CPU 0, runs every sender against `target` and counts
/// what the sink got.
fn send_and_close(mesh: &MeshLab, sink: &LabProcess, target: SocketAddr) -> Delivery {
    let before = lines_with(sink, "received").len();
    let proxy = mesh.client.proxy().expect("proxy started");
    let pinned = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &proxy.pid().to_string()])
        .output()
        .expect("taskset");
    assert!(pinned.status.success(), "cannot pin the proxy: {pinned:?}");
    let senders: Vec<LabProcess> = SENDERS
        .iter()
        .map(|mode| {
            mesh.client
                .command("taskset")
                .in_cgroup(&mesh.app_cgroup)
                .args(["-c", "0", "python3", "-c", SENDER])
                .args([
                    target.ip().to_string(),
                    target.port().to_string(),
                    MESSAGES_PER_SENDER.to_string(),
                    MESSAGE_BYTES.to_string(),
                    mode.to_string(),
                ])
                .spawn()
                .expect("sender")
        })
        .collect();
    let (mut sent, mut failed) = (0, 0);
    for sender in &senders {
        let status = sender.wait(Duration::from_secs(300)).expect("sender ends");
        assert!(status.success(), "sender failed: {}", sender.stderr_text());
        let out = sender.stdout_text();
        let words: Vec<&str> = out.split_whitespace().collect();
        sent += words[1].parse::<usize>().expect("sent count");
        failed += words[3].parse::<usize>().expect("failed count");
    }
    // The sink sees each connection end once the proxy has relayed it; stragglers get time
    // as long as they keep arriving (an emulated kernel in the matrix is slow, not stalled).
    let expected = before + SENDERS.len() * MESSAGES_PER_SENDER;
    let (mut seen, mut last_progress) = (0, std::time::Instant::now());
    while seen < expected && last_progress.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        let now = lines_with(sink, "received").len();
        if now > seen {
            (seen, last_progress) = (now, std::time::Instant::now());
        }
    }
    let counts: Vec<usize> = lines_with(sink, "received")[before..]
        .iter()
        .map(|line| line.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    Delivery {
        sent,
        failed,
        received_whole: counts.iter().filter(|&&n| n == MESSAGE_BYTES).count(),
        received_partial: counts.iter().filter(|&&n| n != MESSAGE_BYTES).count(),
    }
}

/// The proxy's `sidecar_outbound_failures_total` samples that are not zero.
fn failures_by_reason(mesh: &MeshLab) -> Vec<String> {
    let body = sidecar_tests::wait_for_http_ok(
        &mesh.client,
        "http://127.0.0.1:15020/stats/prometheus",
        Duration::from_secs(10),
    )
    .expect("scrape the proxy")
    .body;
    sidecar_tests::prometheus::parse(&body)
        .expect("the proxy's metrics parse")
        .into_iter()
        .filter(|sample| sample.name == "sidecar_outbound_failures_total" && sample.value > 0.0)
        .map(|sample| format!("{:?} {}", sample.labels, sample.value))
        .collect()
}

fn lines_with(process: &LabProcess, word: &str) -> Vec<String> {
    process
        .stdout_text()
        .lines()
        .filter(|line| line.starts_with(word))
        .map(str::to_owned)
        .collect()
}

fn every_message_arrives(layout: Layout, name: &str) {
    let mut mesh = MeshLab::new(name, layout);
    mesh.init(&[]);
    mesh.start_proxy();
    let sink = mesh
        .server
        .command("python3")
        .args(["-c", SINK, &SINK_PORT.to_string()])
        .spawn()
        .expect("sink");
    wait_for_tcp(
        &mesh.server,
        SocketAddr::new(mesh.server.ipv4().into(), SINK_PORT),
        Duration::from_secs(10),
    )
    .expect("sink listening");
    let total = SENDERS.len() * MESSAGES_PER_SENDER;
    for target in [mesh.server_v4(SINK_PORT), mesh.server_v6(SINK_PORT)] {
        let delivery = send_and_close(&mesh, &sink, target);
        assert_eq!(
            (delivery.sent, delivery.failed),
            (total, 0),
            "every connect and send to {target} must succeed"
        );
        assert_eq!(
            (delivery.received_whole, delivery.received_partial),
            (total, 0),
            "{layout:?} to {target}: messages lost or cut; the proxy's outbound failures by \
             reason: {:?}",
            failures_by_reason(&mesh)
        );
    }
    if layout != Layout::Iptables {
        let counters = mesh.bpf_counters();
        assert_eq!(counters[Counter::OrigDstMissing], 0, "{counters:?}");
        assert_eq!(
            counters[Counter::OrigDstServed],
            2 * total as u64,
            "{counters:?}"
        );
    }
}

#[test]
fn write_and_close_at_once_loses_nothing_under_ebpf() {
    every_message_arrives(Layout::EbpfProxyInPod, "close-ebpf");
}

#[test]
fn write_and_close_at_once_loses_nothing_under_ebpf_with_a_sibling_proxy() {
    every_message_arrives(Layout::EbpfProxyInSibling, "close-ebpf-sib");
}

#[test]
fn write_and_close_at_once_loses_nothing_under_iptables() {
    every_message_arrives(Layout::Iptables, "close-iptables");
}
