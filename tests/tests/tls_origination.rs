//! TLS origination by the real proxy on the real kernel (run as root). The app of a captured pod
//! runs `curl http://<server>:80/`: plaintext HTTP. The proxy (UID 1337, eBPF capture) sends it
//! as HTTPS to port 443 of the server pod, where Python's `ssl` module serves the partner's
//! certificate and reports what its TLS connection showed; port 80 there answers plaintext, so
//! an answer from it would be a request that went out unencrypted. A server the proxy cannot
//! verify (another CA, another name) gets no request: the app gets 503 with flag UF, the
//! failure is counted and its reason logged.
mod common;

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::unix::fs::chown,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{x509::*, *};
use rcgen::{ExtendedKeyUsagePurpose, Issuer, SanType};
use sidecar_tests::{Lab, LabProcess, Pod, SidecarPod, replace_file, require_root, wait_for_tcp};

const HTTPS_PORT: u16 = 443;
const APP_PORT: u16 = 80;
const PARTNER_HOST: &str = "api.partner";
const READY: Duration = Duration::from_secs(10);

/// An HTTPS server answering each GET with what its connection showed, as JSON; each
/// handshake (or failed one) is logged. A client certificate is asked for, and verified
/// against the CA given, but not required.
const HTTPS_SERVER: &str = r#"
import http.server, json, ssl, sys

cert, key, client_ca, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.load_verify_locations(client_ca)
context.verify_mode = ssl.CERT_OPTIONAL
context.set_alpn_protocols(["http/1.1"])

def remember_sni(connection, name, _context):
    connection.sni = name

context.sni_callback = remember_sni

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        tls = self.connection
        client = tls.getpeercert() or {}
        subject = dict(pair for rdn in client.get("subject", ()) for pair in rdn)
        body = json.dumps({
            "tls": tls.version(),
            "sni": getattr(tls, "sni", None),
            "alpn": tls.selected_alpn_protocol(),
            "client": subject.get("commonName"),
            "path": self.path,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        print("request", format % args, flush=True)

class Server(http.server.ThreadingHTTPServer):
    # The handshake in the connection's own thread: a failing client holds up no one.
    def finish_request(self, request, client_address):
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            print("handshake failed:", error, flush=True)
            return
        print("handshake", tls.version(), "sni", getattr(tls, "sni", None), flush=True)
        self.RequestHandlerClass(tls, client_address, self)

print("listening", port, flush=True)
Server(("0.0.0.0", port), Handler).serve_forever()
"#;

/// The partner's PKI, written as PEM files in one directory.
struct PartnerPki {
    dir: PathBuf,
}

impl PartnerPki {
    /// `partner-ca.pem` (which signs the server's and our client certificate), `server.pem`
    /// and `server-key.pem` for `api.partner` and `server_ip`, `client.pem` and
    /// `client-key.pem` (ours, for MUTUAL; readable by the proxy's user), and
    /// `other-ca.pem`, a CA that signed nothing here.
    fn write(dir: &Path, server_ip: IpAddr) -> PartnerPki {
        fs::create_dir_all(dir).expect("pki dir");
        let (ca_pem, ca_key) = self_signed_ca("partner CA");
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
        let server_sans = vec![
            SanType::DnsName(PARTNER_HOST.try_into().expect("DNS name")),
            SanType::IpAddress(server_ip),
        ];
        let (server, server_key) = leaf(
            &issuer,
            PARTNER_HOST,
            server_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(
            &issuer,
            "sidecar-client",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (other_ca, _) = self_signed_ca("another CA");
        let pki = PartnerPki {
            dir: dir.to_owned(),
        };
        for (name, contents) in [
            ("partner-ca.pem", &ca_pem),
            ("server.pem", &server),
            ("server-key.pem", &server_key),
            ("client.pem", &client),
            ("client-key.pem", &client_key),
            ("other-ca.pem", &other_ca),
        ] {
            fs::write(pki.path(name), contents).expect("write PEM");
        }
        chown(pki.path("client-key.pem"), Some(PROXY_ID), Some(PROXY_ID)).expect("chown key");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

/// The partner service as the app knows it: `api.partner` at the server pod's address, port
/// 80, sent to 443 with `tls` (YAML, one flow mapping).
fn partner_config(server: &Pod, tls: &str) -> String {
    format!(
        "http:
  accessLog: true
  services:
    - name: partner-api
      hosts: [{PARTNER_HOST}]
      addresses: [{ip}]
      ports: [{APP_PORT}]
      targetPort: {HTTPS_PORT}
      tls: {tls}
",
        ip = server.ipv4()
    )
}

struct OriginationLab {
    _lab: Lab,
    client: SidecarPod,
    server: Pod,
    pki: PartnerPki,
    config: PathBuf,
    https: LabProcess,
    _plaintext: LabProcess,
}

impl OriginationLab {
    /// Two pods: the server with the HTTPS server on 443 and a plaintext one on 80; the client
    /// with eBPF capture. The proxy is not started yet.
    fn new(test: &str) -> OriginationLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new(test).expect("lab");
        let client = lab.add_pod("client").expect("client pod");
        let server = lab.add_pod("server").expect("server pod");
        let pki = PartnerPki::write(&lab.dir().join("partner"), server.ipv4().into());
        let https = server
            .command(SYSTEM_PYTHON)
            .args(["-c", HTTPS_SERVER])
            .args([
                pki.arg("server.pem"),
                pki.arg("server-key.pem"),
                pki.arg("partner-ca.pem"),
            ])
            .arg(HTTPS_PORT.to_string())
            .spawn()
            .expect("python HTTPS server");
        https
            .wait_for_stdout("listening", READY)
            .expect("HTTPS server started");
        let plaintext = server
            .command(labtool())
            .args(["http-server", "--listen", "[::]:80", "--name", "plaintext"])
            .spawn()
            .expect("plaintext HTTP server");
        for port in [HTTPS_PORT, APP_PORT] {
            wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), port), READY)
                .expect("server listening");
        }

        let client = sidecar_pod(&lab, client);
        client
            .install_capture(CaptureMode::Ebpf, &[])
            .expect("sidecar init");
        let config = pki.path("mesh.yaml");
        OriginationLab {
            _lab: lab,
            client,
            server,
            pki,
            config,
            https,
            _plaintext: plaintext,
        }
    }

    /// Starts the proxy (UID 1337, in the pod) with `config` as its mesh config, and `env`.
    fn start_proxy(&mut self, config: &str, env: &[(&str, &str)]) {
        self.write_config(config);
        let mut command = self.client.proxy_command();
        for (key, value) in env {
            command = command.env(key, value);
        }
        let command = command
            .args(["--log-format", "json", "--workload-name", "client"])
            .args(["--mesh-config", &self.config.to_string_lossy()]);
        self.client.start_proxy(command).expect("proxy");
    }

    fn write_config(&self, text: &str) {
        replace_file(&self.config, text).expect("install mesh config");
    }

    /// The app (its cgroup) runs `curl http://<server ip>:80<path>`: the status and the body.
    fn app_get(&self, path: &str) -> (String, String) {
        let url = format!("http://{}:{APP_PORT}{path}", self.server.ipv4());
        let out = self
            .client
            .command("curl")
            .in_cgroup(self.client.app_cgroup().expect("app cgroup"))
            .args(["-sS", "--max-time", "8", "-w", "\n%{http_code}"])
            .arg(&url)
            .run()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (status.trim().to_owned(), body.to_owned())
    }

    /// `app_get`, expecting 200 and the HTTPS server's JSON report.
    fn app_get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.app_get(path);
        assert_eq!(status, "200", "GET {path}: {body}\n{}", self.logs());
        serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("not the HTTPS server's JSON ({error}): {body}"))
    }

    fn wait_for_metric(&self, name: &str, labels: &[(&str, &str)], expected: u64) {
        // The series may not exist until the first request it counts.
        wait_for_metric(
            &self.client,
            name,
            labels,
            MetricGoal::Exactly(expected),
            || self.logs(),
        );
    }

    /// Rewrites the mesh config and waits until the proxy took it (`reloads` successes).
    fn reload(&self, config: &str, reloads: u64) {
        self.write_config(config);
        self.wait_for_metric(
            "sidecar_mesh_config_reloads_total",
            &[("result", "success")],
            reloads,
        );
    }

    fn logs(&self) -> String {
        assert!(self.client.proxy().is_some(), "proxy started");
        format!(
            "proxy:\n{}\nHTTPS server:\n{}{}",
            self.client.proxy_logs(),
            self.https.stdout_text(),
            self.https.stderr_text()
        )
    }

    /// The proxy's access lines for GET requests, once one satisfies `wanted` (or after 5 s).
    fn access_lines_once(
        &self,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let is_get = |line: &serde_json::Value| line["fields"]["method"] == "GET";
        self.client
            .wait_for_access_line(|line| is_get(line) && wanted(line), Duration::from_secs(5))
            .into_iter()
            .filter(is_get)
            .collect()
    }
}

#[test]
fn the_apps_plaintext_request_leaves_as_verified_https_on_443() {
    let mut lab = OriginationLab::new("tls-origination");
    // The server is TLS only: a plaintext request to 443, from outside the capture, fails.
    let direct = lab
        .server
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{}:{HTTPS_PORT}/", lab.server.ipv4()))
        .run()
        .expect("run curl");
    assert!(
        !direct.status.success(),
        "plaintext to 443 must fail:\n{}",
        text(&direct)
    );

    // SIMPLE with the system's roots, which here are the partner's CA alone.
    let ca = lab.pki.arg("partner-ca.pem");
    let simple = partner_config(&lab.server, "{mode: SIMPLE}");
    lab.start_proxy(&simple, &[("SSL_CERT_FILE", &ca)]);
    let seen = lab.app_get_json("/hello");
    assert_eq!(seen["tls"], "TLSv1.3", "{seen}");
    assert_eq!(seen["sni"], PARTNER_HOST, "the service's host is the SNI");
    assert_eq!(seen["alpn"], "http/1.1");
    assert_eq!(seen["client"], serde_json::Value::Null);
    assert_eq!(seen["path"], "/hello");
    assert!(
        lab.https
            .stdout_text()
            .contains("handshake TLSv1.3 sni api.partner"),
        "the server logs the proxy's TLS connection\n{}",
        lab.logs()
    );
    lab.wait_for_metric(
        "istio_requests_total",
        &[
            ("destination_service_name", "partner-api"),
            ("response_code", "200"),
            ("response_flags", "-"),
        ],
        1,
    );
    let upstream = format!("{}:{HTTPS_PORT}", lab.server.ipv4());
    let names_upstream = |line: &serde_json::Value| line["fields"]["upstream"] == upstream.as_str();
    let access = lab.access_lines_once(names_upstream);
    assert!(
        access.iter().any(names_upstream),
        "the access line names the rewritten port: {access:?}"
    );

    // MUTUAL: the server sees our client certificate.
    let mutual = partner_config(
        &lab.server,
        &format!(
            "{{mode: MUTUAL, caCertificates: {ca}, clientCertificate: client.pem, privateKey: client-key.pem}}"
        ),
    );
    lab.reload(&mutual, 1);
    let seen = lab.app_get_json("/mutual");
    assert_eq!(seen["client"], "sidecar-client", "{seen}\n{}", lab.logs());
}

#[test]
fn a_server_that_fails_verification_gets_503_uf_and_never_plaintext() {
    let mut lab = OriginationLab::new("tls-origination-failures");
    let good = partner_config(
        &lab.server,
        "{mode: SIMPLE, caCertificates: partner-ca.pem}",
    );
    lab.start_proxy(&good, &[]);
    assert_eq!(lab.app_get_json("/")["sni"], PARTNER_HOST);

    // A config naming a CA bundle that is not there is rejected; the one in force stays.
    let missing = partner_config(&lab.server, "{mode: SIMPLE, caCertificates: missing.pem}");
    lab.write_config(&missing);
    lab.wait_for_metric(
        "sidecar_certificate_reloads_total",
        &[("result", "failure")],
        1,
    );
    assert_eq!(lab.app_get_json("/")["tls"], "TLSv1.3");
    assert!(
        lab.logs().contains("missing.pem: No such file"),
        "the rejection says why\n{}",
        lab.logs()
    );

    let cases = [
        (
            "{mode: SIMPLE, caCertificates: other-ca.pem}",
            "peer_cert_unknown_ca",
        ),
        (
            "{mode: SIMPLE, caCertificates: partner-ca.pem, sni: wrong.partner}",
            "peer_identity_mismatch",
        ),
    ];
    for (reloads, (tls, reason)) in (1..).zip(cases) {
        lab.reload(&partner_config(&lab.server, tls), reloads);
        let requests_before = lab.https.stdout_text().matches("request ").count();
        let (status, body) = lab.app_get("/");
        assert_eq!(status, "503", "{tls}: {body}\n{}", lab.logs());
        assert_eq!(
            body, "upstream connect failure\n",
            "not the plaintext port's answer"
        );
        lab.wait_for_metric(
            "sidecar_tls_origination_failures_total",
            &[
                ("destination_service_name", "partner-api"),
                ("reason", reason),
            ],
            1,
        );
        lab.wait_for_metric(
            "istio_requests_total",
            &[
                ("destination_service_name", "partner-api"),
                ("response_code", "503"),
                ("response_flags", "UF"),
            ],
            reloads,
        );
        let failed_for_reason = |line: &serde_json::Value| {
            let fields = &line["fields"];
            fields["response_flags"] == "UF"
                && fields["upstream_transport_failure_reason"] == reason
        };
        let access = lab.access_lines_once(failed_for_reason);
        assert!(
            access.iter().any(failed_for_reason),
            "an access line with UF and {reason}: {access:?}"
        );
        assert_eq!(
            lab.https.stdout_text().matches("request ").count(),
            requests_before,
            "no request reached the server"
        );
    }
}
