//! Downloading the pinned kernel packages. apt-get runs with a private configuration (its own
//! sources list, package lists and cache under the VM cache) so that it reaches the suites of
//! every kernel (bullseye to sid) without touching the host's apt state. Each .deb is kept
//! and checked against its pinned sha256: superseded versions leave the archive's pool.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::pins::Package;
use crate::util::run;

/// The keyring of Debian's `debian-archive-keyring` package: it signs every suite we use.
const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Makes `dir` hold `packages` unpacked, unless it already does (a stamp inside records from
/// which pins); returns true if it was (re)made.
pub fn unpack(packages: &[Package], cache: &Path, dir: &Path) -> Result<bool> {
    let stamp = dir.join(".unpacked-from");
    let fingerprint: String = packages
        .iter()
        .map(|p| format!("{} {} {}\n", p.name, p.version, p.sha256))
        .collect();
    if fs::read_to_string(&stamp).is_ok_and(|text| text == fingerprint) {
        return Ok(false);
    }
    let debs = fetch(packages, cache)?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for deb in &debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    }
    fs::write(&stamp, fingerprint)?;
    Ok(true)
}

/// Downloads what is not cached yet; returns the .deb of each package, in order.
fn fetch(packages: &[Package], cache: &Path) -> Result<Vec<PathBuf>> {
    let debs_dir = cache.join("debs");
    fs::create_dir_all(&debs_dir)
        .with_context(|| format!("cannot create {}", debs_dir.display()))?;
    let missing: Vec<&Package> = packages
        .iter()
        .filter(|p| !debs_dir.join(p.deb_file_name()).is_file())
        .collect();
    if !missing.is_empty() {
        let apt = PrivateApt::update(&cache.join("apt"), &missing)?;
        for package in &missing {
            println!(
                "vm: downloading {} {} ({})",
                package.name, package.version, package.suite
            );
            apt.download(package, &debs_dir)?;
        }
    }
    packages
        .iter()
        .map(|package| {
            let deb = debs_dir.join(package.deb_file_name());
            verify_sha256(&deb, package)?;
            Ok(deb)
        })
        .collect()
}

/// apt-get with its own sources, lists and cache; the host's apt.conf.d still applies (it may
/// hold what the registry needs).
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    /// Writes a sources list with the suites `packages` come from and runs `apt-get update`.
    fn update(dir: &Path, packages: &[&Package]) -> Result<PrivateApt> {
        let archive = debian_archive_uri()?;
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let suites: BTreeSet<&str> = packages.iter().map(|p| p.suite.as_str()).collect();
        let sources: String = suites
            .iter()
            .map(|suite| format!("deb [signed-by={ARCHIVE_KEYRING}] {archive} {suite} main\n"))
            .collect();
        let sources_list = dir.join("sources.list");
        fs::write(&sources_list, sources)
            .with_context(|| format!("cannot write {}", sources_list.display()))?;
        let path = |sub: &str| dir.join(sub).display().to_string();
        let options = [
            format!("Dir::Etc::SourceList={}", sources_list.display()),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State::Lists={}", path("lists")),
            format!("Dir::Cache={}", path("cache")),
            "Dir::State::status=/dev/null".to_owned(),
            "APT::Architecture=amd64".to_owned(),
            "Acquire::Languages=none".to_owned(),
            // Only the package lists: no AppStream metadata.
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
            // The cache is root's: apt's unprivileged download user could not write there.
            "APT::Sandbox::User=root".to_owned(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_owned(), option])
        .collect();
        let apt = PrivateApt { options };
        println!(
            "vm: apt-get update for {}",
            suites.into_iter().collect::<Vec<_>>().join(", ")
        );
        run(apt.command().args(["update", "-qq"]))?;
        Ok(apt)
    }

    fn download(&self, package: &Package, dir: &Path) -> Result<()> {
        let status = self
            .command()
            .current_dir(dir)
            .args(["download", "-qq"])
            .arg(format!("{}={}", package.name, package.version))
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!(
                "cannot download {} {} from {}: superseded versions leave the Debian archive, so \
                 this pin may be gone. Pick the version on offer (apt-cache madison {}) and update \
                 its version and sha256 in vm/kernels.json (see docs/KERNELS.md)",
                package.name,
                package.version,
                package.suite,
                package.name
            );
        }
        Ok(())
    }

    fn command(&self) -> Command {
        let mut command = Command::new("apt-get");
        command.args(&self.options);
        command
    }
}

/// The Debian archive the host's apt is configured with (ending in `/debian/`), so the private
/// configuration uses the same mirror.
fn debian_archive_uri() -> Result<String> {
    let output = Command::new("apt-get")
        .args(["indextargets", "--format", "$(REPO_URI)"])
        .output()
        .context("cannot run apt-get indextargets")?;
    let uris = String::from_utf8_lossy(&output.stdout);
    match uris.lines().find(|uri| uri.ends_with("/debian/")) {
        Some(uri) => Ok(uri.to_owned()),
        None => bail!(
            "the host's apt sources have no Debian archive (a URI ending in /debian/): the \
             kernel packages are downloaded from it"
        ),
    }
}

fn verify_sha256(deb: &Path, package: &Package) -> Result<()> {
    let output = Command::new("sha256sum")
        .arg(deb)
        .output()
        .context("cannot run sha256sum")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let actual = text.split_whitespace().next().unwrap_or_default();
    if !output.status.success() || actual != package.sha256 {
        // A corrupt or substituted file must not stay in the cache.
        let _ = fs::remove_file(deb);
        bail!(
            "{} has sha256 {actual:?}, but vm/kernels.json pins {} {} at {}; the file was removed",
            deb.display(),
            package.name,
            package.version,
            package.sha256
        );
    }
    Ok(())
}
