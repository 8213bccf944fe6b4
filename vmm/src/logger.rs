//! The process logger: `vmm: LEVEL: message` lines on stderr, rate limited.
//!
//! Some log sites can be reached by a guest (a device refusing its input, say). A guest that hammers
//! them must not be able to flood the host's logs or disk, so every line spends a token from a bucket
//! that refills at [`LINES_PER_SECOND`]; lines beyond that are counted and reported once the bucket
//! refills.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Sustained log lines per second.
pub const LINES_PER_SECOND: f64 = 20.0;
/// Lines that may be logged in a burst.
pub const BURST_LINES: f64 = 100.0;

/// Installs the logger at the level named by `VMM_LOG` (`error`, `warn`, `info`, `debug`, `trace`;
/// default `warn`).
pub fn init() {
    let level = std::env::var("VMM_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LevelFilter::Warn);
    let logger = Box::new(StderrLogger {
        bucket: Mutex::new(Bucket::new(Instant::now())),
    });
    if log::set_logger(Box::leak(logger)).is_ok() {
        log::set_max_level(level);
    }
}

struct StderrLogger {
    bucket: Mutex<Bucket>,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let suppressed = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            match bucket.take(Instant::now()) {
                Some(suppressed) => suppressed,
                None => return,
            }
        };
        let mut err = std::io::stderr().lock();
        if suppressed > 0 {
            let _ = writeln!(err, "vmm: warn: {suppressed} log lines suppressed (rate limit)");
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        let _ = writeln!(err, "vmm: {level}: {}", record.args());
    }

    fn flush(&self) {}
}

/// A token bucket of log lines.
struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket {
            tokens: BURST_LINES,
            last: now,
            suppressed: 0,
        }
    }

    /// Spends a token: `Some(lines suppressed since the last allowed one)`, or `None` to drop this line.
    fn take(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * LINES_PER_SECOND).min(BURST_LINES);
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_then_limits_then_reports_what_it_dropped() {
        let start = Instant::now();
        let mut bucket = Bucket::new(start);
        let allowed = (0..1000).filter(|_| bucket.take(start).is_some()).count();
        assert_eq!(allowed as f64, BURST_LINES);
        // One second later there are tokens again, and the first line reports the drops.
        assert_eq!(
            bucket.take(start + Duration::from_secs(1)),
            Some(1000 - BURST_LINES as u64)
        );
        assert_eq!(bucket.take(start + Duration::from_secs(1)), Some(0));
    }
}
