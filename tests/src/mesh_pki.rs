//! Mesh certificates for lab pods, issued by the real `sidecar certs`: a lab CA in `<dir>/ca/`
//! and one SPIFFE identity per workload in `<dir>/<name>/` (`cert-chain.pem`, `key.pem`,
//! `root-cert.pem`, readable by the proxy's user), with the mesh config that names them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::sidecar_pod::PROXY_ID;

/// The `identity` block of a mesh config (docs/MESH_CONFIG.md) naming the files `sidecar certs
/// workload` writes, for `trust_domain`.
pub fn identity_config(trust_domain: &str) -> String {
    format!(
        "trustDomain: {trust_domain}\nidentity:\n  certificateChain: cert-chain.pem\n  \
         privateKey: key.pem\n  trustBundle: root-cert.pem\n"
    )
}

/// Writes `text` beside `path` and renames it into place, as Kubernetes updates a ConfigMap:
/// a watching proxy never reads half a file.
pub fn replace_file(path: &Path, text: &str) -> Result<()> {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, text).with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("installing {}", path.display()))
}

/// A lab CA and the workload certificates it issued, in one directory.
pub struct MeshPki {
    sidecar: PathBuf,
    dir: PathBuf,
}

impl MeshPki {
    /// `sidecar certs ca --out <dir>/ca [--trust-domain <trust_domain>]` (the CLI's default
    /// trust domain, cluster.local, when None).
    pub fn create(
        sidecar: impl Into<PathBuf>,
        dir: impl Into<PathBuf>,
        trust_domain: Option<&str>,
    ) -> Result<MeshPki> {
        let pki = MeshPki {
            sidecar: sidecar.into(),
            dir: dir.into(),
        };
        let ca = pki.path("ca");
        let mut args = vec!["ca", "--out", &ca];
        if let Some(trust_domain) = trust_domain {
            args.extend(["--trust-domain", trust_domain]);
        }
        pki.certs(&args)?;
        Ok(pki)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/<name>` as an argument.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// `sidecar certs ARGS`, failing with its output unless it succeeds.
    pub fn certs(&self, args: &[&str]) -> Result<()> {
        let output = Command::new(&self.sidecar)
            .arg("certs")
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.sidecar.display()))?;
        ensure!(
            output.status.success(),
            "sidecar certs {} failed with {}\nstdout: {}\nstderr: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout).trim_end(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
        Ok(())
    }

    /// (Re)issues the identity `ns/<namespace>/sa/<service_account>` from this CA into
    /// `<dir>/<out>/`, owned by the proxy's user, with `extra` options (`--expired`,
    /// `--bundle`...); returns that directory.
    pub fn issue(
        &self,
        out: &str,
        namespace: &str,
        service_account: &str,
        extra: &[&str],
    ) -> Result<PathBuf> {
        let (ca, out_dir) = (self.path("ca"), self.path(out));
        let owner = format!("{PROXY_ID}:{PROXY_ID}");
        let mut args = vec![
            "workload",
            "--ca",
            &ca,
            "--ns",
            namespace,
            "--sa",
            service_account,
            "--out",
            &out_dir,
            "--owner",
            &owner,
        ];
        args.extend_from_slice(extra);
        self.certs(&args)?;
        Ok(self.dir.join(out))
    }
}
