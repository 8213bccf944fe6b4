//! The virtio-blk device: queue processing, completions, and rate limiting.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{DiskImage, SECTOR_SIZE};
use super::engine::{Completion, Engine, EngineKind};
use super::io::{to_iovecs, DiskOp};
use super::metrics::BlockMetrics;
use super::request::{self, DiskLimits, Request, RequestError, RequestKind, ID_BYTES, STATUS_IOERR};
use super::written::WrittenChunks;
use serde::{Deserialize, Serialize};

use crate::rate_limiter::{RateLimiter, RateLimiterError, RateLimiterState, TokenType};
use crate::virtio::dirty::DirtyPages;
use crate::virtio::persist::{PersistError, QueueSnapshot};
use crate::virtio::{
    drain_eventfd, feature, ActivateError, Activation, EventSource, Interrupt, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vmm_api::rate_limiter::RateLimiterConfig;

/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Largest discard / write-zeroes request, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Discards aligned to 4 KiB match the host's page and file system block.
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Event tokens (see [`VirtioDevice::event_sources`]).
const TOKEN_QUEUE: u32 = 0;
const TOKEN_COMPLETION: u32 = 1;
const TOKEN_RATE_LIMITER: u32 = 2;

/// Why a drive could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or locked, or has a bad size.
    #[error(transparent)]
    Disk(#[from] super::disk::DiskError),
    /// The serial is longer than 20 bytes.
    #[error("drive serial {0:?} is longer than 20 bytes")]
    Serial(String),
    /// Eventfds or the I/O engine could not be created.
    #[error("drive {id}: {source}")]
    Setup {
        /// The drive.
        id: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What a drive is made of.
#[derive(Debug)]
pub struct BlockSpec {
    /// The drive's name in the VMM (metrics, rate limiter updates).
    pub id: String,
    /// The image, opened and locked.
    pub disk: DiskImage,
    /// Reported to the guest by GET_ID; at most 20 bytes.
    pub serial: String,
    /// Which engine runs the I/O.
    pub engine: EngineKind,
    /// Throttling; [`RateLimiter::unlimited`] for none.
    pub rate_limiter: RateLimiter,
}

/// Per-request state kept while the engine runs it.
#[derive(Debug, Clone, Copy)]
struct Pending {
    status: GuestAddress,
    /// Bytes the device writes into the guest on success, status byte included.
    used_len: u32,
    kind: Kind,
    /// The disk bytes the request changes (offset, length), marked written when it completes.
    changes: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read(u64),
    Write(u64),
    Flush,
    Discard,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    limits: DiskLimits,
    dirty: Option<Arc<DirtyPages>>,
}

impl Active {
    /// Marks guest memory the device is about to write (data read from the disk, the drive id).
    fn mark_written(&self, data: &[request::Segment]) {
        if let Some(dirty) = &self.dirty {
            for seg in data {
                dirty.mark(seg.addr, seg.len as usize);
            }
        }
    }
}

/// What a drive keeps beyond its queue, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Capacity the guest was told.
    pub sectors: u64,
    /// The guest was told it is read-only.
    pub read_only: bool,
    /// The rate limiter's buckets.
    pub rate_limiter: RateLimiterState,
}

/// A virtio-blk drive.
pub struct Block {
    id: String,
    disk: DiskImage,
    serial: [u8; ID_BYTES],
    avail_features: u64,
    config: Vec<u8>,
    queue_evts: [EventFd; 1],
    engine: Engine,
    rate_limiter: RateLimiter,
    metrics: Arc<BlockMetrics>,
    active: Option<Active>,
    /// Indexed by descriptor head.
    pending: Vec<Option<Pending>>,
    /// Requests are held back until the rate limiter's timer fires.
    throttled: bool,
    /// The VM is paused: the queue is left alone until `resume`.
    paused: bool,
    completions: Vec<Completion>,
    written: Arc<WrittenChunks>,
}

impl Block {
    /// Creates a drive. An io_uring engine that the host refuses falls back to the synchronous one.
    pub fn new(spec: BlockSpec) -> Result<Self, BlockError> {
        let setup = |source| BlockError::Setup {
            id: spec.id.clone(),
            source,
        };
        if spec.serial.len() > ID_BYTES {
            return Err(BlockError::Serial(spec.serial));
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..spec.serial.len()].copy_from_slice(spec.serial.as_bytes());
        let engine = match Engine::new(spec.engine, QUEUE_SIZE) {
            Ok(engine) => engine,
            Err(e) if spec.engine == EngineKind::Uring => {
                log::warn!(
                    "drive {}: io_uring unavailable ({e}), using synchronous I/O",
                    spec.id
                );
                Engine::new(EngineKind::Sync, QUEUE_SIZE).map_err(setup)?
            }
            Err(e) => return Err(setup(e)),
        };
        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(setup)?;
        let read_only = spec.disk.read_only();
        let mut avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if read_only {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        } else if spec.disk.overlay().is_none() {
            // Not on a copy-on-write image: deallocating would expose its base again.
            avail_features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let sectors = spec.disk.sectors();
        Ok(Block {
            config: config_space(sectors),
            id: spec.id,
            disk: spec.disk,
            serial,
            avail_features,
            queue_evts: [queue_evt],
            engine,
            rate_limiter: spec.rate_limiter,
            metrics: Arc::new(BlockMetrics::default()),
            active: None,
            pending: vec![None; usize::from(QUEUE_SIZE)],
            throttled: false,
            paused: false,
            completions: Vec::new(),
            written: Arc::new(WrittenChunks::new(sectors * SECTOR_SIZE)),
        })
    }

    /// The drive's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the guest may only read the drive.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The open image, buffered (for snapshot copies).
    pub fn disk_file(&self) -> &std::fs::File {
        self.disk.buffered().unwrap_or(self.disk.file())
    }

    /// Whether the image is copy-on-write over a base image.
    pub fn has_backing(&self) -> bool {
        self.disk.overlay().is_some()
    }

    /// The descriptor that holds the image's lock (with direct I/O not the buffered one).
    pub fn locked_file(&self) -> &std::fs::File {
        self.disk.file()
    }

    /// The parts of the image the guest wrote (for live migration).
    pub fn written(&self) -> &Arc<WrittenChunks> {
        &self.written
    }

    /// The drive's counters.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// The engine in use (after any fallback).
    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Applies new rate limits. Requests held back resume when the limiter's timer fires, which an
    /// update of a blocked limiter makes happen at once.
    pub fn update_rate_limiter(&mut self, config: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        self.rate_limiter.update_buckets(config)
    }

    /// The drive's state for a snapshot. The drive must be paused (nothing in flight).
    pub fn save_state(&self) -> Result<BlockState, PersistError> {
        if self.pending.iter().any(Option::is_some) || !self.completions.is_empty() {
            return Err(PersistError::InFlight(self.id.clone()));
        }
        Ok(BlockState {
            sectors: self.disk.sectors(),
            read_only: self.disk.read_only(),
            rate_limiter: self.rate_limiter.save(),
        })
    }

    /// Applies a saved state to a drive just created on the snapshot's disk, which must have the
    /// saved size and mode (the guest's driver knows both). Leaves the drive paused.
    pub fn restore_state(&mut self, state: &BlockState) -> Result<(), PersistError> {
        if state.sectors != self.disk.sectors() || state.read_only != self.disk.read_only() {
            return Err(PersistError::Mismatch(format!(
                "drive {}: saved with {} sectors{}, the image has {}{}",
                self.id,
                state.sectors,
                if state.read_only { " read-only" } else { "" },
                self.disk.sectors(),
                if self.disk.read_only() { " read-only" } else { "" },
            )));
        }
        self.rate_limiter =
            RateLimiter::restore(&state.rate_limiter).map_err(|e| PersistError::Mismatch(e.to_string()))?;
        self.paused = true;
        Ok(())
    }

    fn process_queue(&mut self) {
        if self.paused || self.throttled {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        'outer: loop {
            if let Err(e) = active.queue.disable_notification(&active.mem) {
                log::warn!("block {}: {e}", self.id);
            }
            // A driver whose available index runs more than a queue ahead has broken its ring:
            // serve nothing until it resets the device.
            if let Err(e) = active.queue.iter(&active.mem) {
                log::warn!("block {}: {e}", self.id);
                break;
            }
            while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
                let parsed = request::parse(chain, &active.mem, &active.limits);
                match parsed {
                    Ok(req) => {
                        if !admit(&mut self.rate_limiter, &req.kind) {
                            active.queue.go_to_previous_position();
                            self.throttled = true;
                            BlockMetrics::inc(&self.metrics.throttled);
                            break 'outer;
                        }
                        if let RequestKind::Read { data, .. } | RequestKind::GetId { data } = &req.kind {
                            active.mark_written(data);
                        }
                        used_any |= start(
                            &mut self.engine,
                            &self.disk,
                            &self.serial,
                            &self.metrics,
                            &mut self.pending,
                            active,
                            req,
                        );
                    }
                    Err(err) => {
                        BlockMetrics::inc(&self.metrics.invalid_requests);
                        log::warn!("block {}: {err}", self.id);
                        used_any |= refuse(active, &err);
                    }
                }
            }
            match active.queue.enable_notification(&active.mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("block {}: {e}", self.id);
                    break;
                }
            }
        }
        self.engine.kick();
        // The synchronous engine has finished everything already.
        self.reap(used_any);
    }

    /// Completes finished operations and interrupts the guest if it wants to hear about them.
    fn reap(&mut self, used_any: bool) {
        self.engine.completions(&self.disk, &mut self.completions);
        self.finish_completions(used_any);
    }

    /// Writes the results in `self.completions` to the guest.
    fn finish_completions(&mut self, mut used_any: bool) {
        let Some(active) = self.active.as_mut() else {
            self.completions.clear();
            return;
        };
        for (token, result) in self.completions.drain(..) {
            let Some(pending) = self.pending.get_mut(usize::from(token)).and_then(Option::take) else {
                continue;
            };
            if let Some((offset, len)) = pending.changes {
                // Failed writes too: part of one may have reached the image.
                self.written.mark(offset, len);
            }
            let ok = match result {
                Ok(_) => {
                    count_success(&self.metrics, pending.kind);
                    true
                }
                Err(e) => {
                    BlockMetrics::inc(&self.metrics.io_errors);
                    log::warn!("block {}: I/O error: {e}", self.id);
                    false
                }
            };
            let (status, used_len) = if ok {
                (VIRTIO_BLK_S_OK as u8, pending.used_len)
            } else {
                (STATUS_IOERR, 1)
            };
            complete(active, token, pending.status, status, used_len);
            used_any = true;
        }
        if used_any {
            signal(active, &self.metrics);
        }
    }
}

/// Charges a request to the rate limiter; false if it must wait.
fn admit(limiter: &mut RateLimiter, kind: &RequestKind) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    let bytes = kind.data_len();
    if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
        // Give the op token back: the request did not go through.
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// Starts a parsed request. Returns true if it completed at once (a used entry was added).
fn start(
    engine: &mut Engine,
    disk: &DiskImage,
    serial: &[u8; ID_BYTES],
    metrics: &BlockMetrics,
    pending: &mut [Option<Pending>],
    active: &mut Active,
    req: Request,
) -> bool {
    let head = req.head;
    let fail = |active: &mut Active, why: &dyn std::fmt::Display| {
        BlockMetrics::inc(&metrics.invalid_requests);
        log::warn!("block: request {head}: {why}");
        complete(active, head, req.status, STATUS_IOERR, 1);
        true
    };
    let Some(slot) = pending.get_mut(usize::from(head)) else {
        return fail(active, &"descriptor head out of range");
    };
    if slot.is_some() {
        // A driver that reuses a head still in flight is broken or hostile.
        return fail(active, &"descriptor head already in flight");
    }
    let (op, used_len, kind) = match req.kind {
        RequestKind::GetId { data } => {
            let mut written = 0usize;
            for seg in &data {
                let take = (seg.len as usize).min(ID_BYTES - written);
                if take == 0
                    || active
                        .mem
                        .write_slice(&serial[written..written + take], seg.addr)
                        .is_err()
                {
                    break;
                }
                written += take;
            }
            BlockMetrics::inc(&metrics.get_ids);
            complete(
                active,
                head,
                req.status,
                VIRTIO_BLK_S_OK as u8,
                written as u32 + 1,
            );
            return true;
        }
        RequestKind::Read { sector, len, data } => match to_iovecs(&active.mem, &data) {
            Ok(bufs) => (
                DiskOp::Read {
                    offset: sector * SECTOR_SIZE,
                    bufs,
                },
                len.saturating_add(1),
                Kind::Read(u64::from(len)),
            ),
            Err(e) => return fail(active, &e),
        },
        RequestKind::Write { sector, len, data } => match to_iovecs(&active.mem, &data) {
            Ok(bufs) => (
                DiskOp::Write {
                    offset: sector * SECTOR_SIZE,
                    bufs,
                },
                1,
                Kind::Write(u64::from(len)),
            ),
            Err(e) => return fail(active, &e),
        },
        RequestKind::Flush => (DiskOp::Flush, 1, Kind::Flush),
        RequestKind::Discard { sector, sectors } => (
            DiskOp::Discard {
                offset: sector * SECTOR_SIZE,
                len: u64::from(sectors) * SECTOR_SIZE,
            },
            1,
            Kind::Discard,
        ),
        RequestKind::WriteZeroes {
            sector,
            sectors,
            unmap,
        } => (
            DiskOp::WriteZeroes {
                offset: sector * SECTOR_SIZE,
                len: u64::from(sectors) * SECTOR_SIZE,
                unmap,
            },
            1,
            Kind::Discard,
        ),
    };
    let changes = match (&op, kind) {
        (DiskOp::Write { offset, .. }, Kind::Write(len)) => Some((*offset, len)),
        (DiskOp::Discard { offset, len } | DiskOp::WriteZeroes { offset, len, .. }, _) => {
            Some((*offset, *len))
        }
        _ => None,
    };
    *slot = Some(Pending {
        status: req.status,
        used_len,
        kind,
        changes,
    });
    if let Err(e) = engine.submit(disk, head, op) {
        *slot = None;
        BlockMetrics::inc(&metrics.io_errors);
        log::warn!("block: cannot start request {head}: {e}");
        complete(active, head, req.status, STATUS_IOERR, 1);
        return true;
    }
    false
}

fn count_success(metrics: &BlockMetrics, kind: Kind) {
    match kind {
        Kind::Read(bytes) => {
            BlockMetrics::inc(&metrics.reads);
            BlockMetrics::add(&metrics.read_bytes, bytes);
        }
        Kind::Write(bytes) => {
            BlockMetrics::inc(&metrics.writes);
            BlockMetrics::add(&metrics.write_bytes, bytes);
        }
        Kind::Flush => BlockMetrics::inc(&metrics.flushes),
        Kind::Discard => BlockMetrics::inc(&metrics.discards),
    }
}

/// Ends a request the device refused at parse time. Returns true if a used entry was added.
fn refuse(active: &mut Active, err: &RequestError) -> bool {
    match *err {
        RequestError::NoStatus { head } => {
            // Nowhere to report the failure: return the chain so the driver's ring does not stall.
            add_used(active, head, 0)
        }
        RequestError::Rejected {
            head,
            status_addr,
            status,
            ..
        } => {
            complete(active, head, status_addr, status, 1);
            true
        }
    }
}

fn complete(active: &mut Active, head: u16, status_addr: GuestAddress, status: u8, used_len: u32) {
    if let Some(dirty) = &active.dirty {
        dirty.mark(status_addr, 1);
    }
    // The status address was the guest's choice; if it is not in memory, the guest gets no status.
    if active.mem.write_obj(status, status_addr).is_err() {
        log::warn!("block: status byte outside guest memory");
    }
    add_used(active, head, used_len);
}

fn add_used(active: &mut Active, head: u16, len: u32) -> bool {
    match active.queue.add_used(&active.mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("block: cannot return descriptor {head}: {e}");
            false
        }
    }
}

fn signal(active: &mut Active, metrics: &BlockMetrics) {
    match active.queue.needs_notification(&active.mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if active.interrupt.signal_used_queue() {
                BlockMetrics::inc(&metrics.interrupts);
            }
        }
    }
}

/// The virtio-blk configuration space (virtio 1.2, 5.2.4) up to the write-zeroes fields.
fn config_space(sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&sectors.to_le_bytes());
    // seg_max: the queue size minus the header and status descriptors.
    c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
    // blk_size.
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    // num_queues (only meaningful with VIRTIO_BLK_F_MQ, which is not offered).
    c[34..36].copy_from_slice(&1u16.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&1u32.to_le_bytes());
    c[44..48].copy_from_slice(&DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&1u32.to_le_bytes());
    // write_zeroes_may_unmap.
    c[56] = 1;
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the config space is writable without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, activation: Activation, interrupt: &Arc<Interrupt>) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let Some(queue) = activation.queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let acked = activation.acked_features;
        let limits = DiskLimits {
            sectors: self.disk.sectors(),
            read_only: self.disk.read_only(),
            discard: acked & (feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)) != 0,
            max_discard_sectors: MAX_DISCARD_SECTORS,
        };
        self.active = Some(Active {
            mem: activation.mem,
            queue,
            interrupt: Arc::clone(interrupt),
            limits,
            dirty: activation.dirty,
        });
        // Requests the driver queued before DRIVER_OK (or whose notification came too early).
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        // The kernel may still be writing into guest buffers: wait for it before forgetting them.
        self.engine.drain(&self.disk, &mut self.completions);
        self.completions.clear();
        self.pending.iter_mut().for_each(|p| *p = None);
        self.active = None;
        self.throttled = false;
    }

    fn pause(&mut self) {
        self.paused = true;
        // The kernel may still be writing into guest buffers: let it finish and report the results,
        // so that nothing touches guest memory while the VM is paused.
        self.engine.drain(&self.disk, &mut self.completions);
        self.finish_completions(false);
    }

    fn resume(&mut self) {
        self.paused = false;
        // The queue may hold requests whose notification arrived while paused (or that the guest
        // queued just before the pause); the rate limiter's own timer wakes a throttled drive.
        self.process_queue();
    }

    fn live_queues(&self) -> Vec<QueueSnapshot> {
        self.active.iter().map(|a| QueueSnapshot::of(&a.queue)).collect()
    }

    fn event_sources(&self) -> Vec<EventSource> {
        let mut sources = vec![EventSource::readable(self.queue_evts[0].as_raw_fd(), TOKEN_QUEUE)];
        if let Some(fd) = self.engine.completion_fd() {
            sources.push(EventSource::readable(fd, TOKEN_COMPLETION));
        }
        sources.push(EventSource::readable(
            self.rate_limiter.as_raw_fd(),
            TOKEN_RATE_LIMITER,
        ));
        sources
    }

    fn handle_event(&mut self, token: u32) {
        match token {
            TOKEN_QUEUE => {
                drain_eventfd(&self.queue_evts[0]);
                BlockMetrics::inc(&self.metrics.queue_events);
                self.process_queue();
            }
            TOKEN_COMPLETION => {
                self.engine.clear_completion_event();
                self.reap(false);
            }
            TOKEN_RATE_LIMITER => {
                if let Err(e) = self.rate_limiter.event_handler() {
                    log::warn!("block {}: rate limiter: {e}", self.id);
                }
                self.throttled = false;
                self.process_queue();
            }
            _ => log::error!("block {}: unknown event token {token}", self.id),
        }
    }
}
