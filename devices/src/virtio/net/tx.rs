//! The transmit path: frames from the guest's transmit chains to the tap.
//!
//! Each chain (virtio-net header, then the frame, in readable descriptors only) becomes one `writev`
//! whose iovecs point into guest memory, so nothing is copied in user space. A chain that breaks the
//! rules is dropped, counted and returned to the guest with length 0, and the next one is served.
//!
//! When the tap answers `EAGAIN` the chain stays in the ring (the driver still owns nothing new) and
//! the pass ends; the next transmit notification or the tap's next writable edge retries it. A
//! zero-timeout `poll` for writability right after the `EAGAIN` both catches room that appeared
//! meanwhile and, in the tun driver, requests the write-space wake-up that produces that edge.

use std::io;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::Active;
use super::metrics::NetMetrics;
use super::ring::{needs_interrupt, request_notification, UsedBatch};
use super::tap::{TapIo, TxFrame, TxFrameError};
use super::{admit, bump, log_every, refund, HDR_LEN, MAX_FRAME_LEN};
use crate::rate_limiter::RateLimiter;

/// Chains taken (sent or dropped) in one pass before the device yields to the rest of the event
/// loop.
pub const TX_BUDGET: usize = 256;

/// Why a transmit pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStop {
    /// The ring is empty and notifications are enabled again.
    Done,
    /// The rate limiter is short; its timer resumes.
    Throttled,
    /// The tap is full; its writable edge or the next notification resumes.
    TapFull,
    /// The budget is spent; the caller must schedule another pass.
    Budget,
}

/// Why a chain was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    /// The chain breaks the rules.
    #[error("{0}")]
    Malformed(&'static str),
    /// Header and frame exceed [`MAX_FRAME_LEN`].
    #[error("longer than {MAX_FRAME_LEN} bytes")]
    Oversized,
}

/// The transmit side's scratch space, kept across passes so that the hot path does not allocate.
#[derive(Debug, Default)]
pub struct TxState {
    frame: TxFrame,
}

/// Sends frames until the ring is empty or there is a reason to stop, then interrupts the guest
/// once if it asked for it.
pub fn process(
    tx: &mut TxState,
    active: &mut Active,
    tap: &mut dyn TapIo,
    limiter: &mut RateLimiter,
    metrics: &NetMetrics,
) -> TxStop {
    let since = active.tx.next_used();
    let mut batch = UsedBatch::new(&active.tx);
    let stop = run(tx, active, &mut batch, tap, limiter, metrics);
    if let Err(e) = batch.publish(&active.mem, &mut active.tx) {
        log::warn!("net {}: transmit queue: {e}", tap.name());
    }
    if needs_interrupt(&active.mem, &active.tx, since) && active.interrupt.signal_used_queue() {
        NetMetrics::inc(&metrics.interrupts);
    }
    stop
}

fn run(
    tx: &mut TxState,
    active: &mut Active,
    batch: &mut UsedBatch,
    tap: &mut dyn TapIo,
    limiter: &mut RateLimiter,
    metrics: &NetMetrics,
) -> TxStop {
    let mem = &active.mem;
    let queue = &mut active.tx;
    let mut chains = 0usize;
    let mut retried = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("net {}: {e}", tap.name());
        }
        // A driver whose available index runs more than a ring ahead has broken its ring: serve
        // nothing until it resets the device (otherwise "more is available" would never end).
        if let Err(e) = queue.iter(mem) {
            let n = bump(&metrics.tx_malformed_chains);
            log_every(n, || format!("net {}: transmit queue: {e}", tap.name()));
            return TxStop::Done;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            // Every chain counts, sent or dropped: a driver adding bad chains as fast as they are
            // returned must not hold the event loop either.
            if chains == TX_BUDGET {
                queue.go_to_previous_position();
                return TxStop::Budget;
            }
            chains += 1;
            let head = chain.head_index();
            if let Err(why) = gather(chain, mem, &mut tx.frame) {
                let counter = match why {
                    TxDrop::Malformed(_) => &metrics.tx_malformed_chains,
                    TxDrop::Oversized => &metrics.tx_dropped_oversized,
                };
                let n = bump(counter);
                log_every(n, || format!("net {}: transmit chain {head}: {why}", tap.name()));
                return_chain(batch, mem, queue, head, tap.name());
                continue;
            }
            let bytes = (tx.frame.len() - HDR_LEN) as u64;
            if !admit(limiter, bytes) {
                queue.go_to_previous_position();
                NetMetrics::inc(&metrics.tx_throttled);
                return TxStop::Throttled;
            }
            match tap.write_frame(&tx.frame) {
                Ok(_) => {
                    NetMetrics::inc(&metrics.tx_frames);
                    NetMetrics::add(&metrics.tx_bytes, bytes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    refund(limiter, bytes);
                    queue.go_to_previous_position();
                    NetMetrics::inc(&metrics.tx_tap_full);
                    if !retried && super::tap::writable_now(tap.as_raw_fd()) {
                        retried = true;
                        continue;
                    }
                    // Let the driver's next notification retry too.
                    if let Err(e) = request_notification(mem, queue) {
                        log::warn!("net {}: transmit queue: {e}", tap.name());
                    }
                    return TxStop::TapFull;
                }
                Err(e) => {
                    let n = bump(&metrics.tx_tap_errors);
                    log_every(n, || format!("net {}: tap write: {e}", tap.name()));
                }
            }
            return_chain(batch, mem, queue, head, tap.name());
        }
        // Re-enable notifications, then look again: a chain added in between would otherwise wait
        // for a notification the driver will not send.
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return TxStop::Done,
            Err(e) => {
                log::warn!("net {}: {e}", tap.name());
                return TxStop::Done;
            }
        }
    }
}

/// Returns a transmit chain to the driver (the device writes nothing into it, so the length is 0).
fn return_chain(
    batch: &mut UsedBatch,
    mem: &GuestMemoryMmap,
    queue: &virtio_queue::Queue,
    head: u16,
    name: &str,
) {
    if let Err(e) = batch.push(mem, queue, head, 0) {
        log::warn!("net {name}: cannot return transmit chain: {e}");
    }
}

/// Turns a transmit chain into iovecs over guest memory, checking everything the guest controls.
pub fn gather(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    frame: &mut TxFrame,
) -> Result<(), TxDrop> {
    frame.clear();
    let mut total = 0u64;
    let mut any = false;
    let mut cut_short = false;
    for desc in chain {
        any = true;
        if desc.is_write_only() {
            return Err(TxDrop::Malformed("writable descriptor in a transmit chain"));
        }
        total += u64::from(desc.len());
        if total > MAX_FRAME_LEN as u64 {
            return Err(TxDrop::Oversized);
        }
        if desc.len() > 0 {
            frame
                .push_guest(mem, desc.addr(), desc.len())
                .map_err(|e| match e {
                    TxFrameError::OutsideMemory => TxDrop::Malformed("buffer outside guest memory"),
                    TxFrameError::TooManyPieces => TxDrop::Malformed("too many buffer pieces"),
                })?;
        }
        cut_short = desc.has_next();
    }
    if !any {
        return Err(TxDrop::Malformed("no descriptors (bad head or indirect table)"));
    }
    if cut_short {
        return Err(TxDrop::Malformed("chain cut short (loop or bad next index)"));
    }
    if total < HDR_LEN as u64 {
        return Err(TxDrop::Malformed("shorter than the virtio-net header"));
    }
    Ok(())
}
