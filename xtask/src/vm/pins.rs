//! The Debian packages pinned in `vm/pins.json`: the emulator and the kernel matrix, and the
//! `--kernel` choices.
use std::{collections::BTreeSet, fs};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

use crate::util::workspace_root;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pins {
    pub qemu: Emulator,
    pub kernels: Vec<Kernel>,
}

/// qemu, newer than the host's: bookworm's qemu 7.2 corrupts memory of 6.12 guests under TCG.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Emulator {
    /// The emulator inside the unpacked packages.
    pub binary: String,
    /// Directories of the unpacked packages with its firmware (BIOS, option ROMs).
    pub firmware: Vec<String>,
    pub packages: Vec<Package>,
}

/// One kernel of the matrix.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// What `--kernel` calls it: `5.10`, `6.1`...
    pub name: String,
    /// `uname -r` of the packaged kernel (its modules directory name).
    pub release: String,
    /// The compressed kernel image inside the unpacked packages.
    pub vmlinuz: String,
    pub packages: Vec<Package>,
    /// Packages built from the same kernel source whose programs replace the host's in this
    /// kernel's guest, where the host's do not work with an older kernel (docs/KERNELS.md).
    #[serde(default)]
    pub tools: Vec<Package>,
}

/// A Debian package at an exact version, with the checksum of its .deb.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: String,
    /// The Debian suite that serves it: bullseye, bookworm, bookworm-backports, trixie, sid...
    pub suite: String,
    #[serde(default = "amd64")]
    pub architecture: String,
    pub sha256: String,
}

fn amd64() -> String {
    "amd64".to_owned()
}

impl Kernel {
    /// The Debian version of the kernel (that of its first package), e.g. `5.10.223-1`.
    pub fn version(&self) -> &str {
        &self.packages[0].version
    }
}

impl Package {
    /// The file name `apt-get download` gives the package.
    pub fn deb_file_name(&self) -> String {
        // apt escapes the epoch separator of a version in file names.
        let version = self.version.replace(':', "%3a");
        format!("{}_{version}_{}.deb", self.name, self.architecture)
    }
}

impl Pins {
    /// Reads and checks `vm/pins.json`.
    pub fn load() -> Result<Pins> {
        let path = workspace_root().join("vm/pins.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let pins: Pins = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid pin file", path.display()))?;
        pins.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(pins)
    }

    /// The kernels `spec` names, in matrix order: `all`, or names separated by commas
    /// (`5.10,7.2`).
    pub fn select(&self, spec: &str) -> Result<Vec<Kernel>> {
        if spec.trim() == "all" {
            return Ok(self.kernels.clone());
        }
        let mut wanted = BTreeSet::new();
        for name in spec.split(',').map(str::trim) {
            if !self.kernels.iter().any(|k| k.name == name) {
                let known: Vec<&str> = self.kernels.iter().map(|k| k.name.as_str()).collect();
                bail!(
                    "unknown kernel {name:?}: choose from {}, or all (vm/pins.json)",
                    known.join(", ")
                );
            }
            wanted.insert(name);
        }
        Ok(self
            .kernels
            .iter()
            .filter(|k| wanted.contains(k.name.as_str()))
            .cloned()
            .collect())
    }

    fn validate(&self) -> Result<()> {
        ensure!(!self.kernels.is_empty(), "no kernel is pinned");
        ensure!(!self.qemu.packages.is_empty(), "qemu has no package");
        let mut names = BTreeSet::new();
        for kernel in &self.kernels {
            ensure!(
                names.insert(&kernel.name),
                "kernel {} is pinned twice",
                kernel.name
            );
            ensure!(
                kernel.name != "all" && !kernel.name.is_empty() && !kernel.name.contains(','),
                "invalid kernel name {:?}",
                kernel.name
            );
            ensure!(
                !kernel.packages.is_empty(),
                "kernel {} has no package",
                kernel.name
            );
        }
        let all_packages = self
            .kernels
            .iter()
            .flat_map(|k| k.packages.iter().chain(&k.tools))
            .chain(&self.qemu.packages);
        for package in all_packages {
            let hex =
                package.sha256.len() == 64 && package.sha256.chars().all(|c| c.is_ascii_hexdigit());
            ensure!(
                hex,
                "{} {}: sha256 must be 64 hex digits",
                package.name,
                package.version
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(kernels: Vec<Kernel>) -> Vec<String> {
        kernels.into_iter().map(|k| k.name).collect()
    }

    #[test]
    fn the_pinned_matrix_is_valid_and_selectable() {
        let pins = Pins::load().unwrap();
        assert_eq!(
            names(pins.select("all").unwrap()),
            ["5.10", "6.1", "6.12", "7.2"]
        );
        assert_eq!(
            names(pins.select("7.2, 5.10").unwrap()),
            ["5.10", "7.2"],
            "matrix order, whatever the order asked"
        );
    }

    #[test]
    fn unknown_kernels_are_refused_with_the_choices() {
        let pins = Pins::load().unwrap();
        let err = pins.select("5.4").unwrap_err().to_string();
        assert!(err.contains("unknown kernel \"5.4\""), "{err}");
        assert!(err.contains("5.10, 6.1, 6.12, 7.2, or all"), "{err}");
        assert!(pins.select("").is_err());
        assert!(pins.select("5.10,").is_err());
    }

    #[test]
    fn deb_file_names_follow_apt() {
        let package = Package {
            name: "qemu-system-data".into(),
            version: "1:10.0.2+ds-2+deb13u1~bpo12+1".into(),
            suite: "bookworm-backports".into(),
            architecture: "all".into(),
            sha256: "0".repeat(64),
        };
        assert_eq!(
            package.deb_file_name(),
            "qemu-system-data_1%3a10.0.2+ds-2+deb13u1~bpo12+1_all.deb"
        );
    }
}
