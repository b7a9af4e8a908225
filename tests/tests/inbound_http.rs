//! Inbound HTTP on the real kernel (run as root): a client pod and a server pod, each with eBPF
//! capture installed by `sidecar init` and the real proxy (UID 1337) holding a certificate from
//! `sidecar certs`, and a pod without a sidecar. curl's requests to the server's app go through
//! the server proxy's HTTP layer, which reports them as Istio's destination does: the series
//! Istio's dashboards and Kiali read, with the peer's identity, and an access line each.
mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use sidecar_tests::{
    Lab, LabProcess, MeshPki, Pod, SidecarPod, identity_config, proxy_metrics, replace_file,
    require_root, wait_for_tcp,
};

/// The app's HTTP port, STRICT (the server's default mode).
const STRICT_PORT: u16 = 8080;
/// The app's HTTP port declared PERMISSIVE: plaintext from outside the mesh gets in.
const PERMISSIVE_PORT: u16 = 9090;
/// STRICT, and nothing listens there.
const CLOSED_PORT: u16 = 7070;
const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "default";
const READY: Duration = Duration::from_secs(10);
const PATIENCE: Duration = Duration::from_secs(10);

/// The labels Istio's dashboards and Kiali query on `istio_requests_total`.
const DASHBOARD_LABELS: [&str; 12] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "response_code",
    "response_flags",
    "connection_security_policy",
    "request_protocol",
];

fn spiffe(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{sa}")
}

struct InboundLab {
    lab: Lab,
    client: SidecarPod,
    server: SidecarPod,
    outsider: Pod,
    _app: LabProcess,
}

impl InboundLab {
    fn new(test: &str) -> InboundLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new(test).expect("lab");
        let client = lab.add_pod("client").expect("client pod");
        let server = lab.add_pod("server").expect("server pod");
        let outsider = lab.add_pod("outsider").expect("outsider pod");
        let app = server
            .command(labtool())
            .in_cgroup(server.cgroup_child("app").expect("app cgroup"))
            .args(["http-server", "--name", "server"])
            .args(["--listen", &format!("[::]:{STRICT_PORT}")])
            .args(["--listen", &format!("[::]:{PERMISSIVE_PORT}")])
            .spawn()
            .expect("the server's app");
        for port in [STRICT_PORT, PERMISSIVE_PORT] {
            wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), port), READY)
                .expect("the server's app listening");
        }

        let pki = MeshPki::create(sidecar_bin(), lab.dir().join("pki"), Some(TRUST_DOMAIN))
            .expect("lab CA");
        for pod in [&client, &server] {
            pki.issue(pod.name(), NAMESPACE, pod.name(), &[])
                .expect("workload certificate");
        }
        let pki = pki.dir();
        write_mesh_config(
            &pki.join("client"),
            &format!(
                "workloads:\n  - name: server\n    addresses: [{}, '{}']\n    identities: [{}]\n",
                server.ipv4(),
                server.ipv6(),
                spiffe("server")
            ),
        );
        write_mesh_config(
            &pki.join("server"),
            &format!(
                "http:\n  accessLog: true\ninbound:\n  mode: STRICT\n  ports:\n    - port: {PERMISSIVE_PORT}\n      mode: PERMISSIVE\n"
            ),
        );
        let mut client = sidecar_pod(&lab, client);
        let mut server = sidecar_pod(&lab, server);
        for pod in [&client, &server] {
            pod.install_capture(CaptureMode::Ebpf, &[])
                .expect("sidecar init");
        }
        start_proxy(&mut client, &pki.join("client"));
        start_proxy(&mut server, &pki.join("server"));
        InboundLab {
            lab,
            client,
            server,
            outsider,
            _app: app,
        }
    }

    /// `curl http://<server>:PORT/PATH` from `pod` (from its app's cgroup when it has a
    /// sidecar): the status code and the body.
    fn curl(&self, pod: &Pod, port: u16, path: &str) -> (String, String) {
        let url = format!("http://{}:{port}{path}", self.server.ipv4());
        let mut command = pod.command("curl");
        if pod.name() != self.outsider.name() {
            command = command.in_cgroup(pod.cgroup_child("app").expect("app cgroup"));
        }
        let out = command
            .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
            .arg(&url)
            .run()
            .expect("curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (status.to_owned(), body.to_owned())
    }

    /// Waits until `pod`'s proxy has an `istio_requests_total` series whose dashboard labels
    /// are exactly `expected`, with the value `count`; every Istio label must be there too.
    fn wait_for_series(&self, pod: &Pod, expected: &[(&str, &str)], count: f64) {
        let expected: BTreeMap<&str, &str> = expected.iter().copied().collect();
        assert_eq!(
            expected.keys().copied().collect::<Vec<_>>(),
            {
                let mut names = DASHBOARD_LABELS.to_vec();
                names.sort_unstable();
                names
            },
            "the test names every dashboard label"
        );
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = proxy_metrics(pod).expect("scrape the proxy's metrics");
            let reporter = [("reporter", expected["reporter"])];
            let series =
                sidecar_tests::prometheus::matching(&text, "istio_requests_total", &reporter)
                    .unwrap_or_else(|error| panic!("{error}\n{}", self.logs()));
            let found = series.iter().find(|sample| {
                DASHBOARD_LABELS.iter().all(|name| {
                    sample.labels.get(*name).map(String::as_str) == Some(expected[name])
                })
            });
            if let Some(sample) = found.filter(|sample| sample.value == count) {
                assert_eq!(
                    sample.labels.len(),
                    18,
                    "Istio's 18 labels: {:?}",
                    sample.labels
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no series {expected:?} = {count} in {}'s proxy; it has {series:#?}\n{}",
                pod.name(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        [&self.client, &self.server]
            .iter()
            .map(|pod| pod.proxy_logs())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

/// The mesh config in `dir`, naming the certificate files `sidecar certs` wrote there.
fn write_mesh_config(dir: &Path, rest: &str) {
    let config = format!("{}{rest}", identity_config(TRUST_DOMAIN));
    replace_file(&dir.join("mesh.yaml"), &config).expect("write the mesh config");
}

/// The proxy as Kubernetes runs it: UID 1337, in the pod, named after the pod.
fn start_proxy(pod: &mut SidecarPod, dir: &Path) {
    let name = pod.name().to_owned();
    let command = pod
        .proxy_command()
        .args(["--log-format", "json"])
        .args(["--workload-name", &name, "--workload-namespace", NAMESPACE])
        .arg("--mesh-config")
        .arg(dir.join("mesh.yaml"));
    pod.start_proxy(command).expect("proxy");
}

/// curl from a meshed pod to a meshed pod under mTLS, plaintext from outside the mesh to a
/// PERMISSIVE port, and a request to a port where the app does not listen: each is reported
/// by the server's proxy as Istio's destination reports it, with an access line.
#[test]
fn ebpf_inbound_http_is_reported_by_the_destination() {
    let mesh = InboundLab::new("in-http");
    let client_id = spiffe("client");
    let server_id = spiffe("server");

    let (status, body) = mesh.curl(&mesh.client, STRICT_PORT, "/reviews");
    assert_eq!(status, "200", "{body}\n{}", mesh.logs());
    assert!(
        body.contains("127.0.0.6") && body.contains(&mesh.server.ipv4().to_string()),
        "the app sees the passthrough address and its own pod IP: {body}"
    );
    let mutual_tls = |code, flags| {
        [
            ("reporter", "destination"),
            ("source_workload", "unknown"),
            ("source_workload_namespace", NAMESPACE),
            ("source_principal", client_id.as_str()),
            ("destination_workload", "server"),
            ("destination_workload_namespace", NAMESPACE),
            ("destination_principal", server_id.as_str()),
            ("destination_service", "unknown"),
            ("response_code", code),
            ("response_flags", flags),
            ("connection_security_policy", "mutual_tls"),
            ("request_protocol", "http"),
        ]
    };
    mesh.wait_for_series(&mesh.server, &mutual_tls("200", "-"), 1.0);
    // The client's proxy reports the same request as its source.
    mesh.wait_for_series(
        &mesh.client,
        &[
            ("reporter", "source"),
            ("source_workload", "client"),
            ("source_workload_namespace", NAMESPACE),
            ("source_principal", client_id.as_str()),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "unknown"),
            ("destination_principal", server_id.as_str()),
            ("destination_service", "unknown"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
            ("request_protocol", "http"),
        ],
        1.0,
    );

    // Plaintext from outside the mesh: PERMISSIVE lets it in, with no identity...
    let (status, body) = mesh.curl(&mesh.outsider, PERMISSIVE_PORT, "/");
    assert_eq!(status, "200", "{body}\n{}", mesh.logs());
    mesh.wait_for_series(
        &mesh.server,
        &[
            ("reporter", "destination"),
            ("source_workload", "unknown"),
            ("source_workload_namespace", "unknown"),
            ("source_principal", "unknown"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", NAMESPACE),
            ("destination_principal", "unknown"),
            ("destination_service", "unknown"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("connection_security_policy", "none"),
            ("request_protocol", "http"),
        ],
        1.0,
    );
    // ...and STRICT still refuses it, before any request.
    let (status, _) = mesh.curl(&mesh.outsider, STRICT_PORT, "/");
    assert_eq!(
        status,
        "000",
        "plaintext reached a STRICT port\n{}",
        mesh.logs()
    );

    // The app's port is closed: the server's proxy answers 503, flag UF.
    let (status, body) = mesh.curl(&mesh.client, CLOSED_PORT, "/");
    assert_eq!(status, "503", "{body}\n{}", mesh.logs());
    mesh.wait_for_series(&mesh.server, &mutual_tls("503", "UF"), 1.0);

    let server_log = mesh.server.proxy().expect("proxy started").stdout_text();
    let access = |path: &str, principal: &str| {
        server_log.lines().any(|line| {
            line.contains(r#""target":"access""#)
                && line.contains(r#""direction":"inbound""#)
                && line.contains("request complete")
                && line.contains(&format!(r#""path":"{path}""#))
                && line.contains(principal)
        })
    };
    assert!(
        access("/reviews", &format!(r#""src_principal":"{client_id}""#)),
        "no inbound access line for the mTLS request:\n{server_log}"
    );
    assert!(
        access("/", r#""src_principal":"unknown""#),
        "no inbound access line for the plaintext request:\n{server_log}"
    );
    let _ = &mesh.lab;
}
