//! How the proxy stops (issue #14, items 1 and 5), on the real kernel (root): a pod `web` with
//! eBPF capture and the real proxy (UID 1337), whose app is an HTTP server, and a pod `peer`
//! without a sidecar, whose HTTP server the app calls (through the proxy's outbound side) and
//! which calls the app (through the inbound side). Both servers answer `GET /delay/<ms>` that
//! late, which keeps a request in flight while the proxy is asked to stop.
mod common;

use std::{
    net::SocketAddr,
    process::Output,
    time::{Duration, Instant},
};

use common::*;
use rustix::process::Signal;
use sidecar_tests::{Lab, LabProcess, Pod, PodCommand, SidecarPod, require_root, wait_for_tcp};

const APP_PORT: u16 = 8080;
/// The app's user: not root, not the proxy's.
const APP_UID: u32 = 1000;
const READY: Duration = Duration::from_secs(10);
/// `--drain-duration`'s default.
const DRAIN: Duration = Duration::from_secs(5);
/// The slow request: 2 s.
const SLOW: &str = "/delay/2000";
/// A request that outlives any drain period here.
const ENDLESS: &str = "/delay/60000";

struct LifecycleLab {
    lab: Lab,
    web: SidecarPod,
    peer: Pod,
    _apps: [LabProcess; 2],
}

impl LifecycleLab {
    fn new(test: &str) -> LifecycleLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new(test).expect("lab");
        let web = lab.add_pod("web").expect("web pod");
        let peer = lab.add_pod("peer").expect("peer pod");
        let serve = |pod: &Pod, cgroup: Option<std::path::PathBuf>| {
            let mut command = pod.command(labtool());
            if let Some(cgroup) = cgroup {
                command = command.in_cgroup(cgroup);
            }
            let app = command
                .args(["http-server", "--listen", &format!("[::]:{APP_PORT}")])
                .args(["--name", pod.name()])
                .spawn()
                .expect("HTTP server");
            wait_for_tcp(pod, SocketAddr::new(pod.ipv4().into(), APP_PORT), READY)
                .expect("HTTP server listening");
            app
        };
        let apps = [
            serve(&web, Some(web.cgroup_child("app").expect("app cgroup"))),
            serve(&peer, None),
        ];
        let web = sidecar_pod(&lab, web);
        web.install_capture(CaptureMode::Ebpf, &[])
            .expect("sidecar init");
        LifecycleLab {
            lab,
            web,
            peer,
            _apps: apps,
        }
    }

    /// The web pod's proxy, as Kubernetes runs it (UID 1337, in the pod), with `extra` options.
    fn start_proxy(&mut self, extra: &[&str]) {
        let command = self
            .web
            .proxy_command()
            .args(["--log-format", "json", "--workload-name", "web"])
            .args(extra);
        self.web.start_proxy(command).expect("proxy");
    }

    fn proxy(&self) -> &LabProcess {
        self.web.proxy().expect("proxy started")
    }

    fn logs(&self) -> String {
        self.proxy();
        self.web.proxy_logs()
    }

    /// The app (its cgroup and user) GETs `path` from the peer: the proxy's outbound side.
    fn app_calls_the_peer(&self, path: &str) -> PodCommand {
        let url = format!("http://{}:{APP_PORT}{path}", self.peer.ipv4());
        curl(
            self.web
                .command("curl")
                .in_cgroup(self.web.cgroup_child("app").expect("app cgroup"))
                .as_user(APP_UID, APP_UID),
            &url,
        )
    }

    /// The peer GETs `path` from the app: the proxy's inbound side.
    fn peer_calls_the_app(&self, path: &str) -> PodCommand {
        let url = format!("http://{}:{APP_PORT}{path}", self.web.ipv4());
        curl(self.peer.command("curl"), &url)
    }

    /// The kubelet's readiness probe (from the peer pod): the status code, `000` when refused.
    fn readiness(&self) -> String {
        let url = format!("http://{}:15021/healthz/ready", self.web.ipv4());
        let out = self
            .peer
            .command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "1",
            ])
            .arg(url)
            .run()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until the proxy holds at least one connection on each data-path side.
    fn wait_for_connections_both_ways(&self) {
        let deadline = Instant::now() + READY;
        let held = |side: &str| {
            proxy_metric(
                &self.web,
                "sidecar_listener_connections",
                &[("listener", side)],
            )
        };
        while held("outbound") == 0 || held("inbound") == 0 {
            assert!(
                Instant::now() < deadline,
                "the requests never reached the proxy:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until readiness fails (the drain has started); an error after `patience`.
    fn wait_until_not_ready(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            let code = self.readiness();
            if code != "200" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "readiness still 200 after {patience:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `curl URL`, printing the response headers then the status code on a line of its own.
fn curl(command: PodCommand, url: &str) -> PodCommand {
    command
        .args(["-sS", "--max-time", "70", "-o", "/dev/null", "-D", "-"])
        .args(["-w", "%{http_code}\n"])
        .arg(url)
        .timeout(Duration::from_secs(75))
}

/// What curl printed: the status code (`000`: no response) and the response's headers.
struct Answer {
    status: String,
    headers: String,
    output: String,
}

impl Answer {
    fn of(stdout: &str, stderr: &str) -> Answer {
        let trimmed = stdout.trim_end();
        let (headers, status) = trimmed.rsplit_once('\n').unwrap_or(("", trimmed));
        Answer {
            status: status.trim().to_owned(),
            headers: headers.to_ascii_lowercase(),
            output: format!("stdout:\n{stdout}\nstderr:\n{stderr}"),
        }
    }

    fn of_output(out: &Output) -> Answer {
        Answer::of(
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// The answer of a request spawned earlier, once it is complete.
    fn of_process(process: &LabProcess) -> Answer {
        process
            .wait(Duration::from_secs(75))
            .expect("the request ends");
        Answer::of(&process.stdout_text(), &process.stderr_text())
    }

    fn closes_the_connection(&self) -> bool {
        self.headers
            .lines()
            .any(|line| line.trim_end() == "connection: close")
    }
}

#[test]
fn sigterm_drains_requests_in_flight_and_exits_once_none_is_left() {
    let mut lab = LifecycleLab::new("life-drain");
    lab.start_proxy(&[]);
    let outbound = lab.app_calls_the_peer(SLOW).spawn().expect("curl");
    let inbound = lab.peer_calls_the_app(SLOW).spawn().expect("curl");
    lab.wait_for_connections_both_ways();

    let sigterm = Instant::now();
    lab.proxy().signal(Signal::TERM).expect("SIGTERM");
    // Readiness fails at once, so that nothing new is routed here...
    lab.wait_until_not_ready(Duration::from_secs(1));
    // ...but the listeners stay open: what still comes is served, HTTP/1 told to close its
    // connection both ways (the app's outbound, the peer's inbound).
    let new_outbound = Answer::of_output(&lab.app_calls_the_peer("/").run().expect("curl"));
    assert_eq!(new_outbound.status, "200", "{}", new_outbound.output);
    assert!(
        new_outbound.closes_the_connection(),
        "{}",
        new_outbound.output
    );
    let new_inbound = Answer::of_output(&lab.peer_calls_the_app("/").run().expect("curl"));
    assert_eq!(new_inbound.status, "200", "{}", new_inbound.output);
    assert!(
        new_inbound.closes_the_connection(),
        "{}",
        new_inbound.output
    );
    assert_ne!(lab.readiness(), "200", "readiness came back while draining");

    // The requests in flight at SIGTERM complete.
    let outbound = Answer::of_process(&outbound);
    assert_eq!(
        outbound.status,
        "200",
        "{}\n{}",
        outbound.output,
        lab.logs()
    );
    assert!(outbound.closes_the_connection(), "{}", outbound.output);
    let inbound = Answer::of_process(&inbound);
    assert_eq!(inbound.status, "200", "{}\n{}", inbound.output, lab.logs());
    assert!(inbound.closes_the_connection(), "{}", inbound.output);

    // And the proxy exits as soon as no connection is left, not at the end of the period.
    let status = lab
        .proxy()
        .wait((DRAIN + Duration::from_secs(1)).saturating_sub(sigterm.elapsed()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{status}\n{}", lab.logs());
    assert!(lab.logs().contains("no connection left"), "{}", lab.logs());
    let _ = &lab.lab;
}

#[test]
fn connections_still_open_at_the_end_of_the_drain_period_are_closed() {
    let mut lab = LifecycleLab::new("life-period");
    lab.start_proxy(&["--drain-duration", "2s"]);
    let held = lab.peer_calls_the_app(ENDLESS).spawn().expect("curl");
    let app_held = lab.app_calls_the_peer(ENDLESS).spawn().expect("curl");
    lab.wait_for_connections_both_ways();

    let sigterm = Instant::now();
    lab.proxy().signal(Signal::TERM).expect("SIGTERM");
    let status = lab
        .proxy()
        .wait(Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{status}\n{}", lab.logs());
    assert!(
        sigterm.elapsed() >= Duration::from_secs(2),
        "exited before the period ended, with connections open:\n{}",
        lab.logs()
    );
    assert!(lab.logs().contains("drain period over"), "{}", lab.logs());
    for request in [held, app_held] {
        let answer = Answer::of_process(&request);
        assert_eq!(answer.status, "000", "cut, not answered: {}", answer.output);
    }
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut lab = LifecycleLab::new("life-second");
    lab.start_proxy(&[]);
    let _held = lab.peer_calls_the_app(ENDLESS).spawn().expect("curl");
    let _app_held = lab.app_calls_the_peer(ENDLESS).spawn().expect("curl");
    lab.wait_for_connections_both_ways();

    lab.proxy().signal(Signal::TERM).expect("SIGTERM");
    lab.wait_until_not_ready(Duration::from_secs(1));
    assert!(
        lab.proxy().try_status().expect("status").is_none(),
        "draining, not gone:\n{}",
        lab.logs()
    );
    lab.proxy().signal(Signal::INT).expect("SIGINT");
    let status = lab
        .proxy()
        .wait(Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{status}\n{}", lab.logs());
    assert!(lab.logs().contains("exiting at once"), "{}", lab.logs());
}

/// A Job's pod without native sidecars: the proxy exits once the app has had no connection
/// open for the given time, but never before the app's first one, nor during a long one.
#[test]
fn exit_when_idle_after_the_apps_last_connection() {
    let mut lab = LifecycleLab::new("life-idle");
    lab.start_proxy(&["--exit-when-idle-after", "1s"]);

    // Not before the app's first connection, however long it takes to come.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lab.proxy().try_status().expect("status").is_none(),
        "exited before the app made a connection:\n{}",
        lab.logs()
    );
    assert_eq!(lab.readiness(), "200");

    // Nor during a request longer than the idle time.
    let request = Answer::of_output(&lab.app_calls_the_peer(SLOW).run().expect("curl"));
    assert_eq!(request.status, "200", "{}\n{}", request.output, lab.logs());

    let status = lab
        .proxy()
        .wait(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{status}\n{}", lab.logs());
    assert!(
        lab.logs().contains("no connection of the app for 1s"),
        "{}",
        lab.logs()
    );
}
