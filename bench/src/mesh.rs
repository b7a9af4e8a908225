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
};

use anyhow::{Context, Result};
use sidecar_tests::{MeshPki, identity_config};

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
    server_port: ServerPort,
) -> Result<MeshConfigs> {
    let pki = MeshPki::create(sidecar, dir, Some(TRUST_DOMAIN))?;
    for pod in ["client", "server"] {
        pki.issue(pod, NAMESPACE, pod, &[])?;
    }
    let identity = format!("{}{}", server_port.config(), identity_config(TRUST_DOMAIN));
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
