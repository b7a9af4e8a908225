//! Kubelet probes under STRICT mTLS, end to end (root, real kernel): `sidecar inject` rewrites
//! an app's httpGet, tcpSocket and grpc probes to the proxy's `:15020/app-health/...`, the proxy
//! (given the originals by the injected environment variable) performs them against the app,
//! and a "kubelet" in another pod, with no mesh certificate, gets each probe's verdict while
//! its plaintext to the app's own port is refused.
mod common;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use common::*;
use sidecar_tests::{
    Lab, LabProcess, MeshPki, Pod, SidecarPod, identity_config, require_root,
    tools::http::HttpResponse, wait_for_tcp,
};

const READY: Duration = Duration::from_secs(10);

/// Two app containers: `web`'s probes pass, `broken`'s fail (404, closed port, NOT_SERVING).
const POD: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: probed
spec:
  containers:
    - name: web
      image: app
      ports: [{name: http, containerPort: 8080}]
      readinessProbe: {httpGet: {path: /, port: http}}
      livenessProbe: {tcpSocket: {port: 8080}}
      startupProbe: {grpc: {port: 9090}}
    - name: broken
      image: app
      readinessProbe: {httpGet: {path: /missing, port: 8080}, timeoutSeconds: 2}
      livenessProbe: {tcpSocket: {port: 7070}}
      startupProbe: {grpc: {port: 9091}}
";

/// The proxy container's `SIDECAR_APP_PROBERS`, as `sidecar inject` writes it.
fn injected_probers() -> String {
    let mut inject = std::process::Command::new(sidecar_bin())
        .arg("inject")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sidecar inject");
    use std::io::Write;
    inject
        .stdin
        .take()
        .unwrap()
        .write_all(POD.as_bytes())
        .unwrap();
    let out = inject.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let pod: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let proxy = pod["spec"]["initContainers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sidecar-proxy")
        .expect("the proxy container");
    let variable = proxy["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "SIDECAR_APP_PROBERS")
        .expect("SIDECAR_APP_PROBERS in the proxy's env");
    variable["value"].as_str().unwrap().to_owned()
}

struct ProbeLab {
    lab: Lab,
    server: SidecarPod,
    kubelet: Pod,
    _apps: Vec<LabProcess>,
}

impl ProbeLab {
    fn new() -> ProbeLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new("app-probes").expect("lab");
        let server = lab.add_pod("server").expect("server pod");
        let kubelet = lab.add_pod("kubelet").expect("kubelet pod");
        let app_cgroup = server.cgroup_child("app").unwrap();
        let web = server
            .command("python3")
            .in_cgroup(app_cgroup.clone())
            .args(["-m", "http.server", "8080", "--bind", "::", "--directory"])
            .arg(lab.dir())
            .spawn()
            .expect("web app");
        let grpc = server
            .command(labtool())
            .in_cgroup(app_cgroup.clone())
            .args(["grpc-health-server", "--listen", "[::]:9090"])
            .spawn()
            .expect("grpc app");
        let grpc_down = server
            .command(labtool())
            .in_cgroup(app_cgroup)
            .args([
                "grpc-health-server",
                "--listen",
                "[::]:9091",
                "--not-serving",
            ])
            .spawn()
            .expect("grpc app, not serving");
        for port in [8080, 9090, 9091] {
            wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), port), READY)
                .expect("app listening");
        }

        let pki = MeshPki::create(sidecar_bin(), lab.dir().join("pki"), Some("cluster.local"))
            .expect("lab CA");
        let config = pki
            .issue("server", "default", "server", &[])
            .expect("the server's certificate")
            .join("mesh.yaml");
        let text = format!(
            "{}inbound:\n  mode: STRICT\n",
            identity_config("cluster.local")
        );
        std::fs::write(&config, text).unwrap();

        let mut server = sidecar_pod(&lab, server);
        server
            .install_capture(CaptureMode::Ebpf, &[])
            .expect("init");
        let proxy = server
            .proxy_command()
            .env("SIDECAR_APP_PROBERS", injected_probers())
            .args(["--workload-name", "server", "--metrics-addr", "[::]:15020"])
            .args(["--mesh-config", &config.to_string_lossy()]);
        server.start_proxy(proxy).expect("proxy");
        ProbeLab {
            lab,
            server,
            kubelet,
            _apps: vec![web, grpc, grpc_down],
        }
    }

    /// The kubelet's GET from its own pod (no sidecar, no certificate).
    fn probe(&self, host: &str, path: &str) -> HttpResponse {
        let url = format!("http://{host}:15020{path}");
        let out = self
            .kubelet
            .command(labtool())
            .args(["http-get", &url])
            .run()
            .unwrap();
        assert!(out.status.success(), "{url}: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

#[test]
fn kubelet_probes_pass_under_strict_through_the_proxy() {
    let mesh = ProbeLab::new();
    let v4 = mesh.server.ipv4().to_string();
    let v6 = format!("[{}]", mesh.server.ipv6());
    for (host, path) in [
        (&v4, "/app-health/web/readyz"),
        (&v4, "/app-health/web/livez"),
        (&v4, "/app-health/web/startupz"),
        (&v6, "/app-health/web/readyz"),
    ] {
        let response = mesh.probe(host, path);
        assert_eq!(
            response.status,
            200,
            "{host}{path}: {response:?}\n{}",
            mesh.server.proxy().expect("proxy started").stdout_text()
        );
    }
    for (path, reason) in [
        ("/app-health/broken/readyz", "404"),
        ("/app-health/broken/livez", "7070"),
        ("/app-health/broken/startupz", "not SERVING"),
    ] {
        let response = mesh.probe(&v4, path);
        assert_eq!(response.status, 503, "{path}: {response:?}");
        assert!(response.body.contains(reason), "{path}: {response:?}");
    }
    assert_eq!(mesh.probe(&v4, "/app-health/nobody/livez").status, 404);

    // The kubelet's own plaintext to the app's port is refused: STRICT holds.
    let out = mesh
        .kubelet
        .command(labtool())
        .args([
            "http-get",
            &format!("http://{v4}:8080/"),
            "--timeout-ms",
            "2000",
        ])
        .run()
        .unwrap();
    assert!(
        !out.status.success(),
        "plaintext reached a STRICT port: {}",
        text(&out)
    );
    drop(mesh.lab);
}
