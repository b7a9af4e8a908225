//! `cargo xtask validate-manifests`: every manifest under deploy/ against the Kubernetes schemas,
//! with kubernetes-validate (PyPI) installed in a venv under target/.
use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{
    setup,
    util::{run, workspace_root},
};

/// Pinned: its schemas decide what passes.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

pub fn validate() -> Result<()> {
    let python = install_validator()?;
    let root = workspace_root();
    run(Command::new(python)
        .arg(root.join("tests/deploy/validate_manifests.py"))
        .arg(root.join("deploy")))
}

/// Creates the venv and installs the validator unless the pinned version is already there;
/// returns the venv's python.
fn install_validator() -> Result<PathBuf> {
    setup::ensure_packages("python3-venv", &["python3-venv"])?;
    let venv = workspace_root().join("target/kubernetes-validate");
    let python = venv.join("bin/python");
    if !python.exists() {
        // Debian's interpreter, not whichever `python3` a version manager puts first on PATH.
        run(Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv))?;
    }
    let (_, version) = VALIDATOR.split_once("==").expect("pinned as name==version");
    let installed = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('kubernetes-validate'))",
        ])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == version);
    if installed {
        println!("validate-manifests: {VALIDATOR}: already present");
    } else {
        println!(
            "validate-manifests: installing {VALIDATOR} in {}",
            venv.display()
        );
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", VALIDATOR]))?;
    }
    Ok(python)
}
