//! Log lines to stdout through one buffer, written out when a worker thread has nothing left
//! to do (tokio's park hook), when it fills, at once for warnings and errors, when the proxy
//! exits, and at the latest every [`FLUSH_INTERVAL`].
//!
//! Why: with the access log on, a `write` per request (and the wake-up of whatever reads the
//! container's log pipe) was a tenth of the proxy's CPU per HTTP request. Under load the
//! worker seldom parks, so lines leave in batches; idle, they leave at once. Envoy buffers its
//! access logs for up to 1 s (`file_flush_interval_msec`). A line is never dropped: a full
//! buffer is written out where the line is logged.
use std::{
    io::{self, BufWriter, Stdout, Write},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::Duration,
};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How long an informational line may wait in the buffer while the workers stay busy.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// About two hundred access lines per `write`.
const BUFFER_BYTES: usize = 64 * 1024;

/// The shared buffer, cloned into the subscriber and the flushing thread.
#[derive(Clone)]
pub struct BufferedStdout(Arc<Mutex<BufWriter<Stdout>>>);

impl BufferedStdout {
    /// The buffer, and a thread that writes it out every [`FLUSH_INTERVAL`] for the life of
    /// the process.
    pub fn start() -> io::Result<BufferedStdout> {
        let buffer = BufferedStdout(Arc::new(Mutex::new(BufWriter::with_capacity(
            BUFFER_BYTES,
            io::stdout(),
        ))));
        let flushed = buffer.clone();
        thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    thread::sleep(FLUSH_INTERVAL);
                    flushed.flush_now();
                }
            })?;
        Ok(buffer)
    }

    /// Writes out what is buffered (a worker going idle, the proxy ending).
    pub fn flush_now(&self) {
        let mut out = self.lock();
        if !out.buffer().is_empty() {
            let _ = out.flush();
        }
    }

    /// Appends whole lines formatted elsewhere (the access log), written out at once if
    /// `urgent`.
    pub fn append(&self, lines: &[u8], urgent: bool) {
        let mut out = self.lock();
        let _ = out.write_all(lines);
        if urgent {
            let _ = out.flush();
        }
    }

    fn lock(&self) -> MutexGuard<'_, BufWriter<Stdout>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes out what is buffered when dropped: held by the proxy until it ends.
pub struct FlushAtExit(BufferedStdout);

impl BufferedStdout {
    pub fn flush_at_exit(&self) -> FlushAtExit {
        FlushAtExit(self.clone())
    }
}

impl Drop for FlushAtExit {
    fn drop(&mut self) {
        self.0.flush_now();
    }
}

/// One event's line: appended under the lock, written out at once for warnings and errors.
pub struct Line<'a> {
    out: MutexGuard<'a, BufWriter<Stdout>>,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.out.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.urgent {
            let _ = self.out.flush();
        }
    }
}

impl<'a> MakeWriter<'a> for BufferedStdout {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            out: self.lock(),
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        Line {
            out: self.lock(),
            urgent: *meta.level() <= Level::WARN,
        }
    }
}
