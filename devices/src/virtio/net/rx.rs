//! The receive path: frames from the tap into the guest's receive buffers.
//!
//! The tap is watched edge-triggered, so every pass reads it until `EAGAIN` unless it has a reason
//! to stop, and each reason to stop has its own wake-up: no guest buffers (the receive queue's next
//! notification), the rate limiter (its timer), the per-pass budget (a notification the device sends
//! itself), pause (resume). At most two frames are held between passes: the one read from the tap
//! that could not be delivered yet and, when consecutive TCP segments were being merged into it
//! (`coalesce`), the first frame behind it that did not continue it. Frames are copied from those
//! buffers into guest memory; a frame the guest cannot take whole is dropped and counted, never
//! truncated.

use std::io;
use std::ops::Range;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::coalesce;
use super::device::Active;
use super::metrics::NetMetrics;
use super::pace::Pace;
use super::ring::{driver_behind, needs_interrupt, request_notification, RingError, UsedBatch};
use super::tap::{TapIo, MAX_IOVECS};
use super::{admit, bump, log_every, refund, HDR_LEN, MAX_FRAME_LEN};
use crate::rate_limiter::RateLimiter;
use crate::virtio::feature;

/// Frames taken from the tap (delivered or dropped) in one pass before the device yields to the
/// rest of the event loop.
pub const RX_BUDGET: usize = 256;
/// Consecutive failed tap reads after which a pass gives up (until the next event).
const MAX_READ_ERRORS: usize = 8;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The longest one frame is held back.
pub(super) const MAX_HOLD: Duration = Duration::from_millis(25);
/// How often a held frame looks again whether the guest has caught up.
pub const HOLD_CHECK: Duration = Duration::from_micros(250);

/// Why a receive pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStop {
    /// The tap has nothing more; its next frame raises an (edge-triggered) event.
    TapDrained,
    /// The guest has no room; its next receive notification resumes.
    NoBuffers,
    /// The rate limiter is short; its timer resumes.
    Throttled,
    /// The budget is spent; the caller must schedule another pass.
    Budget,
    /// A TCP segment is held back to merge the ones behind it while the guest is busy; the caller
    /// must schedule another pass within [`HOLD_CHECK`].
    Holding,
    /// The tap keeps failing; the next tap event or notification retries.
    TapErrors,
    /// The used ring cannot be written; nothing more can be done until the driver resets.
    BrokenRing,
}

/// One receive descriptor chain taken for the frame being delivered.
#[derive(Debug)]
struct Taken {
    head: u16,
    /// Its writable pieces in [`RxState::segs`], or what is wrong with it.
    segs: Result<Range<usize>, &'static str>,
}

/// The receive side's buffers, kept across passes so that the hot path does not allocate.
pub struct RxState {
    /// The frame read from the tap (header first); `frame_len` bytes of it are valid.
    buf: Vec<u8>,
    /// Length of the frame in `buf` that waits for delivery, if any.
    pending: Option<usize>,
    /// A frame read behind `buf`'s while coalescing that did not continue it.
    next: Vec<u8>,
    /// Length of the frame in `next`, delivered after `buf`'s.
    lookahead: Option<usize>,
    /// How the guest keeps up, for the decision to hold a frame back.
    pace: Pace,
    /// Since when the frame in `buf` has been held back.
    held_since: Option<Instant>,
    segs: Vec<(GuestAddress, usize)>,
    taken: Vec<Taken>,
}

impl RxState {
    /// Empty state with a buffer for the largest frame and one byte more, to recognise frames
    /// that are larger.
    pub fn new() -> Self {
        RxState {
            buf: vec![0; MAX_FRAME_LEN + 1],
            pending: None,
            next: vec![0; MAX_FRAME_LEN + 1],
            lookahead: None,
            pace: Pace::default(),
            held_since: None,
            segs: Vec::new(),
            taken: Vec::new(),
        }
    }

    /// Whether a frame read from the tap waits for delivery.
    #[cfg(test)]
    pub fn has_pending(&self) -> bool {
        self.pending.is_some() || self.lookahead.is_some()
    }

    /// Whether the device must look at the ring again soon (within [`HOLD_CHECK`]): the guest is
    /// busy with frames it was given, and the end of that spell tells how fast it is.
    pub fn watching(&self) -> bool {
        self.pace.watching(Instant::now())
    }

    /// Forgets the waiting frame (device reset).
    pub fn clear(&mut self) {
        self.pending = None;
        self.lookahead = None;
        self.pace.reset();
        self.held_since = None;
    }
}

/// Moves frames from the tap to the guest until there is a reason to stop, then interrupts the
/// guest once if it asked for it.
pub fn process(
    rx: &mut RxState,
    active: &mut Active,
    tap: &mut dyn TapIo,
    limiter: &mut RateLimiter,
    metrics: &NetMetrics,
) -> RxStop {
    let since = active.rx.next_used();
    let stop = run(rx, active, tap, limiter, metrics);
    if needs_interrupt(&active.mem, &active.rx, since) && active.interrupt.signal_used_queue() {
        NetMetrics::inc(&metrics.interrupts);
    }
    stop
}

fn run(
    rx: &mut RxState,
    active: &mut Active,
    tap: &mut dyn TapIo,
    limiter: &mut RateLimiter,
    metrics: &NetMetrics,
) -> RxStop {
    let mut reads = Reads::default();
    let coalescing = active.acked & feature(VIRTIO_NET_F_GUEST_TSO4) != 0
        && active.acked & feature(VIRTIO_NET_F_GUEST_CSUM) != 0;
    // Without EVENT_IDX the ring does not tell whether the guest keeps up, so nothing is held.
    let pacing = coalescing && active.rx.event_idx_enabled();
    if pacing {
        rx.pace
            .observe(driver_behind(&active.mem, &active.rx), Instant::now());
    }
    loop {
        if reads.frames == RX_BUDGET {
            return RxStop::Budget;
        }
        let mut len = match rx.pending {
            Some(len) => len,
            None => match rx.lookahead.take() {
                Some(len) => {
                    std::mem::swap(&mut rx.buf, &mut rx.next);
                    len
                }
                None => match reads.read(tap, &mut rx.buf, metrics) {
                    Read::Frame(len) => len,
                    Read::Skipped => continue,
                    Read::Stop(stop) => return stop,
                },
            },
        };
        rx.pending = Some(len);
        if !offloads_accepted(&rx.buf[..HDR_LEN], active.acked) {
            // Possible for frames the tap queued before the guest's offloads were applied.
            rx.pending = None;
            bump(&metrics.rx_dropped_offload);
            continue;
        }
        if coalescing {
            let drained;
            (len, drained) = coalesce_queued(rx, len, tap, &mut reads, metrics);
            rx.pending = Some(len);
            if pacing && drained && rx.lookahead.is_none() && hold(rx, active, len, Instant::now()) {
                return RxStop::Holding;
            }
        }
        let bytes = (len - HDR_LEN) as u64;
        if !admit(limiter, bytes) {
            NetMetrics::inc(&metrics.rx_throttled);
            return RxStop::Throttled;
        }
        match deliver(&mut rx.segs, &mut rx.taken, active, &mut rx.buf[..len], metrics) {
            Ok(Delivery::Delivered) => {
                rx.pending = None;
                rx.held_since = None;
                if pacing {
                    rx.pace.delivered(Instant::now());
                }
                NetMetrics::inc(&metrics.rx_frames);
                NetMetrics::add(&metrics.rx_bytes, bytes);
            }
            Ok(Delivery::TooBig) => {
                refund(limiter, bytes);
                rx.pending = None;
                rx.held_since = None;
                let n = bump(&metrics.rx_dropped_oversized);
                log_every(n, || {
                    format!(
                        "net {}: dropped a {len}-byte frame the guest has no room for",
                        tap.name()
                    )
                });
            }
            Ok(Delivery::NoBuffers { available }) => {
                refund(limiter, bytes);
                // Ask for the driver's next notification, then look again in case buffers came
                // in between: otherwise both sides could wait for each other.
                let size = active.rx.size();
                match request_notification(&active.mem, &mut active.rx) {
                    // More chains than before, and no more than a ring can hold (a driver whose
                    // index runs further ahead has broken its ring; it gets retried on its next
                    // notification, not in a loop).
                    Ok(avail)
                        if (available.saturating_add(1)..=size)
                            .contains(&avail.wrapping_sub(active.rx.next_avail())) =>
                    {
                        if let Err(e) = active.rx.disable_notification(&active.mem) {
                            log::warn!("net {}: {e}", tap.name());
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!("net {}: receive queue: {e}", tap.name()),
                }
                NetMetrics::inc(&metrics.rx_no_buffers);
                return RxStop::NoBuffers;
            }
            Err(e) => {
                refund(limiter, bytes);
                let n = bump(&metrics.rx_malformed_chains);
                log_every(n, || format!("net {}: receive queue: {e}", tap.name()));
                return RxStop::BrokenRing;
            }
        }
    }
}

/// Appends the segments queued on the tap behind the frame in `rx.buf` that continue it (see
/// `coalesce`); the first frame that does not stays in `rx.next` as the lookahead. Returns the
/// frame's new length and whether the tap was found empty. Only what the tap holds is taken here;
/// whether to wait for more is [`hold`]'s decision.
fn coalesce_queued(
    rx: &mut RxState,
    mut len: usize,
    tap: &mut dyn TapIo,
    reads: &mut Reads,
    metrics: &NetMetrics,
) -> (usize, bool) {
    if rx.lookahead.is_some() || !coalesce::may_continue(&rx.buf[..len]) {
        return (len, false);
    }
    while reads.frames < RX_BUDGET {
        match reads.read(tap, &mut rx.next, metrics) {
            Read::Frame(n) => match coalesce::append(&mut rx.buf, len, &rx.next[..n]) {
                Some(merged) => {
                    len = merged;
                    NetMetrics::inc(&metrics.rx_coalesced);
                }
                None => {
                    rx.lookahead = Some(n);
                    break;
                }
            },
            Read::Skipped => {}
            Read::Stop(RxStop::TapDrained) => return (len, true),
            // The main loop reads again and stops there for the same reason.
            Read::Stop(_) => break,
        }
    }
    (len, false)
}

/// Whether the TCP segment in `rx.buf` (whose followers the tap does not hold yet) waits for them
/// instead of going to the guest now. Only while a slow guest (see `pace`) is behind: it then has
/// frames to work through before it would look at this one, so the wait costs it nothing (a push
/// does not change that), and one large frame costs it far less than many small ones. A guest that
/// catches up gets the frame at the next look ([`HOLD_CHECK`]); none waits longer than
/// [`MAX_HOLD`].
fn hold(rx: &mut RxState, active: &Active, len: usize, now: Instant) -> bool {
    let behind = driver_behind(&active.mem, &active.rx);
    rx.pace.observe(behind, now);
    if !behind || !rx.pace.slow() || !coalesce::worth_holding(&rx.buf[..len], MAX_FRAME_LEN) {
        return false;
    }
    let held_since = *rx.held_since.get_or_insert(now);
    now.duration_since(held_since) < MAX_HOLD
}

/// What one tap read gave.
enum Read {
    /// A frame of this length, header first.
    Frame(usize),
    /// Nothing to deliver (a frame dropped, or an error below the pass's error budget).
    Skipped,
    Stop(RxStop),
}

/// The pass's count of frames taken from the tap and of consecutive failed reads.
#[derive(Default)]
struct Reads {
    frames: usize,
    errors: usize,
}

impl Reads {
    fn read(&mut self, tap: &mut dyn TapIo, buf: &mut [u8], metrics: &NetMetrics) -> Read {
        match tap.read_frame(buf) {
            Ok(n) if n > MAX_FRAME_LEN => {
                // Dropped frames count against the budget too: a flood of them must not hold
                // the event loop either.
                self.frames += 1;
                let n = bump(&metrics.rx_dropped_oversized);
                log_every(n, || {
                    format!(
                        "net {}: dropped a frame from the tap larger than {MAX_FRAME_LEN} bytes",
                        tap.name()
                    )
                });
                Read::Skipped
            }
            // A tap always prepends the header; anything shorter (or end-of-file on a stand-in)
            // is an error, counted against the pass's error budget.
            Ok(n) if n < HDR_LEN => {
                bump(&metrics.rx_tap_errors);
                self.failed()
            }
            Ok(n) => {
                self.frames += 1;
                self.errors = 0;
                Read::Frame(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::Stop(RxStop::TapDrained),
            Err(e) => {
                let n = bump(&metrics.rx_tap_errors);
                log_every(n, || format!("net {}: tap read: {e}", tap.name()));
                self.failed()
            }
        }
    }

    fn failed(&mut self) -> Read {
        self.errors += 1;
        if self.errors == MAX_READ_ERRORS {
            Read::Stop(RxStop::TapErrors)
        } else {
            Read::Skipped
        }
    }
}

enum Delivery {
    Delivered,
    /// The guest's buffers, all of them, are too small: the frame is dropped.
    TooBig,
    /// Not enough buffers now; the `available` chains taken were put back.
    NoBuffers {
        /// How many chains the ring held.
        available: u16,
    },
}

/// Copies `frame` (header first) into as many receive chains as it needs: one without
/// VIRTIO_NET_F_MRG_RXBUF, up to the queue size with it.
fn deliver(
    segs: &mut Vec<(GuestAddress, usize)>,
    taken: &mut Vec<Taken>,
    active: &mut Active,
    frame: &mut [u8],
    metrics: &NetMetrics,
) -> Result<Delivery, RingError> {
    let mem = &active.mem;
    let dirty = active.dirty.as_deref();
    let queue = &mut active.rx;
    let mut batch = UsedBatch::new(queue);
    segs.clear();
    taken.clear();
    let max_buffers = if active.mrg_rxbuf {
        usize::from(queue.size())
    } else {
        1
    };
    let mut buffers = 0usize;
    let mut capacity = 0usize;
    let mut examined = 0usize;
    while capacity < frame.len() {
        if buffers == max_buffers {
            put_back(queue, taken.len());
            return Ok(Delivery::TooBig);
        }
        // A driver that keeps adding bad chains as fast as they are returned must not hold the
        // event loop: after a ring's worth, wait for its next notification.
        if examined == usize::from(queue.size()) {
            put_back(queue, taken.len());
            return Ok(Delivery::NoBuffers { available: u16::MAX });
        }
        examined += 1;
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            put_back(queue, taken.len());
            let available = u16::try_from(taken.len()).unwrap_or(u16::MAX);
            return Ok(Delivery::NoBuffers { available });
        };
        let head = chain.head_index();
        let start = segs.len();
        match writable_segments(chain, mem, segs) {
            Ok(cap) => {
                buffers += 1;
                capacity += cap;
                taken.push(Taken {
                    head,
                    segs: Ok(start..segs.len()),
                });
            }
            Err(why) => {
                segs.truncate(start);
                if taken.is_empty() {
                    // Nothing of this frame is held, so the chain can go back to the driver now.
                    refuse(&mut batch, mem, queue, head, why, metrics)?;
                    batch.publish(mem, queue)?;
                } else {
                    // It lies between chains that may have to be put back: return it with them.
                    taken.push(Taken { head, segs: Err(why) });
                }
            }
        }
    }
    let num_buffers = u16::try_from(buffers).unwrap_or(u16::MAX);
    frame[NUM_BUFFERS_OFFSET..HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
    let mut offset = 0usize;
    // The frame's buffers first and together, as `num_buffers` tells the driver to expect; bad
    // chains taken in between go back after them.
    for t in taken.iter() {
        let Ok(range) = &t.segs else {
            continue;
        };
        let mut written = 0usize;
        for &(addr, len) in &segs[range.clone()] {
            let n = len.min(frame.len() - offset);
            if n == 0 {
                break;
            }
            // The range was checked against guest memory when the chain was taken.
            if mem.write_slice(&frame[offset..offset + n], addr).is_err() {
                log::warn!("net: receive buffer vanished from guest memory");
            }
            if let Some(dirty) = dirty {
                dirty.mark(addr, n);
            }
            offset += n;
            written += n;
        }
        batch.push(mem, queue, t.head, written as u32)?;
    }
    for t in taken.iter() {
        if let Err(why) = t.segs {
            refuse(&mut batch, mem, queue, t.head, why, metrics)?;
        }
    }
    batch.publish(mem, queue)?;
    Ok(Delivery::Delivered)
}

/// Returns a malformed chain unused. A head beyond the queue names no descriptor and cannot be
/// returned at all; it is only counted.
fn refuse(
    batch: &mut UsedBatch,
    mem: &GuestMemoryMmap,
    queue: &virtio_queue::Queue,
    head: u16,
    why: &str,
    metrics: &NetMetrics,
) -> Result<(), RingError> {
    let n = bump(&metrics.rx_malformed_chains);
    log_every(n, || format!("net: receive chain {head}: {why}"));
    match batch.push(mem, queue, head, 0) {
        Err(RingError::HeadOutOfRange(_)) => Ok(()),
        other => other,
    }
}

fn put_back(queue: &mut virtio_queue::Queue, chains: usize) {
    for _ in 0..chains {
        queue.go_to_previous_position();
    }
}

/// Collects the pieces of a receive chain; returns its capacity. A chain that is not entirely
/// writable guest memory, cannot hold a header (each buffer must, virtio 1.2, 5.1.6.3.1), or was cut
/// short (a loop, an out-of-range next index) is malformed.
fn writable_segments(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    segs: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, &'static str> {
    let mut capacity = 0usize;
    let mut any = false;
    let mut cut_short = false;
    for desc in chain {
        any = true;
        if !desc.is_write_only() {
            return Err("read-only descriptor");
        }
        let len = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err("buffer outside guest memory");
        }
        if len > 0 {
            // One bound for the whole frame keeps the scratch vector small whatever the driver
            // does; real drivers use one or two pieces per buffer.
            if segs.len() == MAX_IOVECS {
                return Err("too many descriptors");
            }
            segs.push((desc.addr(), len));
            capacity += len;
        }
        cut_short = desc.has_next();
    }
    if !any {
        return Err("no descriptors (bad head or indirect table)");
    }
    if cut_short {
        return Err("chain cut short (loop or bad next index)");
    }
    if capacity < HDR_LEN {
        return Err("smaller than the virtio-net header");
    }
    Ok(capacity)
}

/// Whether the header asks for nothing the guest did not accept.
fn offloads_accepted(hdr: &[u8], acked: u64) -> bool {
    let has = |bit: u32| acked & feature(bit) != 0;
    let flags = u32::from(hdr[0]);
    let gso = u32::from(hdr[1]);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_GUEST_CSUM) {
        return false;
    }
    if gso & VIRTIO_NET_HDR_GSO_ECN != 0 && !has(VIRTIO_NET_F_GUEST_ECN) {
        return false;
    }
    match gso & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        VIRTIO_NET_HDR_GSO_UDP => has(VIRTIO_NET_F_GUEST_UFO),
        VIRTIO_NET_HDR_GSO_UDP_L4 => has(VIRTIO_NET_F_GUEST_USO4) || has(VIRTIO_NET_F_GUEST_USO6),
        _ => false,
    }
}
