//! The sidecars' mesh config (docs/MESH_CONFIG.md, docs/ROUTING.md).
//!
//! Every sidecar gets one, so every scenario runs the same proxy configuration: the server port
//! is declared opaque TCP, so the proxies relay bytes as HAProxy does in H1 and the bench
//! measures the redirect; the HTTP-aware scenarios leave it undeclared, so the sidecar's
//! default (protocol detection, routing, request metrics, access log) runs as it does for
//! every user who declares nothing. The mTLS scenarios add a lab CA, one SPIFFE
//! identity per pod (`sidecar certs`): the client's proxy originates mTLS to the server pod,
//! whose inbound port accepts only mTLS from the client's identity.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::scenario::SERVER_PORT;

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "bench";

fn spiffe_id(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// The mesh config files of both pods.
pub struct MeshConfigs {
    pub client: PathBuf,
    pub server: PathBuf,
}

/// How the sidecars treat the server port.
#[derive(Clone, Copy)]
pub enum ServerPort {
    /// Declared `protocol: tcp`: relayed as opaque bytes, no detection.
    OpaqueTcp,
    /// Not declared: detected, and HTTP goes through the HTTP layer.
    Detected,
}

impl ServerPort {
    fn config(self) -> String {
        match self {
            ServerPort::OpaqueTcp => {
                format!("http:\n  ports:\n    - {{port: {SERVER_PORT}, protocol: tcp}}\n")
            }
            // An empty file is refused (a truncated write); an empty section is the default.
            ServerPort::Detected => "http: {}\n".to_owned(),
        }
    }
}

/// Plaintext: one config for both pods, with only the server port's protocol.
pub fn write_plaintext(dir: &Path, server_port: ServerPort) -> Result<MeshConfigs> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, server_port.config()).context("writing mesh.yaml")?;
    Ok(MeshConfigs {
        client: path.clone(),
        server: path,
    })
}

/// mTLS: issues the certificates into `dir` (readable by the proxy user) and writes both
/// configs.
pub fn write_mtls(
    sidecar: &Path,
    dir: &Path,
    server_ip: Ipv4Addr,
    proxy_id: u32,
    server_port: ServerPort,
) -> Result<MeshConfigs> {
    let ca = dir.join("ca");
    run_sidecar(
        sidecar,
        &["certs", "ca", "--trust-domain", TRUST_DOMAIN, "--out"],
        &ca,
    )?;
    let owner = format!("{proxy_id}:{proxy_id}");
    for pod in ["client", "server"] {
        let mut command = Command::new(sidecar);
        command
            .args(["certs", "workload", "--ns", NAMESPACE, "--sa", pod])
            .args(["--owner", &owner, "--ca"])
            .arg(&ca)
            .arg("--out")
            .arg(dir.join(pod));
        check(command.output()?, "sidecar certs workload")?;
    }
    let identity = format!(
        "{}trustDomain: {TRUST_DOMAIN}\nidentity:\n  certificateChain: cert-chain.pem\n  \
         privateKey: key.pem\n  trustBundle: root-cert.pem\n",
        server_port.config()
    );
    let client = format!(
        "{identity}workloads:\n  - name: server\n    addresses: [\"{server_ip}\"]\n    identities: [{}]\n",
        spiffe_id("server")
    );
    let server = format!(
        "{identity}inbound:\n  mode: STRICT\n  ports:\n    - port: {SERVER_PORT}\n      allow:\n        - principal: {}\n",
        spiffe_id("client")
    );
    let configs = MeshConfigs {
        client: dir.join("client/mesh.yaml"),
        server: dir.join("server/mesh.yaml"),
    };
    std::fs::write(&configs.client, client).context("writing the client's mesh.yaml")?;
    std::fs::write(&configs.server, server).context("writing the server's mesh.yaml")?;
    Ok(configs)
}

fn run_sidecar(sidecar: &Path, args: &[&str], last: &Path) -> Result<()> {
    let output = Command::new(sidecar).args(args).arg(last).output()?;
    check(output, &format!("sidecar {}", args.join(" ")))
}

fn check(output: std::process::Output, what: &str) -> Result<()> {
    if !output.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}
