//! virtio-net on a TAP interface (virtio 1.2, section 5.1).
//!
//! `tap` opens and configures the back end, `rx` and `tx` move frames in each direction (`rx`
//! merging consecutive TCP segments with `coalesce`), `ring`
//! writes used entries and decides on interrupts, `device` ties them to the transport, and
//! `metrics` counts what happened. Every frame on either side is preceded by the 12-byte
//! `virtio_net_hdr_v1`; the tap is configured with the same header, so it passes through unchanged
//! apart from `num_buffers`.
//!
//! # Using it in the VMM
//!
//! 1. Get a back end: [`Tap::open`] for a named tap (needs CAP_NET_ADMIN unless the tap is
//!    persistent and owned by the caller), or [`Tap::from_fd`] for one a supervisor opened.
//! 2. [`Net::new`] with a [`NetSpec`] (id, tap, guest MAC, one [`RateLimiter`] per direction).
//! 3. Put it behind an [`MmioTransport`](crate::virtio::mmio::MmioTransport) like any virtio
//!    device: its two queue eventfds ([`RX_QUEUE`], [`TX_QUEUE`]) become ioeventfds on QueueNotify
//!    with their queue index as datamatch, and the transport registered with the event manager
//!    watches every [`EventSource`](crate::virtio::EventSource) the device names: the two queue
//!    eventfds and both limiters' timerfds level-triggered, the tap edge-triggered for readable
//!    and writable (see `rx` for why).
//! 4. At run time: [`Net::update_rate_limiters`], [`Net::set_link_up`], [`Net::metrics`].
//!
//! Activation and reset run on the vCPU thread that writes the status register: they set the
//! tap's offloads (`TUNSETOFFLOAD`) and may move frames (`read`, `writev`, `poll`), like event
//! handling on the event loop thread.

mod coalesce;
mod device;
pub mod metrics;
mod pace;
mod ring;
mod rx;
pub mod tap;
mod tx;

#[cfg(test)]
mod real_tap_tests;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_tap;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};

pub use device::{
    Net, NetError, NetSpec, NetState, QUEUE_SIZE, RX_QUEUE, TOKEN_RX_HOLD, TOKEN_RX_LIMITER, TOKEN_RX_QUEUE,
    TOKEN_TAP, TOKEN_TX_LIMITER, TOKEN_TX_QUEUE, TX_QUEUE,
};
pub use metrics::{NetMetrics, NetMetricsSnapshot};
pub use tap::{Tap, TapError, TapIo, TxFrame};

use crate::rate_limiter::{RateLimiter, TokenType};

/// Size of the virtio-net header on both sides (`virtio_net_hdr_v1`, with `num_buffers`).
pub const HDR_LEN: usize = 12;
/// The largest frame either way, header included: a 64 KiB segmentation-offload packet, its
/// Ethernet header and the virtio-net header (12 + 14 + 65536).
pub const MAX_FRAME_LEN: usize = 65562;

/// Charges one frame of `bytes` to a limiter; false if it must wait for the limiter's timer.
fn admit(limiter: &mut RateLimiter, bytes: u64) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if !limiter.consume(bytes, TokenType::Bytes) {
        // The frame will be retried in full, so its operation must not count twice.
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// Gives back what [`admit`] took for a frame that then did not go through.
fn refund(limiter: &mut RateLimiter, bytes: u64) {
    limiter.manual_replenish(1, TokenType::Ops);
    limiter.manual_replenish(bytes, TokenType::Bytes);
}

/// Adds one to `counter` and returns the new value.
fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}

/// Logs the `n`th occurrence of something the guest or the network can repeat at will only when
/// `n` is a power of two, so that a flood costs a few dozen log lines, not a full disk.
fn log_every(n: u64, message: impl FnOnce() -> String) {
    if n.is_power_of_two() {
        log::warn!("{} (occurrence {n})", message());
    }
}
