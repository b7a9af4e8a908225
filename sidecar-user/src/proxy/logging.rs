//! Process-wide `tracing` setup: text for people, JSON for log pipelines.
use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, filter::LevelFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; the level filter comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    // A typo in RUST_LOG should be reported, not silently turn logging back to the default.
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .map_err(|error| anyhow::anyhow!("invalid RUST_LOG: {error}"))?;
    // Colour codes only help on a terminal; in container logs they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("cannot install the log subscriber: {error}"))
}
