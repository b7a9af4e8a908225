//! Link options of the `sidecar` binary.
fn main() {
    // RELR packs the binary's ~19k relative relocations (PIE) into a few KiB instead of 450 KiB
    // of `.rela.dyn` that each proxy keeps resident after the loader read it (glibc >= 2.36).
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
