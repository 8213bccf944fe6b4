//! The virtio-balloon device: configuration space, queues, statistics timer.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_api::balloon::{BalloonInfo, GuestMemoryStats, MAX_STATS_INTERVAL_S, PAGES_PER_MIB};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::metrics::BalloonMetrics;
use super::pages::{self, PfnRuns};
use super::persist::BalloonState;
use super::stats::{self, MAX_STATS, STAT_BYTES};
use super::{
    BALLOON_PAGE_SIZE, TYPE_BALLOON, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
};
use crate::virtio::dirty::DirtyPages;
use crate::virtio::persist::{PersistError, QueueSnapshot};
use crate::virtio::{
    drain_eventfd, feature, ActivateError, Activation, EventSource, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Descriptors per queue (the guest's free page reporting needs 32 in one chain).
pub const QUEUE_SIZE: u16 = 256;
/// Most page numbers one inflate or deflate buffer may carry (Linux sends 256): a bigger one is
/// refused whole, so that one notification costs the main loop a bounded amount of work.
pub const MAX_PFNS_PER_BUFFER: usize = 4096;
/// Token of the statistics timer (queue eventfds use their queue index).
pub(super) const TOKEN_STATS_TIMER: u32 = 0x100;
/// Bytes of the configuration space: num_pages, actual, free_page_hint_cmd_id, poison_val.
const CONFIG_BYTES: usize = 16;
/// Page numbers read from guest memory at a time.
const PFN_CHUNK: usize = 256;

/// Why a balloon could not be created or changed.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Eventfds or the statistics timer could not be created or armed.
    #[error("balloon setup: {0}")]
    Setup(std::io::Error),
    /// Statistics were not configured at boot, so the guest has no statistics queue.
    #[error("the balloon was configured without statistics (stats_interval_s 0)")]
    StatsDisabled,
    /// An interval out of range.
    #[error("stats_interval_s must be 1 to {MAX_STATS_INTERVAL_S}, got {0}")]
    Interval(u32),
}

/// What a balloon is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonSpec {
    /// The target at boot, in 4 KiB pages.
    pub target_pages: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Statistics polling interval in seconds; 0 offers no statistics queue.
    pub stats_interval_s: u32,
    /// Offer VIRTIO_BALLOON_F_REPORTING.
    pub free_page_reporting: bool,
}

/// What each queue the driver set up is for (the optional ones shift down when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

fn roles(acked: u64) -> Vec<Role> {
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if acked & feature(VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(Role::Stats);
    }
    if acked & feature(VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(Role::Reporting);
    }
    roles
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    roles: Vec<Role>,
    interrupt: Arc<Interrupt>,
    dirty: Option<Arc<DirtyPages>>,
}

/// A virtio memory balloon.
pub struct Balloon {
    avail_features: u64,
    queue_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    stats_timer: TimerFd,
    target_pages: u32,
    actual_pages: u32,
    stats_interval_s: u32,
    stats: Option<GuestMemoryStats>,
    /// The statistics buffer the device holds until the next poll.
    stats_head: Option<u16>,
    metrics: Arc<BalloonMetrics>,
    active: Option<Active>,
    paused: bool,
}

impl Balloon {
    /// Creates a balloon.
    pub fn new(spec: BalloonSpec) -> Result<Self, BalloonError> {
        if spec.stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(BalloonError::Interval(spec.stats_interval_s));
        }
        let mut avail_features = feature(VIRTIO_F_VERSION_1);
        if spec.stats_interval_s > 0 {
            avail_features |= feature(VIRTIO_BALLOON_F_STATS_VQ);
        }
        if spec.deflate_on_oom {
            avail_features |= feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
        }
        if spec.free_page_reporting {
            avail_features |= feature(VIRTIO_BALLOON_F_REPORTING);
        }
        let queues = roles(avail_features).len();
        let stats_timer = crate::timer::nonblocking_timer().map_err(BalloonError::Setup)?;
        let queue_evts = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BalloonError::Setup)?;
        Ok(Balloon {
            avail_features,
            queue_sizes: vec![QUEUE_SIZE; queues],
            queue_evts,
            stats_timer,
            target_pages: spec.target_pages,
            actual_pages: 0,
            stats_interval_s: spec.stats_interval_s,
            stats: None,
            stats_head: None,
            metrics: Arc::new(BalloonMetrics::default()),
            active: None,
            paused: false,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    /// Sets the target. The transport must then tell the driver
    /// ([`crate::virtio::mmio::MmioTransport::notify_config_change`]).
    pub fn set_target_pages(&mut self, pages: u32) {
        self.target_pages = pages;
    }

    /// Changes the statistics polling interval (statistics must have been configured at boot).
    pub fn set_stats_interval(&mut self, seconds: u32) -> Result<(), BalloonError> {
        if self.avail_features & feature(VIRTIO_BALLOON_F_STATS_VQ) == 0 {
            return Err(BalloonError::StatsDisabled);
        }
        if seconds == 0 || seconds > MAX_STATS_INTERVAL_S {
            return Err(BalloonError::Interval(seconds));
        }
        self.stats_interval_s = seconds;
        if self.stats_running() {
            self.arm_stats_timer().map_err(BalloonError::Setup)?;
        }
        Ok(())
    }

    /// Target, actual size, the guest's latest statistics and the counters.
    pub fn info(&self) -> BalloonInfo {
        BalloonInfo {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            target_mib: u64::from(self.target_pages) / PAGES_PER_MIB,
            actual_mib: u64::from(self.actual_pages) / PAGES_PER_MIB,
            stats_interval_s: self.stats_interval_s,
            stats: self.stats.clone(),
            counters: self.metrics.snapshot(),
        }
    }

    /// The balloon's state for a snapshot (the device must be paused; it never has work in
    /// flight).
    pub fn save_state(&self) -> BalloonState {
        BalloonState {
            avail_features: self.avail_features,
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            stats_interval_s: self.stats_interval_s,
            stats_head: self.stats_head,
        }
    }

    /// Applies a saved state to a balloon just created from the snapshot's configuration; leaves
    /// it paused.
    pub fn restore_state(&mut self, state: &BalloonState) -> Result<(), PersistError> {
        if state.avail_features != self.avail_features {
            return Err(PersistError::Mismatch(format!(
                "balloon saved with features {:#x}, configured with {:#x}",
                state.avail_features, self.avail_features
            )));
        }
        if state.stats_head.is_some_and(|h| h >= QUEUE_SIZE) || state.stats_interval_s > MAX_STATS_INTERVAL_S
        {
            return Err(PersistError::Mismatch(
                "balloon statistics state out of range".into(),
            ));
        }
        self.target_pages = state.target_pages;
        self.actual_pages = state.actual_pages;
        self.stats_interval_s = state.stats_interval_s;
        self.stats_head = state.stats_head;
        self.paused = true;
        Ok(())
    }

    fn stats_running(&self) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| a.roles.contains(&Role::Stats))
            && self.stats_interval_s > 0
    }

    fn arm_stats_timer(&mut self) -> std::io::Result<()> {
        let period = Duration::from_secs(u64::from(self.stats_interval_s));
        self.stats_timer.reset(period, Some(period)).map_err(errno_to_io)
    }

    fn config_bytes(&self) -> [u8; CONFIG_BYTES] {
        let mut c = [0u8; CONFIG_BYTES];
        c[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        c
    }

    /// Serves every queue the driver set up.
    fn process_all(&mut self) {
        let n = self.active.as_ref().map_or(0, |a| a.queues.len());
        for index in 0..n {
            self.process_queue(index);
        }
    }

    fn process_queue(&mut self, index: usize) {
        if self.paused {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(&role) = active.roles.get(index) else {
            return;
        };
        let metrics = &self.metrics;
        let mut used_any = false;
        loop {
            let Some(queue) = active.queues.get_mut(index) else {
                return;
            };
            // A driver whose available index runs more than a queue ahead has broken its ring:
            // serve nothing until it resets the device.
            if let Err(e) = queue.iter(&active.mem) {
                warn_guest(&format!("balloon queue {index}: {e}"));
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            match role {
                Role::Inflate | Role::Deflate => pfn_buffer(
                    chain,
                    &active.mem,
                    role == Role::Inflate,
                    metrics,
                    active.dirty.as_deref(),
                ),
                Role::Reporting => report_buffer(chain, &active.mem, metrics, active.dirty.as_deref()),
                Role::Stats => {
                    let mut latest = self.stats.take().unwrap_or_default();
                    if stats_buffer(chain, &active.mem, metrics, &mut latest) {
                        BalloonMetrics::inc(&metrics.stats_updates);
                    }
                    self.stats = Some(latest);
                    // Kept until the next poll; a driver that sends another one meanwhile gets the
                    // older back at once, so that its ring never fills with buffers held here.
                    if let Some(older) = self.stats_head.replace(head) {
                        used_any |= add_used(queue, &active.mem, older);
                    }
                    continue;
                }
            }
            used_any |= add_used(queue, &active.mem, head);
        }
        if used_any && active.interrupt.signal_used_queue() {
            BalloonMetrics::inc(&metrics.interrupts);
        }
    }

    /// The statistics timer fired: hand the guest its buffer back, asking for fresh numbers.
    fn poll_stats(&mut self) {
        // Non-blocking: a wake-up without an expiry (spurious, or a test's) reads nothing.
        if let Err(e) = self.stats_timer.wait() {
            if e.errno() != libc::EAGAIN {
                log::warn!("balloon: statistics timer: {e}");
            }
        }
        if self.paused {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(index) = active.roles.iter().position(|r| *r == Role::Stats) else {
            return;
        };
        let (Some(head), Some(queue)) = (self.stats_head.take(), active.queues.get_mut(index)) else {
            return;
        };
        if add_used(queue, &active.mem, head) && active.interrupt.signal_used_queue() {
            BalloonMetrics::inc(&self.metrics.interrupts);
        }
    }
}

fn errno_to_io(e: vmm_sys_util::errno::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16) -> bool {
    // Nothing is ever written into balloon buffers.
    match queue.add_used(mem, head, 0) {
        Ok(()) => true,
        Err(e) => {
            warn_guest(&format!("balloon: cannot return descriptor {head}: {e}"));
            false
        }
    }
}

/// Inflate or deflate: a buffer of little-endian 32-bit page numbers, in readable descriptors.
fn pfn_buffer(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    inflate: bool,
    metrics: &BalloonMetrics,
    dirty: Option<&DirtyPages>,
) {
    let mut total = 0usize;
    let mut descs = Vec::new();
    for desc in chain {
        if desc.is_write_only() || desc.len() % 4 != 0 {
            BalloonMetrics::inc(&metrics.invalid_requests);
            warn_guest("balloon: page number buffer that is write-only or not a whole number of u32");
            return;
        }
        total = total.saturating_add(desc.len() as usize / 4);
        if total > MAX_PFNS_PER_BUFFER {
            BalloonMetrics::inc(&metrics.invalid_requests);
            warn_guest("balloon: page number buffer too large");
            return;
        }
        descs.push((desc.addr(), desc.len() as usize / 4));
    }
    let mut runs = PfnRuns::default();
    let mut chunk = [0u8; PFN_CHUNK * 4];
    let finish = |run: Option<(u32, u32)>| {
        if let Some((first, count)) = run {
            finish_run(mem, first, count, inflate, metrics, dirty);
        }
    };
    for (addr, count) in descs {
        let mut done = 0usize;
        while done < count {
            let n = (count - done).min(PFN_CHUNK);
            let bytes = &mut chunk[..n * 4];
            let at = addr.checked_add(done as u64 * 4);
            if at.is_none_or(|at| mem.read_slice(bytes, at).is_err()) {
                BalloonMetrics::inc(&metrics.invalid_requests);
                warn_guest("balloon: page number buffer outside guest memory");
                finish(runs.finish());
                return;
            }
            for raw in bytes.chunks_exact(4) {
                let pfn = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
                if !pages::page_in_ram(mem, pfn) {
                    BalloonMetrics::inc(&metrics.invalid_pages);
                    finish(runs.finish());
                    continue;
                }
                finish(runs.push(pfn));
            }
            done += n;
        }
    }
    finish(runs.finish());
}

/// A run of pages each known to be guest RAM.
fn finish_run(
    mem: &GuestMemoryMmap,
    first: u32,
    count: u32,
    inflate: bool,
    metrics: &BalloonMetrics,
    dirty: Option<&DirtyPages>,
) {
    let counter = if inflate {
        &metrics.inflated_pages
    } else {
        &metrics.deflated_pages
    };
    BalloonMetrics::add(counter, u64::from(count));
    if !inflate {
        // The host backs deflated pages again on their first touch: nothing to do.
        return;
    }
    let start = pages::pfn_address(first);
    let len = u64::from(count) * BALLOON_PAGE_SIZE;
    match pages::release(mem, start, len) {
        Ok(()) => mark(dirty, start, len),
        // Consecutive pages in RAM can only fail together if the run spans two adjacent regions.
        Err(pages::ReleaseError::OutsideGuestRam { .. }) => {
            for pfn in first..first.saturating_add(count) {
                release_one(mem, pages::pfn_address(pfn), BALLOON_PAGE_SIZE, metrics, dirty);
            }
        }
        Err(e) => {
            BalloonMetrics::inc(&metrics.release_errors);
            log::warn!("balloon: {e}");
        }
    }
}

fn release_one(
    mem: &GuestMemoryMmap,
    start: GuestAddress,
    len: u64,
    metrics: &BalloonMetrics,
    dirty: Option<&DirtyPages>,
) -> bool {
    match pages::release(mem, start, len) {
        Ok(()) => {
            mark(dirty, start, len);
            true
        }
        Err(pages::ReleaseError::OutsideGuestRam { .. }) => {
            BalloonMetrics::inc(&metrics.invalid_pages);
            false
        }
        Err(e) => {
            BalloonMetrics::inc(&metrics.release_errors);
            log::warn!("balloon: {e}");
            false
        }
    }
}

/// Released pages read back as zeroes (or the snapshot's data): for a diff snapshot they changed.
fn mark(dirty: Option<&DirtyPages>, start: GuestAddress, len: u64) {
    if let Some(dirty) = dirty {
        dirty.mark(start, usize::try_from(len).unwrap_or(usize::MAX));
    }
}

/// Free page reporting: each descriptor is a range of free guest memory. Linux hands them over as
/// device-writable buffers; the device writes nothing, so either direction is accepted.
fn report_buffer(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    metrics: &BalloonMetrics,
    dirty: Option<&DirtyPages>,
) {
    BalloonMetrics::inc(&metrics.reports);
    for desc in chain {
        let Some((start, len)) = pages::aligned_inward(desc.addr().0, u64::from(desc.len())) else {
            BalloonMetrics::inc(&metrics.invalid_pages);
            continue;
        };
        if release_one(mem, start, len, metrics, dirty) {
            BalloonMetrics::add(&metrics.reported_bytes, len);
        }
    }
}

/// Statistics: tagged values in readable descriptors. Returns whether any were read.
fn stats_buffer(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    metrics: &BalloonMetrics,
    out: &mut GuestMemoryStats,
) -> bool {
    let mut bytes = Vec::new();
    let limit = MAX_STATS * STAT_BYTES;
    for desc in chain {
        if desc.is_write_only() {
            BalloonMetrics::inc(&metrics.invalid_requests);
            warn_guest("balloon: write-only statistics buffer");
            return false;
        }
        let take = (desc.len() as usize).min(limit - bytes.len());
        let from = bytes.len();
        bytes.resize(from + take, 0);
        if mem.read_slice(&mut bytes[from..], desc.addr()).is_err() {
            BalloonMetrics::inc(&metrics.invalid_requests);
            warn_guest("balloon: statistics buffer outside guest memory");
            return false;
        }
        if bytes.len() == limit {
            break;
        }
    }
    if bytes.len() % STAT_BYTES != 0 {
        BalloonMetrics::inc(&metrics.invalid_requests);
    }
    stats::parse(&bytes, out) > 0
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queues_in_use(&self, acked_features: u64) -> usize {
        roles(acked_features & self.avail_features).len()
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = self.config_bytes();
        let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) belongs to the driver; writes elsewhere are ignored.
        let mut config = self.config_bytes();
        let Some(start) = usize::try_from(offset).ok() else {
            return;
        };
        for (i, byte) in data.iter().enumerate() {
            if let Some(at) = start.checked_add(i).filter(|at| (4..8).contains(at)) {
                config[at] = *byte;
            }
        }
        self.actual_pages = u32::from_le_bytes([config[4], config[5], config[6], config[7]]);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, activation: Activation, interrupt: &Arc<Interrupt>) -> Result<(), ActivateError> {
        let roles = roles(activation.acked_features & self.avail_features);
        if activation.queues.len() != roles.len() {
            return Err(ActivateError::QueueCount {
                expected: roles.len(),
                got: activation.queues.len(),
            });
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            roles,
            interrupt: Arc::clone(interrupt),
            dirty: activation.dirty,
        });
        if self.stats_running() {
            self.arm_stats_timer()
                .map_err(|e| ActivateError::Backend(format!("balloon statistics timer: {e}")))?;
        }
        // Buffers the driver queued before DRIVER_OK (the first statistics) were notified while
        // the device could not take them. Activation runs on a vCPU thread: let the main loop
        // serve them, so that this thread never calls madvise for the guest.
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                log::warn!("balloon: queue notification: {e}");
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.stats_head = None;
        self.actual_pages = 0;
        if let Err(e) = self.stats_timer.clear() {
            log::warn!("balloon: statistics timer: {e}");
        }
    }

    fn pause(&mut self) {
        // Nothing is ever in flight: every buffer is served before the handler returns.
        self.paused = true;
    }

    fn resume(&mut self) {
        self.paused = false;
        self.process_all();
    }

    fn live_queues(&self) -> Vec<QueueSnapshot> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(QueueSnapshot::of))
            .collect()
    }

    fn event_sources(&self) -> Vec<EventSource> {
        let mut sources: Vec<EventSource> = self
            .queue_evts
            .iter()
            .enumerate()
            .map(|(i, evt)| EventSource::readable(evt.as_raw_fd(), i as u32))
            .collect();
        if self.avail_features & feature(VIRTIO_BALLOON_F_STATS_VQ) != 0 {
            sources.push(EventSource::readable(
                self.stats_timer.as_raw_fd(),
                TOKEN_STATS_TIMER,
            ));
        }
        sources
    }

    fn handle_event(&mut self, token: u32) {
        BalloonMetrics::inc(&self.metrics.events);
        if token == TOKEN_STATS_TIMER {
            self.poll_stats();
            return;
        }
        let Some(evt) = self.queue_evts.get(token as usize) else {
            log::error!("balloon: unknown event token {token}");
            return;
        };
        drain_eventfd(evt);
        self.process_queue(token as usize);
    }
}

/// Logs a driver's protocol violation. Rate limiting happens in the logger.
fn warn_guest(what: &str) {
    log::warn!("{what}");
}
