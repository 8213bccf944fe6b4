//! Line-by-line capture of a child process's stdout and stderr, timestamped as each line arrives.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The process's stdout (for `vmm --serial stdout` and QEMU `-serial stdio`: the guest console).
    Stdout,
    /// The process's stderr (the VMM's own logs).
    Stderr,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

/// One line of output, without its line terminator (`\n` or `\r\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The stream it was read from.
    pub stream: Stream,
    /// When the reader thread got it from the pipe.
    pub at: Instant,
    /// Its text; invalid UTF-8 is replaced with U+FFFD.
    pub text: String,
}

/// Called by the reader thread with the process id and each line, before the line becomes visible to
/// [`crate::Guest::wait_for_line`]: use it to act on a line with as little delay as possible (the
/// boot bench samples the VMM's memory the moment `BOOT-COMPLETE` is printed). Keep it short: the
/// reader does not read further output while the hook runs.
pub type LineHook = Arc<dyn Fn(u32, &Line) + Send + Sync>;

/// Why a wait for a line ended without a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitFailure {
    /// The timeout passed.
    Timeout,
    /// Both streams reached end of file (the process exited or closed them).
    Ended,
}

#[derive(Default)]
struct LogState {
    lines: Vec<Line>,
    open_streams: usize,
}

/// The shared, growing log of both streams, with a condition variable signalled on every new line.
pub(crate) struct OutputLog {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl OutputLog {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(OutputLog {
            state: Mutex::new(LogState::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A panicking hook poisons nothing we care about: the Vec is always in a valid state.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of every line so far, in arrival order.
    pub(crate) fn lines(&self) -> Vec<Line> {
        self.lock().lines.clone()
    }

    /// Waits until a line satisfies `matches` (lines already logged count), or the timeout passes, or
    /// all streams are closed.
    pub(crate) fn wait_for(
        &self,
        matches: impl Fn(&Line) -> bool,
        timeout: Duration,
    ) -> Result<Line, WaitFailure> {
        let deadline = Instant::now() + timeout;
        let mut checked = 0;
        let mut state = self.lock();
        loop {
            if let Some(line) = state.lines[checked..].iter().find(|l| matches(l)) {
                return Ok(line.clone());
            }
            checked = state.lines.len();
            if state.open_streams == 0 {
                return Err(WaitFailure::Ended);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitFailure::Timeout);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Starts a thread that reads `reader` line by line into this log until end of file.
    pub(crate) fn spawn_reader<R: Read + Send + 'static>(
        self: &Arc<Self>,
        reader: R,
        stream: Stream,
        pid: u32,
        hook: Option<LineHook>,
    ) -> std::io::Result<JoinHandle<()>> {
        self.lock().open_streams += 1;
        let log = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("{stream}-{pid}"))
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(strip_terminator(&buf)).into_owned();
                    let line = Line { stream, at, text };
                    if let Some(hook) = &hook {
                        hook(pid, &line);
                    }
                    log.lock().lines.push(line);
                    log.changed.notify_all();
                }
                log.lock().open_streams -= 1;
                log.changed.notify_all();
            });
        if spawned.is_err() {
            self.lock().open_streams -= 1;
        }
        spawned
    }
}

fn strip_terminator(buf: &[u8]) -> &[u8] {
    let buf = buf.strip_suffix(b"\n").unwrap_or(buf);
    buf.strip_suffix(b"\r").unwrap_or(buf)
}

/// The last `n` lines, one per row, as `+SECONDS stream| text` relative to `since`.
pub(crate) fn format_tail(lines: &[Line], n: usize, since: Instant) -> String {
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    for line in &lines[start..] {
        let secs = line.at.saturating_duration_since(since).as_secs_f64();
        out.push_str(&format!("  +{secs:8.3}s {}| {}\n", line.stream, line.text));
    }
    if lines.is_empty() {
        out.push_str("  (no output)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn reads_lines_and_strips_terminators() {
        let log = OutputLog::new();
        let seen = Arc::new(AtomicUsize::new(0));
        let seen2 = Arc::clone(&seen);
        let hook: LineHook = Arc::new(move |pid, _line| {
            assert_eq!(pid, 7);
            seen2.fetch_add(1, Ordering::SeqCst);
        });
        let out = Cursor::new(b"one\r\ntwo\n\xffbad\nlast-no-newline".to_vec());
        let err = Cursor::new(b"log line\n".to_vec());
        let h1 = log.spawn_reader(out, Stream::Stdout, 7, Some(hook)).unwrap();
        let h2 = log.spawn_reader(err, Stream::Stderr, 7, None).unwrap();
        h1.join().unwrap();
        h2.join().unwrap();
        let texts: Vec<_> = log
            .lines()
            .into_iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.text)
            .collect();
        assert_eq!(texts, ["one", "two", "\u{fffd}bad", "last-no-newline"]);
        assert_eq!(seen.load(Ordering::SeqCst), 4);
        let found = log
            .wait_for(|l| l.text.contains("log"), Duration::from_secs(1))
            .unwrap();
        assert_eq!(found.stream, Stream::Stderr);
        // Both streams are closed: a missing line ends the wait at once.
        let missing = log.wait_for(|l| l.text == "nope", Duration::from_secs(60));
        assert_eq!(missing, Err(WaitFailure::Ended));
    }

    #[test]
    fn wait_times_out_while_stream_open() {
        let log = OutputLog::new();
        // A reader that blocks until the sender is dropped, then reports end of file.
        struct Blocking(std::sync::mpsc::Receiver<()>);
        impl Read for Blocking {
            fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Ok(0)
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let h = log.spawn_reader(Blocking(rx), Stream::Stdout, 1, None).unwrap();
        let started = Instant::now();
        let r = log.wait_for(|_| true, Duration::from_millis(50));
        assert_eq!(r, Err(WaitFailure::Timeout));
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(tx);
        h.join().unwrap();
        assert_eq!(
            log.wait_for(|_| true, Duration::from_secs(60)),
            Err(WaitFailure::Ended)
        );
    }

    #[test]
    fn tail_formats_last_lines() {
        let t0 = Instant::now();
        let lines: Vec<Line> = (0..5)
            .map(|i| Line {
                stream: Stream::Stdout,
                at: t0,
                text: format!("l{i}"),
            })
            .collect();
        let tail = format_tail(&lines, 2, t0);
        assert!(
            !tail.contains("l2") && tail.contains("l3") && tail.contains("l4"),
            "{tail}"
        );
        assert!(format_tail(&[], 2, t0).contains("no output"));
    }
}
