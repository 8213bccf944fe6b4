//! Per-NIC counters, updated by the device and read by the rest of the VMM at any time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one NIC. Cheap to update (relaxed atomics) and shared through an `Arc`.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (Ethernet frames, without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames from the tap merged into the TCP segment before them (see `coalesce`): they reached
    /// the guest inside another frame, so `rx_frames` does not count them.
    pub rx_coalesced: AtomicU64,
    /// Frames from the tap dropped because the guest could not take them whole (larger than its buffers or than [`MAX_FRAME_LEN`](super::MAX_FRAME_LEN)); never truncated.
    pub rx_dropped_oversized: AtomicU64,
    /// Frames from the tap dropped because they carried an offload the guest did not accept.
    pub rx_dropped_offload: AtomicU64,
    /// Receive descriptor chains refused as malformed (readable descriptors, outside guest memory, smaller than the header, truncated) and returned unused.
    pub rx_malformed_chains: AtomicU64,
    /// Times frames had to wait because the guest had posted no (or too few) receive buffers.
    pub rx_no_buffers: AtomicU64,
    /// Tap reads that failed (other than `EAGAIN`).
    pub rx_tap_errors: AtomicU64,
    /// Times the receive rate limiter held frames back.
    pub rx_throttled: AtomicU64,
    /// Frames sent to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes sent to the tap (Ethernet frames, without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped for being longer than [`MAX_FRAME_LEN`](super::MAX_FRAME_LEN).
    pub tx_dropped_oversized: AtomicU64,
    /// Transmit chains dropped as malformed (writable descriptors, outside guest memory, shorter than the header, truncated, too many pieces).
    pub tx_malformed_chains: AtomicU64,
    /// Frames the tap refused with an error other than `EAGAIN` (dropped and counted).
    pub tx_tap_errors: AtomicU64,
    /// Times the tap answered `EAGAIN`: the frame waits for the tap to become writable.
    pub tx_tap_full: AtomicU64,
    /// Times the transmit rate limiter held frames back.
    pub tx_throttled: AtomicU64,
    /// Receive queue notifications handled (including the ones the device sends itself when a pass
    /// used up its budget).
    pub rx_queue_events: AtomicU64,
    /// Transmit queue notifications handled (including the ones the device sends itself when a pass
    /// used up its budget).
    pub tx_queue_events: AtomicU64,
    /// Tap readiness events handled.
    pub tap_events: AtomicU64,
    /// Interrupts sent to the guest for used buffers. Used buffers published while the driver has
    /// not acknowledged the last interrupt join it and are not counted again.
    pub interrupts: AtomicU64,
}

/// A point-in-time copy of [`NetMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetMetricsSnapshot {
    /// See [`NetMetrics::rx_frames`].
    pub rx_frames: u64,
    /// See [`NetMetrics::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`NetMetrics::rx_coalesced`].
    pub rx_coalesced: u64,
    /// See [`NetMetrics::rx_dropped_oversized`].
    pub rx_dropped_oversized: u64,
    /// See [`NetMetrics::rx_dropped_offload`].
    pub rx_dropped_offload: u64,
    /// See [`NetMetrics::rx_malformed_chains`].
    pub rx_malformed_chains: u64,
    /// See [`NetMetrics::rx_no_buffers`].
    pub rx_no_buffers: u64,
    /// See [`NetMetrics::rx_tap_errors`].
    pub rx_tap_errors: u64,
    /// See [`NetMetrics::rx_throttled`].
    pub rx_throttled: u64,
    /// See [`NetMetrics::tx_frames`].
    pub tx_frames: u64,
    /// See [`NetMetrics::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`NetMetrics::tx_dropped_oversized`].
    pub tx_dropped_oversized: u64,
    /// See [`NetMetrics::tx_malformed_chains`].
    pub tx_malformed_chains: u64,
    /// See [`NetMetrics::tx_tap_errors`].
    pub tx_tap_errors: u64,
    /// See [`NetMetrics::tx_tap_full`].
    pub tx_tap_full: u64,
    /// See [`NetMetrics::tx_throttled`].
    pub tx_throttled: u64,
    /// See [`NetMetrics::rx_queue_events`].
    pub rx_queue_events: u64,
    /// See [`NetMetrics::tx_queue_events`].
    pub tx_queue_events: u64,
    /// See [`NetMetrics::tap_events`].
    pub tap_events: u64,
    /// See [`NetMetrics::interrupts`].
    pub interrupts: u64,
}

impl NetMetricsSnapshot {
    /// Frames dropped in either direction, for whatever reason.
    pub fn dropped(&self) -> u64 {
        self.rx_dropped_oversized
            + self.rx_dropped_offload
            + self.tx_dropped_oversized
            + self.tx_malformed_chains
            + self.tx_tap_errors
    }

    /// Times either rate limiter held frames back.
    pub fn throttled(&self) -> u64 {
        self.rx_throttled + self.tx_throttled
    }
}

impl NetMetrics {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetricsSnapshot {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_coalesced: get(&self.rx_coalesced),
            rx_dropped_oversized: get(&self.rx_dropped_oversized),
            rx_dropped_offload: get(&self.rx_dropped_offload),
            rx_malformed_chains: get(&self.rx_malformed_chains),
            rx_no_buffers: get(&self.rx_no_buffers),
            rx_tap_errors: get(&self.rx_tap_errors),
            rx_throttled: get(&self.rx_throttled),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped_oversized: get(&self.tx_dropped_oversized),
            tx_malformed_chains: get(&self.tx_malformed_chains),
            tx_tap_errors: get(&self.tx_tap_errors),
            tx_tap_full: get(&self.tx_tap_full),
            tx_throttled: get(&self.tx_throttled),
            rx_queue_events: get(&self.rx_queue_events),
            tx_queue_events: get(&self.tx_queue_events),
            tap_events: get(&self.tap_events),
            interrupts: get(&self.interrupts),
        }
    }
}
