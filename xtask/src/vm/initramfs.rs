//! What the VM boots into: one initrd made of three concatenated cpio archives, so that only
//! the kernel-specific part differs between kernels:
//! - base: busybox, the host's sh, bash, ip, iptables-nft, bpftool, setpriv and python3 with
//!   their libraries, the init script (vm/init.sh) and the exit helper (vm/exit-qemu.c);
//! - kernel: the kernel's modules the lab needs, decompressed, with their load order, and the
//!   kernel's own tools where the host's do not fit it (they replace the base's copies);
//! - tests: the integration test executables, labtool and sidecar at their host paths (the
//!   tests have labtool's path compiled in), stripped of debug info to keep the initrd small.
use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::{
    kernel_image::KernelImage, modules, pins::Kernel, rootfs::Rootfs, test_build::TestBinaries,
};
use crate::util::{run, workspace_root};

/// Where host programs are looked up (not the caller's PATH: a pyenv shim is no python3).
const SYSTEM_PATH: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// Host programs the tests and the sidecar run, copied with their libraries; bash is the
/// vm-shell's shell. busybox supplies everything else (mount, insmod, sleep...), but its `ip`
/// cannot do `ip netns`, its `unshare` has no `--cgroup`, and the lab checks
/// `setpriv --version`, which busybox's lacks.
const HOST_PROGRAMS: &[&str] = &[
    "ip",
    "setpriv",
    "taskset",
    "prlimit",
    "curl",
    "openssl",
    "unshare",
    "bpftool",
    "tcpdump",
    "python3",
    "perl",
    "xtables-nft-multi",
    "bash",
];

/// perl's core modules (the Essential perl-base package): enough for the tests' perl clients.
const PERL_BASE_MODULES: &str = "/usr/lib/x86_64-linux-gnu/perl-base";

/// The iptables commands, all iptables-nft in the guest whatever the host's alternatives say:
/// the guest loads nf_tables modules, not the legacy ones.
const IPTABLES_COMMANDS: &[&str] = &[
    "iptables",
    "ip6tables",
    "iptables-restore",
    "ip6tables-restore",
    "iptables-save",
    "ip6tables-save",
];

/// Parts of python's standard library no test needs, left out to keep the initrd small (and
/// `config-3.X-<triplet>`, the static library for embedding python).
const PYTHON_SKIPPED: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "distutils",
    "site-packages",
    "dist-packages",
];

/// The kernel-independent archives, built once per run.
pub struct CommonParts {
    base: PathBuf,
    tests: PathBuf,
}

pub fn build_common(
    work: &Path,
    binaries: &TestBinaries,
    test_args: &[String],
) -> Result<CommonParts> {
    println!("vm: assembling the initramfs");
    Ok(CommonParts {
        base: build_base(work)?,
        tests: build_tests(work, binaries, test_args)?,
    })
}

/// The initrd for `kernel`: base, its kernel part, tests.
pub fn for_kernel(
    common: &CommonParts,
    kernel: &Kernel,
    image: &KernelImage,
    work: &Path,
) -> Result<PathBuf> {
    let dir = work.join(&kernel.name);
    fs::create_dir_all(&dir)?;
    let kernel_part = build_kernel_part(&dir, kernel, image)?;
    let initramfs = dir.join("initramfs.cpio");
    let mut out = File::create(&initramfs)
        .with_context(|| format!("cannot create {}", initramfs.display()))?;
    // Later archives overwrite earlier ones' files: the kernel's tools replace the host's.
    for part in [&common.base, &kernel_part, &common.tests] {
        io::copy(&mut File::open(part)?, &mut out)?;
    }
    Ok(initramfs)
}

fn build_base(work: &Path) -> Result<PathBuf> {
    let mut rootfs = Rootfs::create(&work.join("base.cpio"))?;
    // Merged /usr: /lib64/ld-linux-x86-64.so.2 and friends must resolve as on the host.
    for top in ["/bin", "/sbin", "/lib", "/lib64"] {
        if fs::symlink_metadata(top).is_ok_and(|m| m.is_symlink()) {
            rootfs.host_path(Path::new(top))?;
        }
    }
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/busybox"] {
        rootfs.directory(Path::new(dir))?;
    }
    // Its applets are linked into /busybox at boot, last on PATH.
    rootfs.host_path(&find_host_program("busybox")?)?;
    // The host's sh (dash), not busybox's: Debian's busybox sh runs its own applets before
    // PATH, and the lab's `sh -c '... exec ip netns exec ...'` needs iproute2's ip.
    rootfs.host_path(Path::new("/bin/sh"))?;
    rootfs.libraries_of(Path::new("/bin/sh"))?;
    for program in HOST_PROGRAMS {
        let path = find_host_program(program)?;
        rootfs.host_path(&path)?;
        rootfs.libraries_of(&path)?;
    }
    add_iptables_nft(&mut rootfs)?;
    add_python_library(&mut rootfs)?;
    add_perl_modules(&mut rootfs)?;
    // The host's accounts: tcpdump, for one, drops its privileges to the `tcpdump` user.
    for accounts in ["/etc/passwd", "/etc/group"] {
        rootfs.host_path(Path::new(accounts))?;
    }
    let vm_dir = workspace_root().join("vm");
    rootfs.file(
        Path::new("/init"),
        0o755,
        &fs::read(vm_dir.join("init.sh"))?,
    )?;
    rootfs.file(
        Path::new("/vm/run-tests"),
        0o755,
        &fs::read(vm_dir.join("run-tests.sh"))?,
    )?;
    let exit_helper = compile_exit_helper(work)?;
    rootfs.file(Path::new("/vm/exit-qemu"), 0o755, &fs::read(exit_helper)?)?;
    rootfs.finish()
}

/// The tiny static program that writes the guest's status to qemu's isa-debug-exit port
/// (Debian kernels have no /dev/port for busybox to write it).
fn compile_exit_helper(work: &Path) -> Result<PathBuf> {
    let binary = work.join("exit-qemu");
    run(Command::new("gcc")
        .args(["-static", "-Os", "-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg(workspace_root().join("vm/exit-qemu.c")))?;
    Ok(binary)
}

fn add_iptables_nft(rootfs: &mut Rootfs) -> Result<()> {
    let multi = find_host_program("xtables-nft-multi")?;
    let dir = multi
        .parent()
        .context("xtables-nft-multi has no directory")?;
    for command in IPTABLES_COMMANDS {
        rootfs.symlink(&dir.join(command), Path::new("xtables-nft-multi"))?;
    }
    // Matches and targets are plugins loaded at run time, next to libxtables.
    let extensions = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    if !extensions.is_dir() {
        bail!("{} is missing: install iptables", extensions.display());
    }
    rootfs.host_tree(extensions, &|_| true)
}

/// python3's standard library, found from the real binary's name: /usr/lib/python3.X.
fn add_python_library(rootfs: &mut Rootfs) -> Result<()> {
    let python = fs::canonicalize(find_host_program("python3")?)?;
    let version = python
        .file_name()
        .and_then(|name| name.to_str())
        .context("python3 has no file name")?;
    let library = Path::new("/usr/lib").join(version);
    if !library.join("os.py").is_file() {
        bail!(
            "{} is not a python standard library: install Debian's python3",
            library.display()
        );
    }
    let keep = |path: &Path| {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        path.parent() != Some(library.as_path())
            || !(PYTHON_SKIPPED.contains(&name) || name.starts_with("config-"))
    };
    rootfs.host_tree(&library, &keep)
}

fn add_perl_modules(rootfs: &mut Rootfs) -> Result<()> {
    let modules = Path::new(PERL_BASE_MODULES);
    if !modules.is_dir() {
        bail!("{} is missing: install perl-base", modules.display());
    }
    rootfs.host_tree(modules, &|_| true)
}

fn build_tests(work: &Path, binaries: &TestBinaries, test_args: &[String]) -> Result<PathBuf> {
    let stripped_dir = work.join("stripped");
    fs::create_dir_all(&stripped_dir)?;
    let mut rootfs = Rootfs::create(&work.join("tests.cpio"))?;
    let all = binaries
        .tests
        .iter()
        .chain([&binaries.labtool, &binaries.sidecar]);
    for binary in all {
        let stripped = stripped_dir.join(binary.file_name().context("binary without a name")?);
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(binary))?;
        rootfs.file(binary, 0o755, &fs::read(&stripped)?)?;
        rootfs.libraries_of(binary)?;
    }
    rootfs.symlink(Path::new("/usr/local/bin/sidecar"), &binaries.sidecar)?;
    let tests_list: String = binaries
        .tests
        .iter()
        .map(|test| format!("{}\n", test.display()))
        .collect();
    rootfs.file(Path::new("/vm/tests.list"), 0o644, tests_list.as_bytes())?;
    if test_args.iter().any(|arg| arg.contains('\n')) {
        bail!("test arguments cannot contain newlines");
    }
    let skips = super::test_build::HOST_ONLY_TEST_CASES
        .iter()
        .flat_map(|case| ["--skip".to_owned(), (*case).to_owned()]);
    let args: String = test_args
        .iter()
        .cloned()
        .chain(skips)
        .map(|arg| format!("{arg}\n"))
        .collect();
    rootfs.file(Path::new("/vm/test-args"), 0o644, args.as_bytes())?;
    let env = format!(
        "export SIDECAR_BIN={}\n",
        shell_quote(&binaries.sidecar.display().to_string())
    );
    rootfs.file(Path::new("/vm/env"), 0o644, env.as_bytes())?;
    rootfs.finish()
}

fn build_kernel_part(dir: &Path, kernel: &Kernel, image: &KernelImage) -> Result<PathBuf> {
    let plan = modules::plan(&image.modules_dir)?;
    if !plan.not_modules.is_empty() {
        println!(
            "vm: Linux {} has no module {} (built into another module): not loaded",
            kernel.name,
            plan.not_modules.join(", ")
        );
    }
    let mut rootfs = Rootfs::create(&dir.join("kernel.cpio"))?;
    let mut load_list = String::new();
    for module in &plan.load_order {
        let (name, contents) = decompressed_module(&image.modules_dir.join(module))?;
        let guest = Path::new("/vm/modules").join(module).with_file_name(name);
        rootfs.file(&guest, 0o644, &contents)?;
        load_list.push_str(&format!("{}\n", guest.display()));
    }
    rootfs.file(Path::new("/vm/modules.load"), 0o644, load_list.as_bytes())?;
    for program in image.tool_programs()? {
        let unpacked = image.tools_root.join(&program);
        let guest = guest_path_like_host(&Path::new("/").join(&program))?;
        rootfs.file(&guest, 0o755, &fs::read(&unpacked)?)?;
        rootfs.libraries_of(&unpacked)?;
    }
    rootfs.finish()
}

/// The module's file name without its compression suffix, and its decompressed contents:
/// busybox's insmod takes plain .ko files.
fn decompressed_module(path: &Path) -> Result<(String, Vec<u8>)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("module path without a file name")?;
    let (plain_name, decompressor) = match name.rsplit_once(".ko.") {
        None => return Ok((name.to_owned(), fs::read(path)?)),
        Some((stem, "xz")) => (format!("{stem}.ko"), "xz"),
        Some((stem, "zst")) => (format!("{stem}.ko"), "zstd"),
        Some((stem, "gz")) => (format!("{stem}.ko"), "gzip"),
        Some((_, other)) => bail!("{}: unknown module compression .{other}", path.display()),
    };
    let output = Command::new(decompressor)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {decompressor}"))?;
    if !output.status.success() {
        bail!(
            "{decompressor} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok((plain_name, output.stdout))
}

/// `path` with its directory resolved as on the host (`/sbin/x` -> `/usr/sbin/x` with a merged
/// /usr), which the guest mirrors.
fn guest_path_like_host(path: &Path) -> Result<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        bail!("{} has no directory", path.display());
    };
    Ok(fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .join(name))
}

fn find_host_program(name: &str) -> Result<PathBuf> {
    SYSTEM_PATH
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .with_context(|| format!("{name} is not installed in {}", SYSTEM_PATH.join(":")))
}

/// `text` as one word for sh.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("/work/main/target"), "'/work/main/target'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
