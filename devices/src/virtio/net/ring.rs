//! Used-ring writes and interrupt suppression, done here rather than with `Queue::add_used`.
//!
//! `add_used` publishes the used index with every entry. A frame spread over several receive
//! buffers (VIRTIO_NET_F_MRG_RXBUF) must appear to the driver all at once: a driver polling the ring
//! on another vCPU that sees the first buffer, whose header announces `num_buffers`, before the
//! others are published drops the frame as truncated. So entries are written first and the index is
//! published once per frame; and since `Queue::needs_notification` counts entries through
//! `add_used` only, the interrupt decision (VIRTIO_RING_F_EVENT_IDX's `used_event`, or the
//! `VRING_AVAIL_F_NO_INTERRUPT` flag without it) is made here too, over every entry added since the
//! previous decision.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes before the first element of the used ring (flags, idx).
const USED_RING_HEADER: u64 = 4;
/// Bytes of one used element (id, len).
const USED_ELEM: u64 = 8;
/// Bytes before the first element of the available ring (flags, idx).
const AVAIL_RING_HEADER: u64 = 4;

/// Why the used ring could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The head does not name a descriptor of this queue.
    #[error("descriptor head {0} out of range")]
    HeadOutOfRange(u16),
    /// The ring lies (partly) outside guest memory.
    #[error("used ring outside guest memory")]
    Memory,
}

/// Entries written to a queue's used ring but not yet published.
#[derive(Debug)]
pub struct UsedBatch {
    /// Index of the next entry to write.
    next: Wrapping<u16>,
}

impl UsedBatch {
    /// Starts after the entries `queue` has published.
    pub fn new(queue: &Queue) -> Self {
        UsedBatch {
            next: Wrapping(queue.next_used()),
        }
    }

    /// Writes one entry (not yet visible to the driver).
    pub fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &Queue,
        head: u16,
        len: u32,
    ) -> Result<(), RingError> {
        if head >= queue.size() {
            return Err(RingError::HeadOutOfRange(head));
        }
        let slot = u64::from(self.next.0 % queue.size());
        let addr = GuestAddress(queue.used_ring())
            .checked_add(USED_RING_HEADER + slot * USED_ELEM)
            .ok_or(RingError::Memory)?;
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr).map_err(|_| RingError::Memory)?;
        self.next += Wrapping(1);
        Ok(())
    }

    /// Makes every entry written so far visible to the driver.
    pub fn publish(&self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<(), RingError> {
        if self.next.0 == queue.next_used() {
            return Ok(());
        }
        let addr = GuestAddress(queue.used_ring())
            .checked_add(2)
            .ok_or(RingError::Memory)?;
        // Release: the entries must be visible before the index that covers them.
        mem.store(self.next.0.to_le(), addr, Ordering::Release)
            .map_err(|_| RingError::Memory)?;
        queue.set_next_used(self.next.0);
        Ok(())
    }
}

/// Whether the driver wants an interrupt for the entries published since `since` (the queue's
/// `next_used` at the previous decision). A ring that cannot be read gets one, to be safe.
pub fn needs_interrupt(mem: &GuestMemoryMmap, queue: &Queue, since: u16) -> bool {
    let new = Wrapping(queue.next_used());
    let old = Wrapping(since);
    if new == old {
        return false;
    }
    // The used index must be visible before the driver's suppression fields are read, or both
    // sides could decide the other will act.
    fence(Ordering::SeqCst);
    if queue.event_idx_enabled() {
        match used_event(mem, queue) {
            // virtio 1.2, 2.7.10: interrupt if used_event lies in [old, new).
            Some(event) => new - Wrapping(event) - Wrapping(1) < new - old,
            None => true,
        }
    } else {
        match mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Relaxed) {
            Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
            Err(_) => true,
        }
    }
}

/// Asks the driver to notify the queue when it adds another buffer, and returns the available
/// index as of afterwards, so the caller can tell whether buffers arrived in between.
///
/// With VIRTIO_RING_F_EVENT_IDX this sets `avail_event` to the driver's current available index
/// rather than to the device's position (which is what `Queue::enable_notification` does): when
/// the device stops with buffers still in the ring (too few for a frame, or a frame the tap would
/// not take), the driver is already past its position and would never notify.
pub fn request_notification(mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<u16, RingError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| RingError::Memory)?;
    if queue.event_idx_enabled() {
        let addr = GuestAddress(queue.used_ring())
            .checked_add(USED_RING_HEADER + USED_ELEM * u64::from(queue.size()))
            .ok_or(RingError::Memory)?;
        mem.store(avail.0.to_le(), addr, Ordering::Release)
            .map_err(|_| RingError::Memory)?;
    } else {
        queue.enable_notification(mem).map_err(|_| RingError::Memory)?;
    }
    // The request must be visible before the index is read again, or a buffer added in between
    // could go unnoticed by both sides.
    fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| idx.0)
        .map_err(|_| RingError::Memory)
}

/// Whether the driver has not yet taken every used entry published, as far as the ring tells
/// (VIRTIO_RING_F_EVENT_IDX only). A driver that re-enables interrupts writes `used_event` = the
/// next entry it will look at, which equals the used index only once it has caught up; a Linux
/// driver that is polling writes 0 there. False without EVENT_IDX or if the ring cannot be read.
pub fn driver_behind(mem: &GuestMemoryMmap, queue: &Queue) -> bool {
    if !queue.event_idx_enabled() {
        return false;
    }
    fence(Ordering::SeqCst);
    used_event(mem, queue).is_some_and(|event| event != queue.next_used())
}

/// The driver's `used_event` (VIRTIO_RING_F_EVENT_IDX), the field after the available ring's
/// entries; `None` if the ring cannot be read.
fn used_event(mem: &GuestMemoryMmap, queue: &Queue) -> Option<u16> {
    GuestAddress(queue.avail_ring())
        .checked_add(AVAIL_RING_HEADER + 2 * u64::from(queue.size()))
        .and_then(|addr| mem.load::<u16>(addr, Ordering::Relaxed).ok())
        .map(u16::from_le)
}
