//! HTTP routing by the real proxy on the real kernel (run as root): a client pod with eBPF
//! capture and the proxy (UID 1337) configured with an `http` section; a server pod with two
//! HTTP servers, `v1` and `v2`. The client app's requests are captured, routed by path, counted
//! with Istio's request metrics; an invalid config edit is rejected and routing goes on.
mod common;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use common::*;
use sidecar_tests::{
    Lab, LabProcess, MeshPki, Pod, SidecarPod, identity_config, replace_file, require_root,
    wait_for_tcp,
};

const V1_PORT: u16 = 8081;
const V2_PORT: u16 = 8082;
const READY: Duration = Duration::from_secs(10);

struct RoutingLab {
    _lab: Lab,
    client: SidecarPod,
    server: Pod,
    config: PathBuf,
    _servers: Vec<LabProcess>,
}

impl RoutingLab {
    fn new() -> RoutingLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new("http-routing").expect("lab");
        let client = lab.add_pod("client").expect("client pod");
        let server = lab.add_pod("server").expect("server pod");
        let servers = [("v1", V1_PORT), ("v2", V2_PORT)]
            .into_iter()
            .map(|(name, port)| {
                server
                    .command(labtool())
                    .args([
                        "http-server",
                        "--listen",
                        &format!("[::]:{port}"),
                        "--name",
                        name,
                    ])
                    .spawn()
                    .expect("http server")
            })
            .collect();
        for port in [V1_PORT, V2_PORT] {
            wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), port), READY)
                .expect("http server listening");
        }

        let pki = MeshPki::create(sidecar_bin(), lab.dir().join("pki"), Some("cluster.local"))
            .expect("lab CA");
        let config = pki
            .issue("client", "default", "client", &[])
            .expect("the client's certificate")
            .join("mesh.yaml");
        write_config(&config, &http_section(&server, "v2"));

        let mut client = sidecar_pod(&lab, client);
        client
            .install_capture(CaptureMode::Ebpf, &[])
            .expect("sidecar init");
        let proxy = client
            .proxy_command()
            .env("POD_NAMESPACE", "default")
            .args(["--log-format", "json", "--workload-name", "client"])
            .args(["--mesh-config", &config.to_string_lossy()]);
        client.start_proxy(proxy).expect("proxy");
        RoutingLab {
            _lab: lab,
            client,
            server,
            config,
            _servers: servers,
        }
    }

    /// `GET url` from the client app (captured); the body of the answer.
    fn get(&self, url: &str) -> String {
        let out = self
            .client
            .command(labtool())
            .in_cgroup(self.client.app_cgroup().expect("app cgroup"))
            .args(["http-get", url])
            .run()
            .expect("run labtool http-get");
        assert!(
            out.status.success(),
            "GET {url}:\n{}\n{}",
            text(&out),
            self.logs()
        );
        let response: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("labtool http-get prints JSON");
        assert_eq!(
            response["status"],
            200,
            "GET {url}: {response}\n{}",
            self.logs()
        );
        response["body"].as_str().unwrap_or_default().to_owned()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{V1_PORT}{path}", self.server.ipv4())
    }

    fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], expected: u64) {
        wait_for_metric(
            &self.client,
            name,
            labels,
            MetricGoal::Exactly(expected),
            || self.logs(),
        );
    }

    fn logs(&self) -> String {
        self.client.proxy_logs()
    }
}

/// Requests for `/v2/...` go to the service `canary` names; the rest pass through to v1.
fn http_section(server: &Pod, canary: &str) -> String {
    format!(
        "http:
  accessLog: true
  services:
    - {{name: v2, namespace: default, endpoints: ['{ip}:{V2_PORT}'], version: v2}}
  routes:
    - name: canary
      match: {{path: {{prefix: /v2/}}}}
      destinations: [{{service: {canary}}}]
",
        ip = server.ipv4()
    )
}

fn write_config(path: &std::path::Path, http: &str) {
    let text = format!("{}{http}", identity_config("cluster.local"));
    replace_file(path, &text).expect("install mesh config");
}

#[test]
fn captured_requests_are_routed_counted_and_survive_a_bad_reload() {
    let lab = RoutingLab::new();
    let n = 3;
    for _ in 0..n {
        assert!(lab.get(&lab.url("/v2/items")).starts_with("hello from v2"));
        assert!(lab.get(&lab.url("/")).starts_with("hello from v1"));
    }
    let to_v2 = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_service_name", "v2"),
        ("destination_version", "v2"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    lab.wait_for_metric("istio_requests_total", &to_v2, n);
    let passthrough = [
        ("destination_service_name", "unknown"),
        ("response_code", "200"),
    ];
    lab.wait_for_metric("istio_requests_total", &passthrough, n);
    let log = lab.logs();
    assert!(
        log.lines()
            .any(|l| l.contains("\"target\":\"access\"") && l.contains("\"route\":\"canary\"")),
        "no access line for the canary route:\n{log}"
    );

    // A route naming a service that does not exist: rejected, the old routes stay.
    write_config(&lab.config, &http_section(&lab.server, "v3"));
    lab.wait_for_metric(
        "sidecar_mesh_config_reloads_total",
        &[("result", "failure")],
        1,
    );
    assert!(lab.get(&lab.url("/v2/items")).starts_with("hello from v2"));
    let log = lab.logs();
    assert!(
        log.contains("destination service \\\"v3\\\" is not defined"),
        "the rejection and its reason are logged:\n{log}"
    );
}
