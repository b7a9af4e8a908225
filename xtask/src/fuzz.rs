//! `cargo xtask fuzz`: every fuzz target under libFuzzer, coverage-guided, for a bounded time.
//!
//! A target is a `bolero::check!` unit test of one crate; plain `cargo test` replays its
//! committed corpus (`__fuzz__/<target>/corpus` beside the code) and a second of random inputs.
//! Here cargo-bolero builds the same test with coverage instrumentation and AddressSanitizer
//! (`RUSTC_BOOTSTRAP=1` for `-Z sanitizer`, in its own target directory, as the BPF build does)
//! and runs libFuzzer on it. The committed corpus seeds a working corpus under target/fuzz that
//! grows from run to run (unless `--from-seeds`); a crash fails the run and stays in
//! target/fuzz/crashes/<target>.
use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, builder::PossibleValuesParser};

use crate::util::{run, which, workspace_root};

struct Target {
    name: &'static str,
    /// The package whose unit test it is.
    package: &'static str,
    /// The unit test holding the `bolero::check!`.
    test: &'static str,
    /// Its work directory (bolero's `__fuzz__/<name>`): `corpus/`, and `dict` if there is one.
    dir: &'static str,
    /// The longest input to try, when libFuzzer's default (4096 bytes) is too short.
    max_len: Option<usize>,
}

const TARGETS: &[Target] = &[
    Target {
        name: "client_hello",
        package: "sidecar-proxy",
        test: "detect::client_hello::tests::fuzz_client_hello",
        dir: "sidecar-proxy/src/detect/__fuzz__/client_hello",
        // A whole record (5 + 2^14 bytes) and a little beyond.
        max_len: Some(16_500),
    },
    Target {
        name: "http_detection",
        package: "sidecar-proxy",
        test: "detect::http::tests::fuzz_http_detection",
        dir: "sidecar-proxy/src/detect/__fuzz__/http_detection",
        max_len: None,
    },
    Target {
        name: "mesh_config",
        package: "sidecar-proxy",
        test: "mesh::config::tests::fuzz_mesh_config",
        dir: "sidecar-proxy/src/mesh/__fuzz__/mesh_config",
        max_len: None,
    },
    Target {
        name: "pod_annotations",
        package: "sidecar-capture",
        test: "pod_annotations::tests::fuzz_pod_annotations",
        dir: "sidecar-capture/src/__fuzz__/pod_annotations",
        max_len: None,
    },
    Target {
        name: "inject",
        package: "sidecar-user",
        test: "commands::inject::tests::fuzz_inject",
        dir: "sidecar-user/src/commands/__fuzz__/inject",
        max_len: None,
    },
];

#[derive(Args)]
pub struct FuzzOptions {
    /// How long each target runs (`12s`, `5m`); `cargo xtask test` gives each the default.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    pub time_per_target: Duration,
    /// Start from the committed corpus alone, without the inputs earlier runs found (replaying
    /// those first can take longer than the run; `cargo xtask test` starts so).
    #[arg(long)]
    pub from_seeds: bool,
    /// A light build for a short run (the test command's): the `fuzz-quick` profile, without
    /// AddressSanitizer, in its own target directory.
    #[arg(long)]
    pub quick_build: bool,
    /// Only this target (repeatable); default: every one.
    #[arg(long = "target", value_parser = PossibleValuesParser::new(TARGETS.iter().map(|t| t.name)))]
    pub targets: Vec<String>,
}

impl Default for FuzzOptions {
    fn default() -> Self {
        FuzzOptions {
            time_per_target: Duration::from_secs(12),
            from_seeds: false,
            quick_build: false,
            targets: Vec::new(),
        }
    }
}

pub fn run_fuzz(opts: &FuzzOptions) -> Result<()> {
    if which("cargo-bolero").is_none() {
        bail!("cargo-bolero is not installed: run `cargo xtask setup`");
    }
    let root = workspace_root();
    let seconds = opts.time_per_target.as_secs().max(1);
    for target in TARGETS
        .iter()
        .filter(|t| opts.targets.is_empty() || opts.targets.iter().any(|name| name == t.name))
    {
        println!("fuzz: {} for {seconds} s", target.name);
        let corpus = root.join("target/fuzz/corpus").join(target.name);
        let crashes = root.join("target/fuzz/crashes").join(target.name);
        if opts.from_seeds && corpus.exists() {
            std::fs::remove_dir_all(&corpus)?;
        }
        seed_corpus(&root.join(target.dir).join("corpus"), &corpus)?;
        std::fs::create_dir_all(&crashes)?;
        let (profile, sanitizer, build_dir) = if opts.quick_build {
            ("fuzz-quick", "NONE", "target/fuzz/quick-build")
        } else {
            ("fuzz", "address", "target/fuzz/build")
        };
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args(["bolero", "test", target.test, "--package", target.package])
            .args([
                "--rustc-bootstrap",
                "--profile",
                profile,
                "--sanitizer",
                sanitizer,
            ])
            .arg("--target-dir")
            .arg(root.join(build_dir))
            .arg(format!("-T{seconds}s"))
            .arg("--corpus-dir")
            .arg(&corpus)
            .arg("--crashes-dir")
            .arg(&crashes)
            .arg("--engine-args=-print_final_stats=1");
        if let Some(max_len) = target.max_len {
            cmd.arg(format!("--max-input-length={max_len}"));
        }
        let dict = Path::new(target.dir).join("dict");
        if root.join(&dict).is_file() {
            // Relative: libFuzzer's arguments travel space-separated in one variable.
            cmd.arg(format!("--engine-args=-dict={}", dict.display()));
        }
        run(&mut cmd).with_context(|| {
            format!(
                "fuzz target {} failed: the input is in {}; copy it into {}/crashes/ to \
                 replay it with `cargo test -p {} {}`, fix the code and keep the \
                 input as a regression test",
                target.name,
                crashes.display(),
                target.dir,
                target.package,
                target.test
            )
        })?;
    }
    println!("fuzz: no crash");
    Ok(())
}

/// Copies the committed corpus into the working one (libFuzzer adds the inputs it finds to the
/// first corpus directory; the repository's stays as committed).
fn seed_corpus(committed: &Path, working: &Path) -> Result<()> {
    std::fs::create_dir_all(working)?;
    let entries = std::fs::read_dir(committed)
        .with_context(|| format!("cannot read the corpus {}", committed.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_file() {
            let name = path.file_name().expect("a file has a name");
            std::fs::copy(&path, working.join(name))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(())
}
