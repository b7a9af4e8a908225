//! Host packages the VM lab needs on top of those of `cargo xtask setup` (which brings
//! iproute2, iptables, bpftool and util-linux, copied into the guest).
use anyhow::Result;

use crate::setup;

const PACKAGES: &[&str] = &[
    "qemu-system-x86",        // the libraries of the pinned, newer qemu (vm/pins.json)
    "busybox-static",         // the guest's basic tools
    "python3",                // Debian's python3 (some tests run it), copied into the guest
    "kmod",                   // depmod: the modules' dependencies
    "lz4",                    // decompresses the 5.10 and 6.1 kernel images
    "zstd",                   // decompresses the 6.12 and 7.x kernel images
    "xz-utils",               // decompresses modules
    "gcc",                    // compiles the exit helper (vm/exit-qemu.c)...
    "libc6-dev",              // ...statically
    "binutils",               // strip: the test binaries without their debug info
    "debian-archive-keyring", // verifies the kernel packages
];

pub fn ensure() -> Result<()> {
    setup::ensure_packages("VM lab packages", PACKAGES)
}
