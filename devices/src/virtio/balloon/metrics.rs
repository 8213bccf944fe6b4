//! The balloon's counters, shared with whoever reports them (metrics, `balloon-stats`).

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_api::balloon::BalloonCounters;

/// Counters updated by the device as it works.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Pages the guest put in the balloon.
    pub inflated_pages: AtomicU64,
    /// Pages the guest took back.
    pub deflated_pages: AtomicU64,
    /// Free page report buffers served.
    pub reports: AtomicU64,
    /// Bytes of reported free memory released.
    pub reported_bytes: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
    /// Page numbers or ranges outside guest RAM.
    pub invalid_pages: AtomicU64,
    /// Malformed buffers or descriptors.
    pub invalid_requests: AtomicU64,
    /// Failed `madvise` calls.
    pub release_errors: AtomicU64,
    /// Interrupts sent to the guest (see [`crate::virtio::net::NetMetrics::interrupts`]).
    pub interrupts: AtomicU64,
    /// Queue notifications and timer ticks handled.
    pub events: AtomicU64,
}

impl BalloonMetrics {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// The counters now, as the control socket reports them.
    pub fn snapshot(&self) -> BalloonCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BalloonCounters {
            inflated_pages: get(&self.inflated_pages),
            deflated_pages: get(&self.deflated_pages),
            reports: get(&self.reports),
            reported_bytes: get(&self.reported_bytes),
            stats_updates: get(&self.stats_updates),
            invalid_pages: get(&self.invalid_pages),
            invalid_requests: get(&self.invalid_requests),
            release_errors: get(&self.release_errors),
            interrupts: get(&self.interrupts),
        }
    }
}
