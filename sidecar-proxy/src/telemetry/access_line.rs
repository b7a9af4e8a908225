//! The access log's lines, formatted straight into the log buffer, in the same text or JSON
//! layout as every other line of the proxy (tracing-subscriber's `Full` and `Json` formats:
//! a unit test holds the two to the same output).
//!
//! Why not a `tracing` event: through tracing-subscriber's generic visitor each field went
//! through `dyn Debug`, `fmt::Write` and padding one character at a time; the access line was
//! a third of the proxy's user-space instructions per HTTP request (callgrind, BENCHMARKS.md).
//! Here a field is a few appends. The level filter still decides (`RUST_LOG=access=off`, the
//! admin `/logging` endpoint): a line is only built when `tracing` would have emitted it.
use std::{
    fmt::{self, Write as _},
    net::SocketAddr,
    sync::OnceLock,
};

use tracing::Level;

use crate::{telemetry::log_buffer::BufferedStdout, telemetry::logging::LogFormat};

/// Where access lines go, set once by `logging::init` (never in component tests: no lines).
static SINK: OnceLock<(LogFormat, BufferedStdout)> = OnceLock::new();

pub fn install(format: LogFormat, output: BufferedStdout) {
    let _ = SINK.set((format, output));
}

/// One line being built; appended to the log buffer whole by [`AccessLine::emit`].
pub struct AccessLine {
    text: String,
    json: bool,
    urgent: bool,
}

impl AccessLine {
    /// A line at `level` with its message, or `None` when the access target is filtered out at
    /// that level (or logging was never set up).
    pub fn start(level: Level, message: fmt::Arguments<'_>) -> Option<AccessLine> {
        let enabled = match level {
            Level::WARN => tracing::enabled!(target: "access", Level::WARN),
            _ => tracing::enabled!(target: "access", Level::INFO),
        };
        let (format, _) = SINK.get().filter(|_| enabled)?;
        Some(AccessLine::new(
            *format == LogFormat::Json,
            level,
            message,
            time::OffsetDateTime::now_utc(),
        ))
    }

    fn new(
        json: bool,
        level: Level,
        message: fmt::Arguments<'_>,
        at: time::OffsetDateTime,
    ) -> Self {
        let mut line = AccessLine {
            text: String::with_capacity(640),
            json,
            urgent: level <= Level::WARN,
        };
        let text = &mut line.text;
        if json {
            text.push_str("{\"timestamp\":\"");
            push_timestamp(text, at);
            text.push_str("\",\"level\":\"");
            text.push_str(level.as_str());
            text.push_str("\",\"fields\":{\"message\":");
            match message.as_str() {
                Some(message) => push_json_string(text, message),
                None => push_json_string(text, &message.to_string()),
            }
        } else {
            push_timestamp(text, at);
            text.push_str(match level {
                Level::ERROR => " ERROR access: ",
                Level::WARN => "  WARN access: ",
                Level::INFO => "  INFO access: ",
                Level::DEBUG => " DEBUG access: ",
                Level::TRACE => " TRACE access: ",
            });
            let _ = text.write_fmt(message);
        }
        line
    }

    fn key(&mut self, key: &str) {
        if self.json {
            self.text.push_str(",\"");
            self.text.push_str(key);
            self.text.push_str("\":");
        } else {
            self.text.push(' ');
            self.text.push_str(key);
            self.text.push('=');
        }
    }

    /// A text field: quoted (and escaped) in both formats.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        if self.json {
            push_json_string(&mut self.text, value);
        } else {
            push_debug_string(&mut self.text, value);
        }
        self
    }

    /// A text field that is left out when absent (as `tracing` leaves out a `None`).
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.str(key, value);
        }
        self
    }

    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        push_decimal(&mut self.text, value);
        self
    }

    /// A value shown with `Display`: bare in text (`src=10.0.0.1:80`), a string in JSON.
    pub fn display(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.key(key);
        if self.json {
            let start = self.text.len();
            let _ = write!(self.text, "{value}");
            if needs_json_escape(&self.text[start..]) {
                let shown = self.text.split_off(start);
                push_json_string(&mut self.text, &shown);
            } else {
                self.text.insert(start, '"');
                self.text.push('"');
            }
        } else {
            let _ = write!(self.text, "{value}");
        }
        self
    }

    pub fn opt_display(&mut self, key: &str, value: Option<impl fmt::Display>) -> &mut Self {
        if let Some(value) = value {
            self.display(key, value);
        }
        self
    }

    /// An address, the commonest field: IPv4 written without `fmt`'s padding machinery.
    pub fn addr(&mut self, key: &str, value: SocketAddr) -> &mut Self {
        let SocketAddr::V4(v4) = value else {
            return self.display(key, value);
        };
        self.key(key);
        if self.json {
            self.text.push('"');
        }
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.text.push('.');
            }
            push_decimal(&mut self.text, u64::from(octet));
        }
        self.text.push(':');
        push_decimal(&mut self.text, u64::from(v4.port()));
        if self.json {
            self.text.push('"');
        }
        self
    }

    pub fn opt_addr(&mut self, key: &str, value: Option<SocketAddr>) -> &mut Self {
        if let Some(value) = value {
            self.addr(key, value);
        }
        self
    }

    /// Appends the line to the log buffer (written out at once for warnings).
    pub fn emit(mut self) {
        self.finish_text();
        if let Some((_, output)) = SINK.get() {
            output.append(self.text.as_bytes(), self.urgent);
        }
    }

    fn finish_text(&mut self) {
        if self.json {
            self.text.push_str("},\"target\":\"access\"}");
        }
        self.text.push('\n');
    }
}

fn push_decimal(text: &mut String, value: u64) {
    text.push_str(itoa::Buffer::new().format(value));
}

/// `2026-12-06T22:55:31.440816Z`, as tracing-subscriber's `SystemTime` timer writes it.
fn push_timestamp(text: &mut String, at: time::OffsetDateTime) {
    let padded = |text: &mut String, value: u32, width: usize| {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(value);
        text.extend(std::iter::repeat_n('0', width.saturating_sub(digits.len())));
        text.push_str(digits);
    };
    padded(text, u32::try_from(at.year()).unwrap_or(0), 4);
    text.push('-');
    padded(text, u8::from(at.month()).into(), 2);
    text.push('-');
    padded(text, at.day().into(), 2);
    text.push('T');
    padded(text, at.hour().into(), 2);
    text.push(':');
    padded(text, at.minute().into(), 2);
    text.push(':');
    padded(text, at.second().into(), 2);
    text.push('.');
    padded(text, at.microsecond(), 6);
    text.push('Z');
}

/// Printable ASCII other than a quote or a backslash is written as it is by both `{:?}` and
/// JSON; anything else takes the exact escaping of the format.
fn plain(byte: u8) -> bool {
    (0x20..0x7f).contains(&byte) && byte != b'"' && byte != b'\\'
}

fn needs_json_escape(value: &str) -> bool {
    !value.bytes().all(plain)
}

/// As tracing-subscriber writes a `&str` field in text: its `Debug` form.
fn push_debug_string(text: &mut String, value: &str) {
    if value.bytes().all(plain) {
        text.push('"');
        text.push_str(value);
        text.push('"');
    } else {
        let _ = write!(text, "{value:?}");
    }
}

/// As tracing-subscriber writes a string in JSON: serde_json's escaping.
fn push_json_string(text: &mut String, value: &str) {
    if value.bytes().all(plain) {
        text.push('"');
        text.push_str(value);
        text.push('"');
    } else {
        text.push_str(&serde_json::Value::from(value).to_string());
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{Ipv6Addr, SocketAddrV6},
        sync::{Arc, Mutex},
    };

    use super::*;

    /// What tracing-subscriber writes for an event, captured (without its timestamp).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn tracing_output(json: bool, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false);
        if json {
            tracing::subscriber::with_default(builder.json().finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    /// Both lines without their timestamps (which differ by when they were taken).
    fn without_timestamp(json: bool, line: &str) -> String {
        if json {
            let mut value: serde_json::Value = serde_json::from_str(line).expect(line);
            let stamp = value["timestamp"].as_str().expect("timestamp").to_owned();
            assert_eq!(stamp.len(), "2026-12-06T22:55:31.440816Z".len(), "{stamp}");
            value.as_object_mut().unwrap().remove("timestamp");
            value.to_string()
        } else {
            let (stamp, rest) = line.split_once(' ').expect(line);
            assert_eq!(stamp.len(), "2026-12-06T22:55:31.440816Z".len(), "{stamp}");
            rest.to_owned()
        }
    }

    #[test]
    fn lines_read_exactly_as_tracing_subscriber_writes_them() {
        let v4: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let v6 = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 15001, 0, 0));
        let awkward = "a \"quoted\" \\ path\twith\u{7f}, é and \u{1b}[31m";
        for json in [false, true] {
            for level in [Level::INFO, Level::WARN] {
                let expected = tracing_output(json, || match level {
                    Level::WARN => tracing::warn!(
                        target: "access",
                        src = %v4,
                        upstream = %v6,
                        path = awkward,
                        absent = Option::<&str>::None,
                        attempts = 3u64,
                        error = %"refused: \"no\"",
                        "{}", "request refused"
                    ),
                    _ => tracing::info!(
                        target: "access",
                        src = %v4,
                        upstream = %v6,
                        path = awkward,
                        absent = Option::<&str>::None,
                        attempts = 3u64,
                        error = %"refused: \"no\"",
                        "request refused"
                    ),
                });
                let mut line = AccessLine::new(
                    json,
                    level,
                    format_args!("request refused"),
                    time::OffsetDateTime::now_utc(),
                );
                line.addr("src", v4)
                    .addr("upstream", v6)
                    .str("path", awkward)
                    .opt_str("absent", None)
                    .u64("attempts", 3)
                    .display("error", "refused: \"no\"");
                line.finish_text();
                assert_eq!(
                    without_timestamp(json, &line.text),
                    without_timestamp(json, &expected),
                    "json: {json}, level: {level}"
                );
            }
        }
    }

    #[test]
    fn timestamps_read_as_tracing_subscriber_writes_them() {
        let at = time::Date::from_calendar_date(2026, time::Month::January, 2)
            .and_then(|date| date.with_hms_micro(3, 4, 5, 678))
            .expect("a valid date")
            .assume_utc();
        let mut text = String::new();
        push_timestamp(&mut text, at);
        assert_eq!(text, "2026-01-02T03:04:05.000678Z");
    }
}
