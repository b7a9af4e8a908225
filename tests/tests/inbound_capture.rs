//! Inbound capture by sk_lookup on the pod's network namespace, on the real kernel (root).
//!
//! A stand-in for the proxy's inbound listener (an echo server on port 15006, in the pod's
//! proxy cgroup) shows what the kernel does by itself: the connection lands on the listener
//! with its original local address, so that address is the original destination.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use sidecar_common::Counter;
use sidecar_tests::{BpfCounters, Lab, LabProcess, Pod, SidecarPod, require_root, wait_for_tcp};

const INBOUND_PORT: u16 = 15006;

struct InboundLab {
    lab: Lab,
    client: Pod,
    server: SidecarPod,
    app: LabProcess,
}

impl InboundLab {
    fn new(test: &str, init_args: &[&str]) -> InboundLab {
        require_root();
        let lab = Lab::new(test).expect("lab");
        let client = lab.add_pod("client").expect("client");
        let server = lab.add_pod("server").expect("server");
        let app = server
            .command(labtool())
            .in_cgroup(server.cgroup_child("app").unwrap())
            .args([
                "echo-server",
                "--listen",
                "[::]:8080",
                "--listen",
                "[::]:9090",
            ])
            .spawn()
            .expect("app");
        wait_for_tcp(
            &server,
            SocketAddr::new(server.ipv4().into(), 8080),
            Duration::from_secs(5),
        )
        .unwrap();
        let server = sidecar_pod(&lab, server);
        server
            .install_capture(CaptureMode::Ebpf, init_args)
            .expect("init");
        InboundLab {
            lab,
            client,
            server,
            app,
        }
    }

    /// The stand-in inbound listener, as the proxy would run it (UID 1337, proxy cgroup).
    fn start_listener(&self) -> LabProcess {
        let listener = self
            .server
            .proxy_place_command(labtool())
            .args(["echo-server", "--listen", &format!("[::]:{INBOUND_PORT}")])
            .spawn()
            .expect("inbound listener");
        listener
            .wait_for_stdout("listening", Duration::from_secs(5))
            .unwrap();
        listener
    }

    fn connect(&self, target: SocketAddr) -> Result<sidecar_tests::ConnectReport, String> {
        let out = self
            .client
            .command(labtool())
            .args(["connect", &target.to_string(), "--timeout-ms", "1500"])
            .run()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(text(&out));
        }
        sidecar_tests::ConnectReport::from_output(&out).map_err(|e| e.to_string())
    }

    /// Connects from inside the server pod to its own pod IP, port 8080, from each source
    /// address given (with the family of the pod IP: "v4" or "v6"), and echoes a byte. Run from
    /// a cgroup outside the pod, so the outbound hooks leave it alone, as they leave the proxy
    /// alone.
    fn connect_inside_the_pod(&self, sources: &[(&str, &str)]) -> std::process::Output {
        let pairs: Vec<String> = sources
            .iter()
            .map(|(source, family)| match *family {
                "v4" => format!("(socket.AF_INET, '{source}', '{}')", self.server.ipv4()),
                _ => format!("(socket.AF_INET6, '{source}', '{}')", self.server.ipv6()),
            })
            .collect();
        let script = format!(
            "import socket\n\
             for fam, src, dst in ({},):\n\
             \x20   s = socket.socket(fam); s.bind((src, 0)); s.settimeout(2); s.connect((dst, 8080))\n\
             \x20   s.sendall(b'x'); s.shutdown(socket.SHUT_WR); assert s.recv(4096)\n",
            pairs.join(", ")
        );
        self.server
            .command("python3")
            .in_cgroup(self.lab.sibling_cgroup("unhooked").unwrap())
            .args(["-c", &script])
            .run()
            .unwrap()
    }

    fn counters(&self) -> BpfCounters {
        BpfCounters::from(status_of(self.server.cgroup()).expect("server capture"))
    }
}

/// Connections seen by an echo server (one JSON report line each), once it has written
/// `expected` of them or 5 s have passed: it writes a connection's line after the echo, so the
/// client can be done before the line is.
fn served(process: &LabProcess, expected: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let count = process
            .stdout_text()
            .lines()
            .filter(|l| l.starts_with('{'))
            .count();
        if count >= expected || std::time::Instant::now() >= deadline {
            return count;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn inbound_connections_reach_the_listener_with_their_original_destination() {
    let mesh = InboundLab::new("in-steer", &["--exclude-inbound-ports", "9090"]);
    let listener = mesh.start_listener();
    for target in [
        SocketAddr::new(mesh.server.ipv4().into(), 8080),
        SocketAddr::new(mesh.server.ipv6().into(), 8080),
    ] {
        let report = mesh
            .connect(target)
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        assert!(report.echo_ok);
        assert_eq!(
            canonical(report.server.local),
            target,
            "the local address is the original destination"
        );
        assert_eq!(
            report.peer, target,
            "the client sees the address it dialled"
        );
    }
    assert_eq!(
        served(&listener, 2),
        2,
        "listener:\n{}",
        listener.stdout_text()
    );
    assert_eq!(
        served(&mesh.app, 0),
        0,
        "the app must not see captured connections"
    );

    // An excluded port goes straight to the app.
    let report = mesh
        .connect(SocketAddr::new(mesh.server.ipv4().into(), 9090))
        .unwrap();
    assert!(report.echo_ok);
    assert_eq!(served(&mesh.app, 1), 1);

    // The proxy's passthrough (from 127.0.0.6 / ::6 inside the pod) reaches the app.
    let out = mesh.connect_inside_the_pod(&[("127.0.0.6", "v4"), ("::6", "v6")]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(served(&mesh.app, 3), 3);

    let counters = mesh.counters();
    assert_eq!(counters[Counter::InboundRedirected], 2, "{counters:?}");
    assert_eq!(counters[Counter::InboundExcludedPort], 1, "{counters:?}");
    assert_eq!(counters[Counter::InboundPassthrough], 2, "{counters:?}");
    assert_eq!(counters[Counter::InboundNoProxy], 0, "{counters:?}");
}

#[test]
fn without_the_proxy_inbound_fails_closed_and_is_counted() {
    let mesh = InboundLab::new("in-closed", &[]);
    let target = SocketAddr::new(mesh.server.ipv4().into(), 8080);
    let err = mesh
        .connect(target)
        .expect_err("no listener: the connection must not reach the app");
    assert!(
        err.contains("timed out") || err.contains("refused"),
        "{err}"
    );
    assert_eq!(served(&mesh.app, 0), 0);
    assert!(mesh.counters()[Counter::InboundNoProxy] >= 1);

    // A listener that comes up later is picked up without re-running init...
    let listener = mesh.start_listener();
    mesh.connect(target)
        .expect("captured once the listener exists");
    assert_eq!(served(&listener, 1), 1);
    // ...and one that goes away leaves no stale registration behind.
    listener.stop(Duration::from_secs(2)).unwrap();
    mesh.connect(target).expect_err("listener gone");
    let _ = &mesh.lab;
}

#[test]
fn inbound_capture_can_be_turned_off() {
    let mesh = InboundLab::new("in-off", &["--no-inbound-capture"]);
    let _listener = mesh.start_listener();
    let report = mesh
        .connect(SocketAddr::new(mesh.server.ipv4().into(), 8080))
        .unwrap();
    assert!(report.echo_ok);
    assert_eq!(served(&mesh.app, 1), 1);
    let entry = status_of(mesh.server.cgroup()).expect("server capture");
    assert_eq!(entry.inbound_port, None, "{entry:?}");
    assert!(
        entry
            .links
            .iter()
            .all(|link| link.program != "steer_inbound"),
        "{:?}",
        entry.links
    );
}

#[test]
fn ports_istio_reserves_but_the_proxy_does_not_serve_are_captured() {
    let mesh = InboundLab::new("in-unserved", &[]);
    let listener = mesh.start_listener();
    // An app listening where Envoy would serve (15090: Prometheus, 15008: HBONE) must not be
    // reachable past the proxy: nothing of ours listens there.
    let squatter = mesh
        .server
        .command(labtool())
        .in_cgroup(mesh.server.cgroup_child("app").unwrap())
        .args([
            "echo-server",
            "--listen",
            "[::]:15090",
            "--listen",
            "[::]:15008",
        ])
        .spawn()
        .expect("app on reserved ports");
    squatter
        .wait_for_stdout("listening", Duration::from_secs(5))
        .unwrap();
    for port in [15090, 15008] {
        let target = SocketAddr::new(mesh.server.ipv4().into(), port);
        let report = mesh
            .connect(target)
            .unwrap_or_else(|e| panic!("{port}: {e}"));
        assert!(report.echo_ok);
    }
    assert_eq!(served(&squatter, 0), 0, "reached past the proxy");
    assert_eq!(served(&listener, 2), 2);
}

/// Only the proxy's passthrough source is let through: a connection from the real localhost
/// (127.0.0.1, ::1) to the pod's address is inbound traffic like any other and meets the
/// proxy, so its policy applies (an exemption of all of loopback would skip it).
#[test]
fn connections_from_localhost_to_the_pod_address_are_captured() {
    let mesh = InboundLab::new("in-localhost", &[]);
    let listener = mesh.start_listener();
    let out = mesh.connect_inside_the_pod(&[("127.0.0.1", "v4"), ("::1", "v6")]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(served(&mesh.app, 0), 0, "localhost skipped the proxy");
    assert_eq!(served(&listener, 2), 2, "{}", listener.stdout_text());
    let counters = mesh.counters();
    assert_eq!(counters[Counter::InboundPassthrough], 0, "{counters:?}");
    assert_eq!(counters[Counter::InboundRedirected], 2, "{counters:?}");
}

/// The attack: while the proxy is down (restarting, or killed), a process of the app's user
/// listens on the inbound port (it would be registered as the inbound listener and receive
/// every inbound connection in plaintext, past mTLS and authorization) or on the outbound port
/// (the pod's outbound connections). Its explicit binds are refused, and the automatic port of
/// a listen() without bind never lands on them even when the pod's port range covers them.
#[test]
fn only_the_proxy_may_listen_on_the_capture_ports() {
    const APP_USER: u32 = 1000;
    let mesh = InboundLab::new("in-squat", &[]);
    let script = "import socket, errno\n\
        for fam, addr in ((socket.AF_INET6, '::'), (socket.AF_INET, '0.0.0.0'),\n\
        \x20                 (socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):\n\
        \x20   for port in (15006, 15001):\n\
        \x20       s = socket.socket(fam)\n\
        \x20       try:\n\
        \x20           s.bind((addr, port)); s.listen(); print('LISTENING', addr, port)\n\
        \x20       except PermissionError:\n\
        \x20           print('REFUSED', addr, port)\n\
        held, ports = [], set()\n\
        while True:\n\
        \x20   s = socket.socket(socket.AF_INET6)\n\
        \x20   try:\n\
        \x20       s.listen()\n\
        \x20   except OSError as e:\n\
        \x20       assert e.errno == errno.EADDRINUSE, e; break\n\
        \x20   held.append(s); ports.add(s.getsockname()[1])\n\
        print('AUTOBOUND', sorted(ports))\n";
    // The pod's own automatic port range, narrowed onto the proxy's ports (a pod may set it).
    let out = mesh
        .server
        .command("sysctl")
        .args(["-w", "net.ipv4.ip_local_port_range=15000 15010"])
        .run()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = mesh
        .server
        .command(SYSTEM_PYTHON)
        .in_cgroup(mesh.server.cgroup_child("app").unwrap())
        .as_user(APP_USER, APP_USER)
        .args(["-c", script])
        .run()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !stdout.contains("LISTENING"),
        "the app's user listens on a capture port:\n{stdout}"
    );
    assert_eq!(stdout.matches("REFUSED").count(), 8, "{stdout}");
    let autobound: Vec<u16> = stdout
        .lines()
        .find_map(|line| line.strip_prefix("AUTOBOUND "))
        .map(|list| {
            list.trim_matches(['[', ']'])
                .split(", ")
                .map(|port| port.parse().unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        autobound.len() >= 5 && autobound.iter().all(|port| (15000..=15010).contains(port)),
        "the narrowed range was not in force: {autobound:?}"
    );
    assert!(
        !autobound.contains(&15001) && !autobound.contains(&15006),
        "listen() without bind got a capture port: {autobound:?}"
    );
    assert_eq!(mesh.counters()[Counter::ProxyPortBindRefused], 8);

    // Inbound still fails closed, and the real proxy's listener (its UID) registers.
    let target = SocketAddr::new(mesh.server.ipv4().into(), 8080);
    assert!(mesh.connect(target).is_err());
    assert_eq!(served(&mesh.app, 0), 0);
    let listener = mesh.start_listener();
    assert!(mesh.connect(target).unwrap().echo_ok);
    assert_eq!(served(&listener, 1), 1);
}
