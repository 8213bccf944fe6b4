//! Per-drive counters, updated by the device and read by the rest of the VMM at any time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one drive. Cheap to update (relaxed atomics) and shared through an `Arc`.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Read requests completed successfully.
    pub reads: AtomicU64,
    /// Write requests completed successfully.
    pub writes: AtomicU64,
    /// Flush requests completed successfully.
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests completed successfully.
    pub discards: AtomicU64,
    /// GET_ID requests answered.
    pub get_ids: AtomicU64,
    /// Bytes read into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest.
    pub write_bytes: AtomicU64,
    /// Requests refused as malformed or unsupported.
    pub invalid_requests: AtomicU64,
    /// Requests that failed on the host (I/O errors).
    pub io_errors: AtomicU64,
    /// Times the rate limiter held requests back.
    pub throttled: AtomicU64,
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Interrupts sent to the guest. Used buffers published while the driver has not acknowledged
    /// the last interrupt join it and are not counted again.
    pub interrupts: AtomicU64,
}

/// A point-in-time copy of [`BlockMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockMetricsSnapshot {
    /// See [`BlockMetrics::reads`].
    pub reads: u64,
    /// See [`BlockMetrics::writes`].
    pub writes: u64,
    /// See [`BlockMetrics::flushes`].
    pub flushes: u64,
    /// See [`BlockMetrics::discards`].
    pub discards: u64,
    /// See [`BlockMetrics::get_ids`].
    pub get_ids: u64,
    /// See [`BlockMetrics::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlockMetrics::write_bytes`].
    pub write_bytes: u64,
    /// See [`BlockMetrics::invalid_requests`].
    pub invalid_requests: u64,
    /// See [`BlockMetrics::io_errors`].
    pub io_errors: u64,
    /// See [`BlockMetrics::throttled`].
    pub throttled: u64,
    /// See [`BlockMetrics::queue_events`].
    pub queue_events: u64,
    /// See [`BlockMetrics::interrupts`].
    pub interrupts: u64,
}

impl BlockMetrics {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            get_ids: get(&self.get_ids),
            read_bytes: get(&self.read_bytes),
            write_bytes: get(&self.write_bytes),
            invalid_requests: get(&self.invalid_requests),
            io_errors: get(&self.io_errors),
            throttled: get(&self.throttled),
            queue_events: get(&self.queue_events),
            interrupts: get(&self.interrupts),
        }
    }
}
