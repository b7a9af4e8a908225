//! A pinned kernel ready to boot, kept in the cache: its packages unpacked, the modules indexed
//! by depmod, and the decompressed `vmlinux` that qemu boots.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

use super::{bzimage, packages, pins::Kernel};
use crate::util::run;

pub struct KernelImage {
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>` with modules.dep.
    pub modules_dir: PathBuf,
    /// The unpacked tool packages (`tools` in vm/pins.json).
    pub tools_root: PathBuf,
}

/// Where tool packages keep their programs.
const PROGRAM_DIRS: &[&str] = &["usr/sbin", "usr/bin", "sbin", "bin"];

impl KernelImage {
    /// The programs of the tool packages, as paths relative to `tools_root`.
    pub fn tool_programs(&self) -> Result<Vec<PathBuf>> {
        let mut programs = Vec::new();
        for dir in PROGRAM_DIRS {
            let Ok(entries) = fs::read_dir(self.tools_root.join(dir)) else {
                continue;
            };
            for entry in entries {
                let path = entry?.path();
                if path.is_file() {
                    programs.push(path.strip_prefix(&self.tools_root)?.to_path_buf());
                }
            }
        }
        programs.sort();
        Ok(programs)
    }
}

/// Downloads and unpacks `kernel` unless the cache already holds it at the pinned checksums.
pub fn prepare(kernel: &Kernel, cache: &Path) -> Result<KernelImage> {
    let dir = cache.join("kernels").join(&kernel.release);
    let root = dir.join("root");
    let image = KernelImage {
        vmlinux: dir.join("vmlinux"),
        modules_dir: root.join("lib/modules").join(&kernel.release),
        tools_root: dir.join("tools"),
    };
    let unpacked = packages::unpack(&kernel.packages, cache, &root)?;
    packages::unpack(&kernel.tools, cache, &image.tools_root)?;
    // vmlinux is written last: its presence means the steps below all succeeded.
    if !unpacked && image.vmlinux.is_file() {
        return Ok(image);
    }
    println!("vm: preparing Linux {} ({})", kernel.name, kernel.release);
    link_usr_modules(&root, &kernel.release)?;
    // depmod writes modules.dep, which gives the load order (the packages leave it to the
    // postinst script).
    run(Command::new("depmod")
        .arg("-b")
        .arg(&root)
        .arg(&kernel.release))?;
    ensure!(
        image.modules_dir.join("modules.dep").is_file(),
        "depmod wrote no modules.dep in {}",
        image.modules_dir.display()
    );
    let partial = image.vmlinux.with_extension("partial");
    bzimage::extract_vmlinux(&root.join(&kernel.vmlinuz), &partial)?;
    fs::rename(&partial, &image.vmlinux)?;
    Ok(image)
}

/// Packages of merged-/usr releases (trixie, sid) ship `usr/lib/modules`; depmod -b looks in
/// `lib/modules`.
fn link_usr_modules(root: &Path, release: &str) -> Result<()> {
    let lib_modules = root.join("lib/modules");
    if !lib_modules.exists() && root.join("usr/lib/modules").is_dir() {
        fs::create_dir_all(root.join("lib"))?;
        std::os::unix::fs::symlink("../usr/lib/modules", &lib_modules)
            .with_context(|| format!("cannot link {}", lib_modules.display()))?;
    }
    ensure!(
        lib_modules.join(release).is_dir(),
        "the packages of {release} hold no modules directory"
    );
    Ok(())
}
