//! One cpio archive of the guest's root filesystem under construction. Host files keep their
//! host paths, with the symlinks on the way (so sonames and the ELF interpreter resolve as on
//! the host), and programs bring the shared libraries `ldd` lists for them.
use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::BufWriter,
    os::unix::fs::PermissionsExt,
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::cpio::CpioWriter;

/// Bounds following a chain of symlinks on the host.
const MAX_SYMLINK_HOPS: usize = 40;

pub struct Rootfs {
    cpio: CpioWriter<BufWriter<File>>,
    path: PathBuf,
    /// Guest paths already in the archive.
    written: BTreeSet<PathBuf>,
}

impl Rootfs {
    pub fn create(path: &Path) -> Result<Rootfs> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Rootfs {
            cpio: CpioWriter::new(BufWriter::new(file)),
            path: path.to_path_buf(),
            written: BTreeSet::new(),
        })
    }

    /// A directory and its missing parents.
    pub fn directory(&mut self, guest: &Path) -> Result<()> {
        let mut partial = PathBuf::from("/");
        for component in guest.components() {
            if let Component::Normal(name) = component {
                partial.push(name);
                if self.written.insert(partial.clone()) {
                    self.cpio.directory(&archive_name(&partial)?, 0o755)?;
                }
            }
        }
        Ok(())
    }

    pub fn file(&mut self, guest: &Path, permissions: u32, contents: &[u8]) -> Result<()> {
        self.parent_of(guest)?;
        if self.written.insert(guest.to_path_buf()) {
            self.cpio
                .file(&archive_name(guest)?, permissions, contents)
                .with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        Ok(())
    }

    pub fn symlink(&mut self, guest: &Path, target: &Path) -> Result<()> {
        self.parent_of(guest)?;
        let target = target
            .to_str()
            .with_context(|| format!("{} is not UTF-8", target.display()))?;
        if self.written.insert(guest.to_path_buf()) {
            self.cpio.symlink(&archive_name(guest)?, target)?;
        }
        Ok(())
    }

    /// The host's file (or directory, without its contents) at the same path. Directories on
    /// the way are resolved (`/lib` -> `usr/lib`); a symlink at the end is copied as a symlink
    /// and followed.
    pub fn host_path(&mut self, host: &Path) -> Result<()> {
        let mut path = host.to_path_buf();
        for _ in 0..MAX_SYMLINK_HOPS {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return self.directory(&path);
            };
            let resolved = fs::canonicalize(parent)
                .with_context(|| format!("cannot resolve {}", parent.display()))?
                .join(name);
            if self.written.contains(&resolved) {
                return Ok(());
            }
            let metadata = fs::symlink_metadata(&resolved)
                .with_context(|| format!("{} is missing on the host", resolved.display()))?;
            if metadata.is_symlink() {
                let target = fs::read_link(&resolved)?;
                self.symlink(&resolved, &target)?;
                // An absolute target replaces the base; a relative one is resolved from it.
                path = resolved.parent().unwrap_or(Path::new("/")).join(target);
            } else if metadata.is_dir() {
                return self.directory(&resolved);
            } else {
                let contents = fs::read(&resolved)
                    .with_context(|| format!("cannot read {}", resolved.display()))?;
                return self.file(&resolved, metadata.permissions().mode() & 0o7777, &contents);
            }
        }
        bail!("{}: too many levels of symlinks", host.display())
    }

    /// Every file under the host directory `dir` for which `keep` holds (given the path), with
    /// the libraries of the shared objects among them (plugins, extension modules).
    pub fn host_tree(&mut self, dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Result<()> {
        self.host_path(dir)?;
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for entry in entries.into_iter().filter(|path| keep(path)) {
            if fs::symlink_metadata(&entry)?.is_dir() {
                self.host_tree(&entry, keep)?;
            } else {
                self.host_path(&entry)?;
                if entry.extension().is_some_and(|ext| ext == "so") {
                    self.libraries_of(&entry)?;
                }
            }
        }
        Ok(())
    }

    /// The shared libraries `ldd` lists for the host program or library `elf`.
    pub fn libraries_of(&mut self, elf: &Path) -> Result<()> {
        for library in shared_libraries(elf)? {
            self.host_path(&library)?;
        }
        Ok(())
    }

    /// Writes the trailer; returns the archive's path.
    pub fn finish(self) -> Result<PathBuf> {
        let mut writer = self.cpio.finish()?;
        std::io::Write::flush(&mut writer)?;
        Ok(self.path)
    }

    fn parent_of(&mut self, guest: &Path) -> Result<()> {
        match guest.parent() {
            Some(parent) => self.directory(parent),
            None => bail!("{} has no parent directory", guest.display()),
        }
    }
}

/// cpio names are relative to the root.
fn archive_name(guest: &Path) -> Result<String> {
    let relative = guest.strip_prefix("/").unwrap_or(guest);
    relative
        .to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", guest.display()))
}

/// What `ldd` resolves for `elf` (the dynamic loader included); nothing for a static binary.
pub fn shared_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(elf)
        .output()
        .context("cannot run ldd")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("not a dynamic executable") || stdout.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !output.status.success() {
        bail!("ldd {} failed: {}", elf.display(), stderr.trim());
    }
    parse_ldd(&stdout).with_context(|| format!("in the libraries of {}", elf.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines().map(str::trim) {
        let path = match line.split_once(" => ") {
            Some((name, rest)) if rest.starts_with("not found") => {
                bail!("{name} is not installed")
            }
            Some((_, rest)) => rest,
            // The dynamic loader is listed by path alone; linux-vdso has no file.
            None if line.starts_with('/') => line,
            None => continue,
        };
        let path = path.split(" (").next().unwrap_or(path);
        libraries.push(PathBuf::from(path));
    }
    Ok(libraries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libraries_and_the_loader_from_ldd() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibcap.so.2 => /lib/x86_64-linux-gnu/libcap.so.2 (0x00007f9e)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f9e)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libcap.so.2"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(missing.to_string().contains("libfoo.so.1 is not installed"));
    }

    #[test]
    fn copies_symlink_chains_and_writes_each_path_once() {
        let dir = std::env::temp_dir().join(format!("vm-rootfs-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("libx.so.1.2"), b"elf").unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", dir.join("libx.so.1")).unwrap();
        let archive = dir.join("out.cpio");
        let mut rootfs = Rootfs::create(&archive).unwrap();
        rootfs.host_path(&dir.join("libx.so.1")).unwrap();
        rootfs.host_path(&dir.join("libx.so.1")).unwrap();
        rootfs.finish().unwrap();
        let bytes = fs::read(&archive).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let canonical_dir = fs::canonicalize(std::env::temp_dir()).unwrap();
        let name = |file: &str| {
            let path = canonical_dir.join(dir.file_name().unwrap()).join(file);
            format!("{}\0", archive_name(&path).unwrap())
        };
        assert_eq!(text.matches(&name("libx.so.1")).count(), 1);
        assert_eq!(text.matches(&name("libx.so.1.2")).count(), 1);
        assert!(text.contains("elf"));
    }
}
