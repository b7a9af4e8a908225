//! Process-wide `tracing` setup: text for people, JSON for log pipelines; the level filter can
//! be changed at runtime (admin `/logging?level=`). Lines go to stdout through a buffer
//! (`log_buffer`).
use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, filter::LevelFilter};

use crate::{telemetry::access_line, telemetry::log_buffer::BufferedStdout};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

type Reload = dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync;

/// Replaces the level filter of the installed subscriber.
pub struct LogLevel(Box<Reload>);

impl LogLevel {
    /// Takes `RUST_LOG` syntax (`debug`, `info,access=off`...); a bad one changes nothing.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .parse(directives)
            .map_err(|error| format!("invalid level {directives:?}: {error}"))?;
        (self.0)(filter)
    }

    /// For tests: accepts valid levels and changes nothing.
    #[cfg(test)]
    pub fn detached() -> Self {
        LogLevel(Box::new(|_| Ok(())))
    }
}

/// Installs the global subscriber; the level filter comes from `RUST_LOG` (default `info`).
/// Returns the output buffer, for the runtime to flush when a worker goes idle.
pub fn init(format: LogFormat) -> anyhow::Result<(LogLevel, BufferedStdout)> {
    // A typo in RUST_LOG should be reported, not silently turn logging back to the default.
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .map_err(|error| anyhow::anyhow!("invalid RUST_LOG: {error}"))?;
    let output = BufferedStdout::start()?;
    access_line::install(format, output.clone());
    let writer = output.clone();
    // Colour codes only help on a terminal; in container logs they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal());
    let failed = |error| anyhow::anyhow!("cannot install the log subscriber: {error}");
    // The handle's type depends on the format, hence the two arms.
    let reload: Box<Reload> = match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map_err(failed)?;
            Box::new(move |filter| handle.reload(filter).map_err(|e| e.to_string()))
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.try_init().map_err(failed)?;
            Box::new(move |filter| handle.reload(filter).map_err(|e| e.to_string()))
        }
    };
    Ok((LogLevel(reload), output))
}
