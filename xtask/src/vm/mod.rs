//! `cargo xtask vm-test` and `cargo xtask vm-shell`: the root integration tests on the kernel
//! matrix of docs/KERNELS.md. Pinned Debian cloud kernels and qemu (vm/pins.json) are
//! downloaded once into a cache; each kernel boots under TCG with an initramfs holding busybox,
//! the host's tools, the kernel's modules and the compiled tests; the guest's init
//! (vm/init.sh) runs the tests and reports through the console and qemu's exit status.
mod bzimage;
mod cpio;
mod host_tools;
mod initramfs;
mod kernel_image;
mod modules;
mod packages;
mod pins;
mod qemu;
mod report;
mod rootfs;
mod test_build;

use std::{path::PathBuf, thread, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::{setup, util::workspace_root};
use pins::Pins;
use qemu::{GuestMode, Qemu, Vm};

#[derive(Args)]
pub struct VmTestOptions {
    /// Kernels to boot, from vm/pins.json: 5.10, 6.1, 6.12, 7.2, a comma-separated list
    /// (`5.10,7.2`), or `all`.
    #[arg(long, default_value = "all")]
    pub kernel: String,
    /// Seconds each kernel gets to boot and run the tests before it counts as hung (a run
    /// takes 5-6 minutes here: close_at_once and capture_lifecycle are about 2 each).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Arguments for every test executable, after `--` (e.g. a test name filter).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

#[derive(Args)]
pub struct VmShellOptions {
    /// The kernel to boot, from vm/pins.json: 5.10, 6.1, 6.12 or 7.2.
    #[arg(long, default_value = "6.1")]
    pub kernel: String,
}

/// Boots the selected kernels side by side (each VM has one vCPU, the machine two cores; their
/// console lines are prefixed with the kernel) and prints one result line per kernel; fails
/// if any kernel did not pass.
pub fn run_tests(opts: &VmTestOptions) -> Result<()> {
    ensure!(opts.timeout > 0, "--timeout must be at least 1 second");
    let pins = Pins::load()?;
    let selected = pins.select(&opts.kernel)?;
    let timeout = Duration::from_secs(opts.timeout);
    let (work, cache) = prepare_host()?;
    let qemu = Qemu::prepare(&pins.qemu, &cache)?;
    let binaries = test_build::build()?;
    let common = initramfs::build_common(&work, &binaries, &opts.test_args)?;
    let mut prepared = Vec::new();
    for kernel in &selected {
        let image = kernel_image::prepare(kernel, &cache)?;
        let initramfs = initramfs::for_kernel(&common, kernel, &image, &work)?;
        println!(
            "\n== vm-test: Linux {} ({} {}), qemu TCG, timeout {} s",
            kernel.name,
            kernel.release,
            kernel.version(),
            timeout.as_secs()
        );
        prepared.push((kernel, image, initramfs));
    }
    let prefixed = prepared.len() > 1;
    let boots: Vec<Result<report::KernelReport>> = thread::scope(|scope| {
        let running: Vec<_> = prepared
            .iter()
            .map(|(kernel, image, initramfs)| {
                let (qemu, work) = (&qemu, &work);
                scope.spawn(move || {
                    let console_log = work.join(&kernel.name).join("console.log");
                    let vm = Vm {
                        qemu,
                        vmlinux: &image.vmlinux,
                        initramfs,
                        mode: GuestMode::Tests,
                    };
                    let prefix = if prefixed {
                        format!("[{}] ", kernel.name)
                    } else {
                        String::new()
                    };
                    let boot = qemu::boot_and_watch(&vm, timeout, &console_log, &prefix)?;
                    Ok(report::KernelReport::new(
                        kernel,
                        &boot,
                        timeout,
                        console_log,
                    ))
                })
            })
            .collect();
        running
            .into_iter()
            .map(|boot| {
                boot.join()
                    .unwrap_or_else(|_| bail!("a VM's watcher panicked"))
            })
            .collect()
    });
    let reports = boots.into_iter().collect::<Result<Vec<_>>>()?;
    println!("\n== vm-test summary");
    for report in &reports {
        println!("{report}");
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm-test: {} of {} kernels did not pass: {}",
            failed.len(),
            reports.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Boots one kernel with the sidecar and the tests inside, on this terminal.
pub fn run_shell(opts: &VmShellOptions) -> Result<()> {
    let pins = Pins::load()?;
    let kernel = match pins.select(&opts.kernel)?.as_slice() {
        [kernel] => kernel.clone(),
        _ => bail!("vm-shell boots one kernel: pass --kernel with a single name"),
    };
    let (work, cache) = prepare_host()?;
    let qemu = Qemu::prepare(&pins.qemu, &cache)?;
    let binaries = test_build::build()?;
    let common = initramfs::build_common(&work, &binaries, &[])?;
    let image = kernel_image::prepare(&kernel, &cache)?;
    let initramfs = initramfs::for_kernel(&common, &kernel, &image, &work)?;
    println!(
        "\n== vm-shell: Linux {} ({}). Leave with `exit` (or Ctrl-D); Ctrl-A X kills the VM.",
        kernel.name, kernel.release
    );
    let status = qemu::boot_interactive(&Vm {
        qemu: &qemu,
        vmlinux: &image.vmlinux,
        initramfs: &initramfs,
        mode: GuestMode::Shell,
    })?;
    // isa-debug-exit gives odd statuses: the guest powered off; anything else is qemu's own.
    match status.code() {
        Some(code) if code % 2 == 1 => println!("vm-shell: the VM powered off"),
        _ => println!("vm-shell: qemu stopped ({status})"),
    }
    Ok(())
}

/// Installs what is missing (the project's setup, then the VM's own packages); returns the
/// work directory (target/vm) and the download cache.
fn prepare_host() -> Result<(PathBuf, PathBuf)> {
    setup::run()?;
    host_tools::ensure()?;
    let work = workspace_root().join("target/vm");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    Ok((work, cache_dir()?))
}

/// Downloaded and unpacked kernels outlive `target/` (and fresh clones, as in CI):
/// `$XDG_CACHE_HOME/sidecar-vm`, or `~/.cache/sidecar-vm`.
fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("sidecar-vm"))
}
