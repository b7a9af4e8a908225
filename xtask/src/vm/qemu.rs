//! Booting a kernel under qemu: the pinned qemu (vm/pins.json), with TCG emulation, always:
//! KVM on these machines runs stock kernels about a thousand times slower. The guest's init
//! ends the VM through the isa-debug-exit device, so a finished run never waits for a timeout.
use std::{
    fs::File,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{packages, pins::Emulator, rootfs};

/// Enough for the initrd (~100 MiB, held twice while it unpacks) and the tests' processes.
const MEMORY_MIB: &str = "1024";
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What the guest's init does after setting up (read from the kernel command line).
#[derive(Clone, Copy)]
pub enum GuestMode {
    Tests,
    Shell,
}

/// The pinned qemu, unpacked in the cache; the host's qemu package supplies its libraries.
pub struct Qemu {
    binary: PathBuf,
    firmware_dirs: Vec<PathBuf>,
}

impl Qemu {
    pub fn prepare(pin: &Emulator, cache: &Path) -> Result<Qemu> {
        let root = cache.join("qemu");
        packages::unpack(&pin.packages, cache, &root)?;
        let qemu = Qemu {
            binary: root.join(&pin.binary),
            firmware_dirs: pin.firmware.iter().map(|dir| root.join(dir)).collect(),
        };
        // Fails naming a missing library, rather than qemu failing to start.
        rootfs::shared_libraries(&qemu.binary)
            .context("the pinned qemu cannot run on this host")?;
        Ok(qemu)
    }
}

pub struct Vm<'a> {
    pub qemu: &'a Qemu,
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    pub mode: GuestMode,
}

/// A finished (or abandoned) boot.
pub struct Boot {
    /// None when the VM was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub console: String,
    pub elapsed: Duration,
}

/// Boots `vm`, streaming the serial console to stdout (each line after `prefix`, so that the
/// consoles of VMs booted side by side stay readable) and to `console_log`; kills the VM after
/// `timeout`.
pub fn boot_and_watch(
    vm: &Vm,
    timeout: Duration,
    console_log: &Path,
    prefix: &str,
) -> Result<Boot> {
    let started = Instant::now();
    let mut log = File::create(console_log)
        .with_context(|| format!("cannot create {}", console_log.display()))?;
    let mut child = command(vm, "stdio")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", vm.qemu.binary.display()))?;
    let mut console_pipe = child.stdout.take().context("qemu has no stdout")?;
    let prefix = prefix.as_bytes().to_vec();
    let streamer = thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut console = Vec::new();
        let mut chunk = [0u8; 4096];
        // Printed from here, up to the last complete line.
        let mut printed = 0;
        loop {
            let read = console_pipe.read(&mut chunk)?;
            if read == 0 {
                if printed < console.len() {
                    print_lines(&prefix, &console[printed..], true)?;
                }
                return Ok(console);
            }
            log.write_all(&chunk[..read])?;
            console.extend_from_slice(&chunk[..read]);
            printed += print_lines(&prefix, &console[printed..], false)?;
        }
    });
    let status = wait_or_kill(&mut child, started + timeout)?;
    let console = streamer
        .join()
        .map_err(|_| anyhow::anyhow!("the console reader panicked"))?
        .context("reading the VM's console")?;
    Ok(Boot {
        status,
        console: String::from_utf8_lossy(&console).into_owned(),
        elapsed: started.elapsed(),
    })
}

/// Boots `vm` on this terminal: the serial console is stdin/stdout, with qemu's monitor on
/// Ctrl-A (Ctrl-A X quits).
pub fn boot_interactive(vm: &Vm) -> Result<ExitStatus> {
    command(vm, "mon:stdio")
        .status()
        .with_context(|| format!("cannot start {}", vm.qemu.binary.display()))
}

fn command(vm: &Vm, serial: &str) -> Command {
    let mode = match vm.mode {
        GuestMode::Tests => "tests",
        GuestMode::Shell => "shell",
    };
    // panic=-1 reboots at once on a kernel panic, and -no-reboot turns that into qemu's exit.
    // norandmaps: TCG reuses its translation of code only at the same virtual address, so
    // without address randomisation every process start after the first is 3-5 times faster.
    let kernel_command_line =
        format!("console=ttyS0 panic=-1 quiet mitigations=off norandmaps sidecar.mode={mode}");
    let mut command = Command::new(&vm.qemu.binary);
    for dir in &vm.qemu.firmware_dirs {
        command.arg("-L").arg(dir);
    }
    command
        .args([
            "-accel",
            "tcg",
            "-machine",
            "pc",
            "-nodefaults",
            "-no-reboot",
        ])
        // `max`: the fastest model under TCG here (the guest's libc picks its newer string
        // routines), and its RDRAND seeds the guest's entropy pool at boot.
        .args(["-cpu", "max", "-m", MEMORY_MIB, "-display", "none"])
        .args(["-serial", serial])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-kernel")
        .arg(vm.vmlinux)
        .arg("-initrd")
        .arg(vm.initramfs)
        .args(["-append", &kernel_command_line]);
    command
}

/// Prints the complete lines of `text` (all of it when `last`), each after `prefix`; returns
/// how many bytes it printed.
fn print_lines(prefix: &[u8], text: &[u8], last: bool) -> std::io::Result<usize> {
    let complete = match text.iter().rposition(|&byte| byte == b'\n') {
        Some(end) => end + 1,
        None if last => text.len(),
        None => return Ok(0),
    };
    let mut stdout = std::io::stdout().lock();
    for line in text[..complete].split_inclusive(|&byte| byte == b'\n') {
        stdout.write_all(prefix)?;
        stdout.write_all(line)?;
    }
    if last && !text.ends_with(b"\n") {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(complete)
}

fn wait_or_kill(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(POLL_INTERVAL);
    }
}
