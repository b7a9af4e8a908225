//! HTTPS for a legacy plain-HTTP app on the real kernel (run as root): the server pod's apps are
//! `python3 -m http.server --bind 127.0.0.1` (localhost only, plaintext), with eBPF capture and
//! the real proxy (UID 1337) terminating TLS on the pod IP with a certificate of its own
//! (`inbound.ports[].tls`) and handing the requests to 127.0.0.1 (`forwardTo`). An unmeshed pod
//! is the client: curl and openssl s_client, as anyone outside the mesh.
mod common;

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::chown,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{x509::*, *};
use rcgen::{ExtendedKeyUsagePurpose, KeyPair, SanType};
use sidecar_tests::{Lab, LabProcess, Pod, SidecarPod, require_root, wait_for_tcp};

/// Server TLS, no client certificate asked.
const SIMPLE_PORT: u16 = 8080;
/// Server TLS requiring a client certificate from the client CA.
const MUTUAL_PORT: u16 = 8081;
/// Server TLS with a bucket of 2 requests, refilled at 1 per second.
const LIMITED_PORT: u16 = 8082;
const SERVER_NAME: &str = "legacy.example";
const READY: Duration = Duration::from_secs(10);

/// Writes `contents` beside `path` and renames it into place, as Kubernetes updates a Secret.
fn replace(path: &Path, contents: &str) {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, contents).expect("write");
    chown(&temporary, Some(PROXY_ID), Some(PROXY_ID)).expect("chown");
    fs::rename(temporary, path).expect("rename");
}

struct LegacyLab {
    _lab: Lab,
    server: SidecarPod,
    outsider: Pod,
    dir: PathBuf,
    server_ca: (String, KeyPair),
    _apps: Vec<LabProcess>,
}

impl LegacyLab {
    fn new(test: &str) -> LegacyLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new(test).expect("lab");
        let server = lab.add_pod("server").expect("server pod");
        let outsider = lab.add_pod("outsider").expect("outsider pod");
        let dir = lab.dir().join("tls");
        let www = lab.dir().join("www");
        for dir in [&dir, &www] {
            fs::create_dir_all(dir).expect("create dir");
        }
        let apps: Vec<LabProcess> = [SIMPLE_PORT, MUTUAL_PORT, LIMITED_PORT]
            .into_iter()
            .map(|port| {
                let app = server
                    .command(SYSTEM_PYTHON)
                    .in_cgroup(server.cgroup_child("app").expect("app cgroup"))
                    .args(["-m", "http.server", "--bind", "127.0.0.1"])
                    .arg("--directory")
                    .arg(&www)
                    .arg(port.to_string())
                    .spawn()
                    .expect("python http.server");
                wait_for_tcp(&server, SocketAddr::from(([127, 0, 0, 1], port)), READY)
                    .expect("the legacy app listening on localhost");
                app
            })
            .collect();

        let server_ca = self_signed_ca("legacy server CA");
        let client_ca = self_signed_ca("legacy client CA");
        let (client, client_key) = leaf(
            &issuer(&client_ca),
            "partner",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for (name, contents) in [
            ("ca.pem", server_ca.0.as_str()),
            ("client-ca.pem", client_ca.0.as_str()),
            ("client.pem", client.as_str()),
            ("client-key.pem", client_key.as_str()),
        ] {
            replace(&dir.join(name), contents);
        }
        let ip: IpAddr = server.ipv4().into();
        let lab_server = LegacyServer { dir: &dir, ip };
        lab_server.issue(&server_ca);
        replace(
            &dir.join("mesh.yaml"),
            &format!(
                "inbound:
  ports:
    - port: {SIMPLE_PORT}
      tls: {{serverCertificate: tls.crt, privateKey: tls.key}}
      forwardTo: 127.0.0.1
    - port: {MUTUAL_PORT}
      tls: {{serverCertificate: tls.crt, privateKey: tls.key, caCertificates: client-ca.pem}}
      forwardTo: 127.0.0.1
    - port: {LIMITED_PORT}
      tls: {{serverCertificate: tls.crt, privateKey: tls.key}}
      forwardTo: 127.0.0.1
      rateLimit: {{requestsPerSecond: 1, burst: 2}}
"
            ),
        );

        let mut server = sidecar_pod(&lab, server);
        server
            .install_capture(CaptureMode::Ebpf, &[])
            .expect("sidecar init");
        let proxy = server
            .proxy_command()
            .args(["--log-format", "json", "--workload-name", "server"])
            .arg("--mesh-config")
            .arg(dir.join("mesh.yaml"));
        server.start_proxy(proxy).expect("proxy");
        LegacyLab {
            _lab: lab,
            server,
            outsider,
            dir,
            server_ca,
            _apps: apps,
        }
    }

    fn proxy(&self) -> &LabProcess {
        self.server.proxy().expect("proxy started")
    }

    fn arg(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// curl from the unmeshed pod to `https://<server ip>:port/`, with `extra` arguments, once
    /// per `times`: the status codes, one a line (000 for a failed connection).
    fn curl(&self, port: u16, extra: &[&str], times: usize) -> (bool, String) {
        let url = format!("https://{}:{port}/", self.server.ipv4());
        let out = self
            .outsider
            .command("curl")
            .args(["-sS", "--max-time", "8"])
            .args(["-w", "%{http_code}\n", "--cacert", &self.arg("ca.pem")])
            .args(extra)
            .args((0..times).flat_map(|_| ["-o", "/dev/null", url.as_str()]))
            .run()
            .expect("run curl");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// What `openssl s_client` shows of the served certificate: serial, subject, issuer.
    fn served_certificate(&self) -> String {
        let script = format!(
            "openssl s_client -connect {}:{SIMPLE_PORT} -servername {SERVER_NAME} </dev/null 2>/dev/null | openssl x509 -noout -serial -subject -issuer",
            self.server.ipv4()
        );
        let out = self
            .outsider
            .command("sh")
            .args(["-c", &script])
            .run()
            .expect("run openssl");
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            shown.contains("serial="),
            "no certificate: {shown}{}",
            self.logs()
        );
        shown
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        proxy_metric(&self.server, name, labels)
    }

    fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], expected: u64) {
        // The series may not exist until the first request it counts.
        wait_for_metric(
            &self.server,
            name,
            labels,
            MetricGoal::Exactly(expected),
            || self.logs(),
        );
    }

    fn logs(&self) -> String {
        format!("\nproxy:\n{}", self.server.proxy_logs())
    }
}

/// The server certificate files for the pod's IP and [`SERVER_NAME`].
struct LegacyServer<'a> {
    dir: &'a Path,
    ip: IpAddr,
}

impl LegacyServer<'_> {
    fn issue(&self, ca: &(String, KeyPair)) {
        let sans = vec![
            SanType::DnsName(SERVER_NAME.try_into().expect("DNS name")),
            SanType::IpAddress(self.ip),
        ];
        let (cert, key) = leaf(
            &issuer(ca),
            SERVER_NAME,
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        replace(&self.dir.join("tls.key"), &key);
        replace(&self.dir.join("tls.crt"), &cert);
    }
}

#[test]
fn https_reaches_a_localhost_only_app_through_the_proxy() {
    let lab = LegacyLab::new("server-tls");
    // Nothing listens on the pod IP: only the proxy's forwardTo reaches the app.
    let (ok, codes) = lab.curl(SIMPLE_PORT, &[], 2);
    assert!(ok && codes == "200\n200\n", "{codes}{}", lab.logs());
    let (ok, codes) = lab.curl(SIMPLE_PORT, &["--http1.1"], 1);
    assert!(ok && codes == "200\n", "{codes}");
    let served = lab.served_certificate();
    assert!(
        served.contains(&format!("subject=CN = {SERVER_NAME}"))
            && served.contains("issuer=CN = legacy server CA"),
        "{served}"
    );
    lab.wait_for_metric(
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("destination_workload", "server"),
            ("connection_security_policy", "none"),
            ("request_protocol", "http"),
            ("response_code", "200"),
        ],
        3,
    );
    // The proxy's connections to 127.0.0.1 were not captured back into its outbound side.
    let accepted = |listener| {
        lab.metric(
            "sidecar_listener_connections_accepted_total",
            &[("listener", listener)],
        )
    };
    assert!(accepted("inbound") >= 3, "{}", lab.logs());
    assert_eq!(
        lab.metric(
            "sidecar_listener_connections_accepted_total",
            &[("listener", "outbound")]
        ),
        0,
        "{}",
        lab.logs()
    );
    // Plaintext to the port is refused.
    let plaintext = lab
        .outsider
        .command("curl")
        .args(["-sS", "--max-time", "5", "-o", "/dev/null"])
        .arg(format!("http://{}:{SIMPLE_PORT}/", lab.server.ipv4()))
        .run()
        .expect("run curl");
    assert!(!plaintext.status.success(), "plaintext must be refused");

    // A replaced certificate serves the next connection; a bad one is rejected.
    let before = lab.served_certificate();
    LegacyServer {
        dir: &lab.dir,
        ip: lab.server.ipv4().into(),
    }
    .issue(&lab.server_ca);
    lab.wait_for_metric(
        "sidecar_certificate_reloads_total",
        &[("result", "success")],
        1,
    );
    let after = lab.served_certificate();
    let serial = |shown: &str| shown.lines().next().unwrap_or_default().to_owned();
    assert_ne!(
        serial(&before),
        serial(&after),
        "a new serial\n{before}\n{after}"
    );
    replace(&lab.dir.join("tls.crt"), "not a certificate\n");
    lab.wait_for_metric(
        "sidecar_certificate_reloads_total",
        &[("result", "failure")],
        1,
    );
    assert_eq!(serial(&lab.served_certificate()), serial(&after));
    let (ok, codes) = lab.curl(SIMPLE_PORT, &[], 1);
    assert!(
        ok && codes == "200\n",
        "the old certificate serves: {codes}"
    );
    assert!(
        lab.proxy()
            .stdout_text()
            .contains("no PEM certificate found"),
        "the reason is logged{}",
        lab.logs()
    );
}

#[test]
fn a_client_ca_port_refuses_clients_without_its_certificate_and_limits_are_enforced() {
    let lab = LegacyLab::new("server-tls-mutual");
    let (ok, codes) = lab.curl(MUTUAL_PORT, &[], 1);
    assert!(
        !ok,
        "a client without a certificate must be refused: {codes}"
    );
    let with_cert = [
        "--cert",
        &lab.arg("client.pem"),
        "--key",
        &lab.arg("client-key.pem"),
    ];
    let (ok, codes) = lab.curl(MUTUAL_PORT, &with_cert, 1);
    assert!(ok && codes == "200\n", "{codes}{}", lab.logs());

    // Five requests on one connection, the bucket holding two.
    let (_, codes) = lab.curl(LIMITED_PORT, &[], 5);
    let limited = codes.lines().filter(|code| *code == "429").count();
    let passed = codes.lines().filter(|code| *code == "200").count();
    assert!(
        limited >= 2 && passed >= 2 && limited + passed == 5,
        "{codes}{}",
        lab.logs()
    );
    lab.wait_for_metric(
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("response_code", "429"),
            ("response_flags", "RL"),
        ],
        limited as u64,
    );
}
