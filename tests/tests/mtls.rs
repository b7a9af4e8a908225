//! mTLS between two sidecars on the real kernel, under eBPF and under iptables capture (run
//! as root): a client pod and a server pod, each with capture installed by `sidecar init` and
//! the real proxy (UID 1337) using certificates from `sidecar certs`; a third pod without a
//! sidecar plays the plaintext outsider.
mod common;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::*;
use sidecar_tests::{
    ConnectReport, Lab, LabProcess, MeshPki, Pod, SidecarPod, identity_config, replace_file,
    require_root, wait_for_tcp,
};

const STRICT_PORT: u16 = 8080;
const PERMISSIVE_PORT: u16 = 9090;
/// STRICT, and only `sa/admin` may connect.
const ADMIN_ONLY_PORT: u16 = 7070;
/// An HTTP server, for the tests that start one.
const HTTP_PORT: u16 = 8081;
const TRUST_DOMAIN: &str = "cluster.local";
/// A partner mesh's trust domain, federated with ours.
const PARTNER_DOMAIN: &str = "partner.example";
const READY: Duration = Duration::from_secs(10);
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Capture {
    Ebpf,
    Iptables,
}

impl Capture {
    fn mode(self) -> CaptureMode {
        match self {
            Capture::Ebpf => CaptureMode::Ebpf,
            Capture::Iptables => CaptureMode::Iptables,
        }
    }
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
}

struct MtlsLab {
    lab: Lab,
    client: SidecarPod,
    server: SidecarPod,
    outsider: Pod,
    pki: PathBuf,
    certs: MeshPki,
    app: LabProcess,
    /// What the client's and the server's mesh configs say after the identity block.
    client_config: String,
    server_config: String,
}

impl MtlsLab {
    fn new(test: &str, capture: Capture) -> MtlsLab {
        require_root();
        sidecar_bin();
        let lab = Lab::new(test).expect("lab");
        let client = lab.add_pod("client").expect("client pod");
        let server = lab.add_pod("server").expect("server pod");
        let outsider = lab.add_pod("outsider").expect("outsider pod");
        let pki = lab.dir().join("pki");
        let app = server
            .command(labtool())
            .in_cgroup(server.cgroup_child("app").expect("app cgroup"))
            .args(["echo-server"])
            .args(
                [STRICT_PORT, PERMISSIVE_PORT, ADMIN_ONLY_PORT]
                    .iter()
                    .flat_map(|port| ["--listen".to_owned(), format!("[::]:{port}")]),
            )
            .spawn()
            .expect("server app");
        for port in [STRICT_PORT, PERMISSIVE_PORT, ADMIN_ONLY_PORT] {
            wait_for_tcp(&server, SocketAddr::new(server.ipv4().into(), port), READY)
                .expect("server app listening");
        }
        let client_config = format!(
            "workloads:\n  - name: server\n    addresses: [{}, '{}']\n    identities: [{}]\n",
            server.ipv4(),
            server.ipv6(),
            spiffe("server")
        );
        let server_config = format!(
            "inbound:\n  mode: STRICT\n  ports:\n    - port: {PERMISSIVE_PORT}\n      mode: PERMISSIVE\n    - port: {ADMIN_ONLY_PORT}\n      allow:\n        - principal: {}\n",
            spiffe("admin")
        );
        let certs = MeshPki::create(sidecar_bin(), &pki, Some(TRUST_DOMAIN)).expect("lab CA");
        let mut mesh = MtlsLab {
            client: sidecar_pod(&lab, client),
            server: sidecar_pod(&lab, server),
            lab,
            outsider,
            pki,
            certs,
            app,
            client_config,
            server_config,
        };

        mesh.certs(&["ca", "--out", &mesh.pki_path("other-ca")]);
        mesh.issue("client", "client", &[]);
        mesh.issue("server", "server", &[]);
        mesh.write_mesh_config("client", &mesh.client_config);
        mesh.write_mesh_config("server", &mesh.server_config);

        for pod in [&mesh.client, &mesh.server] {
            pod.install_capture(capture.mode(), &[])
                .expect("sidecar init");
        }
        let (client_dir, server_dir) = (mesh.pki.join("client"), mesh.pki.join("server"));
        start_proxy(&mut mesh.client, &client_dir);
        start_proxy(&mut mesh.server, &server_dir);
        mesh
    }

    fn pki_path(&self, name: &str) -> String {
        self.pki.join(name).to_string_lossy().into_owned()
    }

    fn certs(&self, args: &[&str]) {
        if let Err(error) = self.certs.certs(args) {
            panic!("{error:#}");
        }
    }

    /// (Re)issues the certificate of `sa` into `pki/<dir>/`, readable by the proxy.
    fn issue(&self, dir: &str, sa: &str, extra: &[&str]) {
        if let Err(error) = self.certs.issue(dir, "default", sa, extra) {
            panic!("{error:#}");
        }
    }

    fn write_mesh_config(&self, dir: &str, rest: &str) {
        self.write_federated_mesh_config(dir, TRUST_DOMAIN, &[], rest);
    }

    /// A mesh config in `pki/<dir>/` for `trust_domain`, trusting each `(trust domain, bundle
    /// file in that directory)` of `federated` for that trust domain.
    fn write_federated_mesh_config(
        &self,
        dir: &str,
        trust_domain: &str,
        federated: &[(&str, &str)],
        rest: &str,
    ) {
        let mut text = identity_config(trust_domain);
        if !federated.is_empty() {
            text.push_str("  federatedTrustBundles:\n");
            for (domain, file) in federated {
                text.push_str(&format!("    {domain}: {file}\n"));
            }
        }
        text.push_str(rest);
        replace_file(&self.pki.join(dir).join("mesh.yaml"), &text).expect("install mesh config");
    }

    /// `labtool connect` from `pod`'s app (captured, when the pod has a sidecar).
    fn connect(&self, from: &Pod, target: SocketAddr) -> Result<ConnectReport, String> {
        let out = from
            .command(labtool())
            .in_cgroup(from.cgroup_child("app").expect("app cgroup"))
            .args([
                "connect",
                &target.to_string(),
                "--payload-bytes",
                "4096",
                "--timeout-ms",
                "3000",
            ])
            .run()
            .map_err(|e| e.to_string())?;
        ConnectReport::from_output(&out).map_err(|e| format!("{e:#}"))
    }

    fn through_mesh(&self, target: SocketAddr) -> ConnectReport {
        let report = self
            .connect(&self.client, target)
            .unwrap_or_else(|e| panic!("{target} through the mesh: {e}\n{}", self.logs()));
        assert!(report.echo_ok);
        report
    }

    fn wait_for_metric(&self, pod: &Pod, name: &str, labels: &[(&str, &str)], at_least: u64) {
        wait_for_metric(pod, name, labels, MetricGoal::AtLeast(at_least), || {
            self.logs()
        });
    }

    fn failures(&self, pod: &Pod, direction: &str, reason: &str) -> u64 {
        proxy_metric(
            pod,
            &format!("sidecar_{direction}_failures_total"),
            &[("reason", reason)],
        )
    }

    /// Both proxies' logs, for failure messages.
    fn logs(&self) -> String {
        [&self.client, &self.server]
            .iter()
            .map(|pod| pod.proxy_logs())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// `labtool http-server` (HTTP/1.1 only) on the server pod's [`HTTP_PORT`], as its app.
    fn start_http_server(&self) -> LabProcess {
        let server = self
            .server
            .command(labtool())
            .in_cgroup(self.server.cgroup_child("app").expect("app cgroup"))
            .args(["http-server", "--listen", &format!("[::]:{HTTP_PORT}")])
            .args(["--name", "server"])
            .spawn()
            .expect("http server");
        let addr = SocketAddr::new(self.server.ipv4().into(), HTTP_PORT);
        wait_for_tcp(&self.server, addr, READY).expect("http server listening");
        server
    }

    /// The proxy of the client (0) or the server (1).
    fn proxy(&self, side: usize) -> &LabProcess {
        [&self.client, &self.server][side]
            .proxy()
            .expect("proxy started")
    }

    /// Re-issues a certificate in place and waits until `pod`'s proxy has reloaded it.
    fn rotate(&self, pod: &Pod, dir: &str, sa: &str, extra: &[&str]) {
        self.reloading(pod, "sidecar_certificate_reloads_total", || {
            self.issue(dir, sa, extra)
        });
    }

    /// Runs `change` and waits until `pod`'s proxy counts one more successful reload in
    /// `counter` (`sidecar_certificate_reloads_total` or `sidecar_mesh_config_reloads_total`).
    fn reloading(&self, pod: &Pod, counter: &str, change: impl FnOnce()) {
        let before = proxy_metric(pod, counter, &[("result", "success")]);
        change();
        self.wait_for_metric(pod, counter, &[("result", "success")], before + 1);
    }
}

/// The proxy as Kubernetes runs it: UID 1337, in the pod (its own container cgroup).
fn start_proxy(pod: &mut SidecarPod, dir: &Path) {
    let config = dir.join("mesh.yaml").to_string_lossy().into_owned();
    let name = pod.name().to_owned();
    let command = pod
        .proxy_command()
        .env("POD_NAMESPACE", "default")
        .args(["--log-format", "json", "--workload-name", &name])
        .args(["--mesh-config", &config]);
    pod.start_proxy(command).expect("proxy");
}

/// Records the server pod's side of its veth (`eth0`) while `work` runs.
fn capture_on_the_wire(
    pod: &Pod,
    lab: &Lab,
    name: &str,
    port: u16,
    work: impl FnOnce(),
) -> Vec<u8> {
    let file = lab.dir().join(format!("{name}.pcap"));
    let tcpdump = pod
        .command("tcpdump")
        .args(["-i", "eth0", "--immediate-mode", "-U", "-n", "-w"])
        .arg(&file)
        .args(["tcp", "port", &port.to_string()])
        .spawn()
        .expect("tcpdump (installed by `cargo xtask setup`)");
    // The pcap header is written once the capture is open.
    let deadline = Instant::now() + READY;
    while fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < 24 {
        assert!(
            Instant::now() < deadline,
            "tcpdump did not start:\n{}",
            tcpdump.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    work();
    std::thread::sleep(Duration::from_millis(300));
    tcpdump.stop(Duration::from_secs(2)).expect("stop tcpdump");
    fs::read(&file).expect("read the capture")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Client pod -> server pod through both sidecars: mTLS on the wire, identities in metrics and
/// logs, the app reached at its own pod IP; STRICT, PERMISSIVE and authorization at the server.
fn mesh_traffic_is_mutual_tls(capture: Capture, test: &str) {
    let mesh = MtlsLab::new(test, capture);
    let server_v4 = SocketAddr::new(mesh.server.ipv4().into(), STRICT_PORT);
    let server_v6 = SocketAddr::new(mesh.server.ipv6().into(), STRICT_PORT);

    // labtool's payload is a byte ramp: its first 32 bytes must never appear on the wire.
    let ramp: Vec<u8> = (0..32).collect();
    let mut report = None;
    let wire = capture_on_the_wire(&mesh.server, &mesh.lab, "mesh", STRICT_PORT, || {
        report = Some(mesh.through_mesh(server_v4));
    });
    let report = report.expect("connected");
    assert!(
        contains(&wire, b"sidecar-mesh/1"),
        "no mesh ClientHello on the wire"
    );
    assert!(
        !contains(&wire, &ramp),
        "the plaintext payload crossed the wire"
    );
    assert_eq!(
        canonical(report.server.local),
        server_v4,
        "the app sees the connection arrive at its own pod IP"
    );
    assert_eq!(
        report.server.peer.ip().to_canonical().to_string(),
        "127.0.0.6"
    );
    assert_eq!(
        report.peer, server_v4,
        "the client sees the address it dialled"
    );

    let report = mesh.through_mesh(server_v6);
    assert_eq!(canonical(report.server.local), server_v6);
    assert_eq!(
        report.server.peer.ip().to_string(),
        "::6",
        "a remote peer must not reach the app from the real localhost (::1)"
    );

    let client_id = spiffe("client");
    let server_id = spiffe("server");
    mesh.wait_for_metric(
        &mesh.client,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", &client_id),
            ("destination_principal", &server_id),
        ],
        2,
    );
    mesh.wait_for_metric(
        &mesh.server,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", &client_id),
            ("destination_principal", &server_id),
        ],
        2,
    );
    let server_log = mesh.proxy(1).stdout_text();
    assert!(
        server_log
            .lines()
            .any(|l| l.contains("connection complete") && l.contains(&client_id)),
        "no access log line naming the peer:\n{server_log}"
    );
    // sk_lookup keeps the original local address; REDIRECT leaves it to conntrack.
    let orig_dst_source = match capture {
        Capture::Ebpf => r#""orig_dst_source":"local_addr""#,
        Capture::Iptables => r#""orig_dst_source":"sockopt""#,
    };
    assert!(
        server_log
            .lines()
            .any(|l| l.contains(r#""direction":"inbound""#) && l.contains(orig_dst_source)),
        "inbound original destinations not from {orig_dst_source}:\n{server_log}"
    );

    // Plaintext from outside the mesh: refused on STRICT...
    let refused = mesh.connect(&mesh.outsider, server_v4);
    assert!(
        refused.is_err(),
        "plaintext reached a STRICT port: {refused:?}"
    );
    mesh.wait_for_metric(
        &mesh.server,
        "sidecar_inbound_failures_total",
        &[("reason", "plaintext_refused")],
        1,
    );
    // ...and accepted on PERMISSIVE, where it really is plaintext on the wire.
    let permissive = SocketAddr::new(mesh.server.ipv4().into(), PERMISSIVE_PORT);
    let wire = capture_on_the_wire(&mesh.server, &mesh.lab, "plain", PERMISSIVE_PORT, || {
        let report = mesh
            .connect(&mesh.outsider, permissive)
            .expect("plaintext to PERMISSIVE");
        assert!(report.echo_ok);
    });
    assert!(
        contains(&wire, &ramp),
        "the capture cannot see payloads at all"
    );
    mesh.through_mesh(permissive);
    mesh.wait_for_metric(
        &mesh.server,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "none"),
        ],
        1,
    );
    mesh.wait_for_metric(
        &mesh.server,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
        ],
        3,
    );

    // Only sa/admin may use this port.
    let admin_only = SocketAddr::new(mesh.server.ipv4().into(), ADMIN_ONLY_PORT);
    let denied = mesh.connect(&mesh.client, admin_only);
    assert!(
        denied.is_err(),
        "an unauthorized identity got through: {denied:?}"
    );
    mesh.wait_for_metric(
        &mesh.server,
        "sidecar_inbound_failures_total",
        &[("reason", "unauthorized")],
        1,
    );
    assert!(
        mesh.proxy(1)
            .stdout_text()
            .contains("no allow rule of the port matches"),
        "{}",
        mesh.logs()
    );
    let served = mesh
        .app
        .stdout_text()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count();
    assert_eq!(served, 4, "refused connections must not reach the app");
}

/// An established connection survives a rotation that new connections follow; expired,
/// wrong-CA and wrong-identity certificates are refused and counted.
fn certificates_rotate_and_bad_ones_are_refused(capture: Capture, test: &str) {
    let mesh = MtlsLab::new(test, capture);
    let server_v4 = SocketAddr::new(mesh.server.ipv4().into(), STRICT_PORT);

    // A long-lived connection from the client app: half of its request before the rotation,
    // the rest after.
    let go_on = mesh.lab.dir().join("rotated");
    let established = mesh
        .client
        .command("perl")
        .in_cgroup(mesh.client.cgroup_child("app").expect("app cgroup"))
        .args(["-e", LONG_LIVED_CLIENT])
        .arg(mesh.server.ipv4().to_string())
        .arg(STRICT_PORT.to_string())
        .arg(&go_on)
        .spawn()
        .expect("perl client");
    established
        .wait_for_stdout("connected", READY)
        .expect("long-lived connection up");

    mesh.rotate(&mesh.client, "client", "client-v2", &[]);
    mesh.through_mesh(server_v4);
    mesh.wait_for_metric(
        &mesh.server,
        "istio_tcp_connections_opened_total",
        &[("source_principal", &spiffe("client-v2"))],
        1,
    );
    fs::write(&go_on, b"").expect("signal the long-lived client");
    let status = established.wait(PATIENCE).expect("long-lived client done");
    let output = established.stdout_text();
    assert!(
        status.success() && output.contains("before-rotation;after-rotation"),
        "the established connection broke: {status}\n{output}{}\n{}",
        established.stderr_text(),
        mesh.logs()
    );

    let refused = |what: &str, side: &Pod, direction: &str, reason: &str| {
        let before = mesh.failures(side, direction, reason);
        let result = mesh.connect(&mesh.client, server_v4);
        assert!(result.is_err(), "{what} was accepted: {result:?}");
        mesh.wait_for_metric(
            side,
            &format!("sidecar_{direction}_failures_total"),
            &[("reason", reason)],
            before + 1,
        );
    };

    mesh.rotate(&mesh.client, "client", "client", &["--expired"]);
    refused(
        "an expired client certificate",
        &mesh.server,
        "inbound",
        "peer_cert_expired",
    );

    let other_ca = mesh.pki_path("other-ca");
    let bundle = mesh
        .pki
        .join("ca")
        .join("ca-cert.pem")
        .to_string_lossy()
        .into_owned();
    let before = proxy_metric(
        &mesh.client,
        "sidecar_certificate_reloads_total",
        &[("result", "success")],
    );
    mesh.certs(&[
        "workload",
        "--ca",
        &other_ca,
        "--ns",
        "default",
        "--sa",
        "client",
        "--out",
        &mesh.pki_path("client"),
        "--bundle",
        &bundle,
        "--owner",
        "1337:1337",
    ]);
    mesh.wait_for_metric(
        &mesh.client,
        "sidecar_certificate_reloads_total",
        &[("result", "success")],
        before + 1,
    );
    refused(
        "a client certificate from another CA",
        &mesh.server,
        "inbound",
        "peer_cert_unknown_ca",
    );

    mesh.rotate(&mesh.client, "client", "client", &[]);
    mesh.through_mesh(server_v4);

    mesh.rotate(&mesh.server, "server", "imposter", &[]);
    refused(
        "a server with the wrong identity",
        &mesh.client,
        "outbound",
        "peer_identity_mismatch",
    );
    let client_log = mesh.proxy(0).stdout_text();
    assert!(
        client_log.contains(&format!("the peer is {}", spiffe("imposter"))),
        "no clear log line for the wrong identity:\n{client_log}"
    );
}

/// A partner's CA, trusted for the partner's trust domain, can neither mint one of our identities
/// (refused inbound and outbound) nor is it needed for ours; it does vouch for its own.
fn a_partner_ca_is_trusted_for_its_trust_domain_only(capture: Capture, test: &str) {
    let mesh = MtlsLab::new(test, capture);
    let server_v4 = SocketAddr::new(mesh.server.ipv4().into(), STRICT_PORT);
    mesh.certs(&[
        "ca",
        "--out",
        &mesh.pki_path("partner-ca"),
        "--trust-domain",
        PARTNER_DOMAIN,
    ]);
    let partner_root = mesh.pki.join("partner-ca").join("ca-cert.pem");
    let our_root = mesh.pki.join("ca").join("ca-cert.pem");

    // Both pods federate with the partner: its root, for its trust domain.
    for (pod, dir, rest) in [
        (&mesh.client, "client", &mesh.client_config),
        (&mesh.server, "server", &mesh.server_config),
    ] {
        fs::copy(&partner_root, mesh.pki.join(dir).join("partner-root.pem"))
            .expect("copy the partner's root");
        mesh.reloading(pod, "sidecar_mesh_config_reloads_total", || {
            mesh.write_federated_mesh_config(
                dir,
                TRUST_DOMAIN,
                &[(PARTNER_DOMAIN, "partner-root.pem")],
                rest,
            );
        });
    }
    mesh.through_mesh(server_v4);

    // A certificate from the partner's CA in `pki/<dir>/` claiming our `sa`, with our root
    // as the bundle (the forger's proxy must trust us to get as far as the handshake).
    let our_root_path = our_root.to_string_lossy().into_owned();
    let forge = |pod: &Pod, dir: &str, sa: &str| {
        let out = mesh.pki_path(dir);
        let partner_ca = mesh.pki_path("partner-ca");
        mesh.reloading(pod, "sidecar_certificate_reloads_total", || {
            mesh.certs(&[
                "workload",
                "--ca",
                &partner_ca,
                "--trust-domain",
                TRUST_DOMAIN,
                "--ns",
                "default",
                "--sa",
                sa,
                "--out",
                &out,
                "--bundle",
                &our_root_path,
                "--owner",
                "1337:1337",
            ]);
        });
    };
    let refused = |what: &str, side: &Pod, direction: &str, forged: &str| {
        let before = mesh.failures(side, direction, "peer_cert_unknown_ca");
        let result = mesh.connect(&mesh.client, server_v4);
        assert!(result.is_err(), "{what} was accepted: {result:?}");
        mesh.wait_for_metric(
            side,
            &format!("sidecar_{direction}_failures_total"),
            &[("reason", "peer_cert_unknown_ca")],
            before + 1,
        );
        let reason = format!(
            "the peer claims {forged}, but its chain leads to no root of the trust bundle of {TRUST_DOMAIN}"
        );
        assert!(
            mesh.logs().contains(&reason),
            "no log line saying {reason:?}:\n{}",
            mesh.logs()
        );
    };

    // Inbound: the client presents a partner-made `sa/client`.
    forge(&mesh.client, "client", "client");
    refused(
        "a partner-made local identity (inbound)",
        &mesh.server,
        "inbound",
        &spiffe("client"),
    );
    mesh.rotate(&mesh.client, "client", "client", &[]);
    mesh.through_mesh(server_v4);

    // Outbound: the server presents a partner-made `sa/server`, the identity expected there.
    forge(&mesh.server, "server", "server");
    refused(
        "a partner-made local identity (outbound)",
        &mesh.client,
        "outbound",
        &spiffe("server"),
    );
    mesh.rotate(&mesh.server, "server", "server", &[]);
    mesh.through_mesh(server_v4);

    // A pod of the partner's mesh (the outsider, given a sidecar): its own identity, from its
    // CA, is accepted by our server, and it accepts our server's, from ours.
    let partner_id = format!("spiffe://{PARTNER_DOMAIN}/ns/default/sa/client");
    let partner_ca = mesh.pki_path("partner-ca");
    let partner_dir = mesh.pki_path("partner");
    mesh.certs(&[
        "workload",
        "--ca",
        &partner_ca,
        "--ns",
        "default",
        "--sa",
        "client",
        "--out",
        &partner_dir,
        "--owner",
        "1337:1337",
    ]);
    fs::copy(&our_root, mesh.pki.join("partner").join("our-root.pem")).expect("copy our root");
    mesh.write_federated_mesh_config(
        "partner",
        PARTNER_DOMAIN,
        &[(TRUST_DOMAIN, "our-root.pem")],
        &mesh.client_config,
    );
    let mut partner = sidecar_pod(&mesh.lab, mesh.outsider.clone());
    partner
        .install_capture(capture.mode(), &[])
        .expect("sidecar init");
    start_proxy(&mut partner, &mesh.pki.join("partner"));
    let report = mesh
        .connect(&mesh.outsider, server_v4)
        .unwrap_or_else(|error| {
            panic!(
                "the partner's workload was refused: {error}\n{}\n{}",
                partner.proxy_logs(),
                mesh.logs()
            )
        });
    assert!(report.echo_ok);
    mesh.wait_for_metric(
        &mesh.server,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", &partner_id),
            ("destination_principal", &spiffe("server")),
        ],
        1,
    );
}

/// The client proxy pools its upstream HTTP connections across the app's requests; a reload of
/// its mesh config decides how the next request goes: a destination newly listed in
/// `workloads` gets mTLS at once (the pooled plaintext connection is closed, not reused), and
/// one removed has its pooled mTLS connection closed at the reload.
fn pooled_connections_follow_mesh_config_reloads(capture: Capture, test: &str) {
    let mesh = MtlsLab::new(test, capture);
    let _http_server = mesh.start_http_server();
    // The HTTP port takes plaintext too, so that both kinds of connection reach the app.
    let server_config = format!(
        "{}    - port: {HTTP_PORT}\n      mode: PERMISSIVE\n",
        mesh.server_config
    );
    mesh.reloading(&mesh.server, "sidecar_mesh_config_reloads_total", || {
        mesh.write_mesh_config("server", &server_config);
    });
    let list_server = |listed: bool| {
        let workloads = if listed { &mesh.client_config } else { "" };
        mesh.reloading(&mesh.client, "sidecar_mesh_config_reloads_total", || {
            mesh.write_mesh_config("client", workloads);
        });
    };
    let url = format!("http://{}:{HTTP_PORT}/", mesh.server.ipv4());
    let get = || {
        let out = mesh
            .client
            .command(labtool())
            .in_cgroup(mesh.client.cgroup_child("app").expect("app cgroup"))
            .args(["http-get", &url])
            .run()
            .expect("run labtool http-get");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello from"),
            "GET {url}:\n{}\n{}",
            text(&out),
            mesh.logs()
        );
    };
    // Waits until the server proxy's `name`{`labels`} is exactly `count`.
    let wait_for = |name: &str, labels: &[(&str, &str)], count: u64| {
        let deadline = Instant::now() + PATIENCE;
        while proxy_metric_or_zero(&mesh.server, name, labels) != count {
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} never became {count}\n{}",
                mesh.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The requests the server served over connections of `policy` (HTTP connections carry
    // request metrics, not TCP ones), and the connections it holds open: the client's pooled
    // ones.
    let served = |policy: &str, count: u64| {
        let labels = [
            ("reporter", "destination"),
            ("connection_security_policy", policy),
        ];
        wait_for("istio_requests_total", &labels, count);
    };
    let open = |count: u64| {
        wait_for(
            "sidecar_listener_connections",
            &[("listener", "inbound")],
            count,
        );
    };

    list_server(false);
    get();
    served("none", 1);
    open(1);

    // The pooled plaintext connection is closed, not reused: the mTLS one is the only one left.
    list_server(true);
    get();
    served("mutual_tls", 1);
    open(1);
    served("none", 1);
    mesh.wait_for_metric(
        &mesh.client,
        "istio_requests_total",
        &[
            ("connection_security_policy", "mutual_tls"),
            ("destination_principal", &spiffe("server")),
        ],
        1,
    );

    // The pooled mTLS connection is closed by the reload itself.
    list_server(false);
    open(0);
    get();
    served("none", 2);
    served("mutual_tls", 1);
}

/// The client app's HTTP/1.1 requests in flight at once, each on a connection of its own,
/// share one mTLS connection between the two sidecars (HTTP/2, `h2UpgradePolicy`), and reach
/// the server app (which speaks HTTP/1.1 only) as HTTP/1.1.
fn http1_requests_in_flight_share_one_mtls_connection(capture: Capture, test: &str) {
    const IN_FLIGHT: usize = 8;
    let mesh = MtlsLab::new(test, capture);
    let _http_server = mesh.start_http_server();
    // Each answer takes 500 ms, so that all of them are in flight together.
    let url = format!("http://{}:{HTTP_PORT}/delay/500", mesh.server.ipv4());
    let get = || {
        mesh.client
            .command(labtool())
            .in_cgroup(mesh.client.cgroup_child("app").expect("app cgroup"))
            .args(["http-get", &url])
            .run()
            .expect("run labtool http-get")
    };
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let gets: Vec<_> = (0..IN_FLIGHT).map(|_| scope.spawn(get)).collect();
        gets.into_iter()
            .map(|get| get.join().expect("http-get thread"))
            .collect()
    });
    for out in outputs {
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello from"),
            "GET {url}:\n{}\n{}",
            text(&out),
            mesh.logs()
        );
    }
    let served = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
        ("response_code", "200"),
    ];
    mesh.wait_for_metric(
        &mesh.server,
        "istio_requests_total",
        &served,
        IN_FLIGHT as u64,
    );
    let handshakes = proxy_metric(&mesh.server, "sidecar_inbound_tls_handshakes_total", &[]);
    assert_eq!(
        handshakes,
        1,
        "one mTLS connection for all {IN_FLIGHT} requests\n{}",
        mesh.logs()
    );
}

/// Connects, sends half a request, waits for the file named by the third argument, sends the
/// rest, half-closes and prints the echo.
const LONG_LIVED_CLIENT: &str = r#"
use IO::Socket::INET;
$| = 1;
my ($host, $port, $go_on) = @ARGV;
my $s = IO::Socket::INET->new(PeerAddr => $host, PeerPort => $port, Proto => 'tcp')
    or die "connect: $!";
$s->autoflush(1);
print $s "before-rotation;";
print "connected\n";
select(undef, undef, undef, 0.05) until -e $go_on;
print $s "after-rotation";
$s->shutdown(1);
local $/;
my $reply = <$s>;
print "reply: $reply\n";
"#;

#[test]
fn ebpf_mesh_traffic_is_mutual_tls() {
    mesh_traffic_is_mutual_tls(Capture::Ebpf, "mtls-ebpf");
}

#[test]
fn iptables_mesh_traffic_is_mutual_tls() {
    mesh_traffic_is_mutual_tls(Capture::Iptables, "mtls-ipt");
}

#[test]
fn ebpf_certificates_rotate_and_bad_ones_are_refused() {
    certificates_rotate_and_bad_ones_are_refused(Capture::Ebpf, "certs-ebpf");
}

#[test]
fn iptables_certificates_rotate_and_bad_ones_are_refused() {
    certificates_rotate_and_bad_ones_are_refused(Capture::Iptables, "certs-ipt");
}

#[test]
fn ebpf_a_partner_ca_is_trusted_for_its_trust_domain_only() {
    a_partner_ca_is_trusted_for_its_trust_domain_only(Capture::Ebpf, "partner-ebpf");
}

#[test]
fn ebpf_http1_requests_in_flight_share_one_mtls_connection() {
    http1_requests_in_flight_share_one_mtls_connection(Capture::Ebpf, "mtls-h2-ebpf");
}

#[test]
fn ebpf_pooled_connections_follow_mesh_config_reloads() {
    pooled_connections_follow_mesh_config_reloads(Capture::Ebpf, "pool-ebpf");
}
