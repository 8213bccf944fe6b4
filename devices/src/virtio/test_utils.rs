//! An in-memory virtio driver for tests: guest memory, split rings written by hand, and the
//! virtio-mmio register protocol spoken through the transport's bus interface, exactly as a guest
//! driver would (no KVM needed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;
use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// Guest memory size of the test VM.
pub const MEM_SIZE: usize = 16 << 20;
/// Where tests may put data buffers.
pub const DATA_START: u64 = 0x10_0000;
/// Queue `q`'s rings live at these offsets plus `q * QUEUE_STRIDE` (up to 15 queues fit below
/// [`DATA_START`]).
const DESC_ADDR: u64 = 0x1000;
const AVAIL_ADDR: u64 = 0x8000;
const USED_ADDR: u64 = 0x9000;
const QUEUE_STRIDE: u64 = 0x1_0000;

/// One descriptor as the test writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// `F_*` flags (F_NEXT is set by [`TestDriver::add_chain`] itself).
    pub flags: u16,
}

impl Desc {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Desc { addr, len, flags: 0 }
    }
    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            flags: F_WRITE,
        }
    }
}

/// The driver's side of one virtqueue.
#[derive(Debug, Default, Clone, Copy)]
struct DriverQueue {
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn base(q: u16) -> u64 {
        u64::from(q) * QUEUE_STRIDE
    }
}

/// A guest driver for a device with one or more queues behind an [`MmioTransport`]. The methods
/// without a queue argument act on queue 0.
pub struct TestDriver<D: VirtioDevice> {
    /// The device under test, behind its transport.
    pub transport: MmioTransport<D>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The irqfd the device signals.
    pub irq: EventFd,
    queues: Vec<DriverQueue>,
}

impl<D: VirtioDevice> TestDriver<D> {
    /// Wraps `device` in a transport over fresh guest memory; the driver is not initialised yet.
    pub fn new(device: D) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("eventfd clone")));
        let queues = vec![DriverQueue::default(); device.queue_max_sizes().len()];
        TestDriver {
            transport: MmioTransport::new(device, mem.clone(), interrupt),
            mem,
            irq,
            queues,
        }
    }

    /// Reads a 32-bit register.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// The device's 64-bit feature word.
    pub fn device_features(&mut self) -> u64 {
        self.write_reg(0x14, 0);
        let low = self.read_reg(0x10);
        self.write_reg(0x14, 1);
        let high = self.read_reg(0x10);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Runs the initialisation sequence accepting `features`, with every queue of `queue_size`
    /// entries. Returns the device status afterwards.
    pub fn init(&mut self, features: u64, queue_size: u16) -> u32 {
        self.write_reg(0x70, 0);
        self.write_reg(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write_reg(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.write_reg(0x24, 0);
        self.write_reg(0x20, features as u32);
        self.write_reg(0x24, 1);
        self.write_reg(0x20, (features >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write_reg(0x70, s);
        if self.read_reg(0x70) & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return self.read_reg(0x70);
        }
        for q in 0..self.queues.len() as u16 {
            self.setup_queue(q, queue_size);
        }
        self.write_reg(0x70, s | VIRTIO_CONFIG_S_DRIVER_OK);
        self.read_reg(0x70)
    }

    fn setup_queue(&mut self, q: u16, size: u16) {
        self.queues[usize::from(q)] = DriverQueue {
            size,
            ..DriverQueue::default()
        };
        let base = DriverQueue::base(q);
        // Clean rings, as a freshly allocated driver ring would be.
        let zeroes = vec![0u8; (USED_ADDR + 0x1000 - DESC_ADDR) as usize];
        self.mem
            .write_slice(&zeroes, GuestAddress(base + DESC_ADDR))
            .expect("ring memory");
        let reg64 = |d: &mut Self, low: u64, addr: u64| {
            d.write_reg(low, addr as u32);
            d.write_reg(low + 4, (addr >> 32) as u32);
        };
        self.write_reg(0x30, u32::from(q));
        self.write_reg(0x38, u32::from(size));
        reg64(self, 0x80, base + DESC_ADDR);
        reg64(self, 0x90, base + AVAIL_ADDR);
        reg64(self, 0xa0, base + USED_ADDR);
        self.write_reg(0x44, 1);
    }

    fn queue(&self, q: u16) -> DriverQueue {
        self.queues[usize::from(q)]
    }

    /// Writes one raw descriptor at `index` of queue 0's descriptor table.
    pub fn write_desc(&self, index: u16, desc: Desc, next: u16) {
        self.write_desc_to(0, index, desc, next);
    }

    /// Writes one raw descriptor at `index` of queue `q`'s descriptor table.
    pub fn write_desc_to(&self, q: u16, index: u16, desc: Desc, next: u16) {
        let addr = GuestAddress(DriverQueue::base(q) + DESC_ADDR + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&desc.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&desc.len.to_le_bytes());
        raw[12..14].copy_from_slice(&desc.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, addr).expect("descriptor table");
    }

    /// Writes `descs` as one chain into free table slots of queue 0 and makes it available.
    /// Returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        self.add_chain_to(0, descs)
    }

    /// [`TestDriver::add_chain`] on queue `q`.
    pub fn add_chain_to(&mut self, q: u16, descs: &[Desc]) -> u16 {
        let dq = self.queue(q);
        let size = dq.size;
        let head = dq.next_desc % size;
        for (i, d) in descs.iter().enumerate() {
            let index = (dq.next_desc + i as u16) % size;
            let next = (index + 1) % size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= F_NEXT;
            }
            self.write_desc_to(q, index, d, next);
        }
        self.queues[usize::from(q)].next_desc = dq.next_desc.wrapping_add(descs.len().max(1) as u16);
        self.publish_to(q, head);
        head
    }

    /// Puts `head` on queue 0's available ring (for hand-built, possibly malformed, chains).
    pub fn publish(&mut self, head: u16) {
        self.publish_to(0, head);
    }

    /// [`TestDriver::publish`] on queue `q`.
    pub fn publish_to(&mut self, q: u16, head: u16) {
        let dq = self.queue(q);
        let avail = DriverQueue::base(q) + AVAIL_ADDR;
        let slot = avail + 4 + 2 * u64::from(dq.avail_idx % dq.size);
        self.mem.write_obj(head, GuestAddress(slot)).expect("avail ring");
        self.set_avail_idx_of(q, dq.avail_idx.wrapping_add(1));
    }

    /// Overwrites queue 0's available index (to test a driver that lies about it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.set_avail_idx_of(0, idx);
    }

    /// [`TestDriver::set_avail_idx`] on queue `q`.
    pub fn set_avail_idx_of(&mut self, q: u16, idx: u16) {
        self.queues[usize::from(q)].avail_idx = idx;
        let avail = DriverQueue::base(q) + AVAIL_ADDR;
        self.mem
            .write_obj(idx, GuestAddress(avail + 2))
            .expect("avail idx");
    }

    /// Sets queue `q`'s `used_event` (VIRTIO_RING_F_EVENT_IDX): the driver wants an interrupt once
    /// the device has used the entry with this index.
    pub fn set_used_event(&mut self, q: u16, idx: u16) {
        let dq = self.queue(q);
        let addr = DriverQueue::base(q) + AVAIL_ADDR + 4 + 2 * u64::from(dq.size);
        self.mem.write_obj(idx, GuestAddress(addr)).expect("used_event");
    }

    /// Queue `q`'s `avail_event` (VIRTIO_RING_F_EVENT_IDX): the device wants a notification once
    /// the driver makes the entry with this index available.
    pub fn avail_event(&self, q: u16) -> u16 {
        let dq = self.queue(q);
        let addr = DriverQueue::base(q) + USED_ADDR + 4 + 8 * u64::from(dq.size);
        self.mem.read_obj(GuestAddress(addr)).expect("avail_event")
    }

    /// Used entries `(head, len)` of queue 0 added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        self.take_used_from(0)
    }

    /// [`TestDriver::take_used`] on queue `q`.
    pub fn take_used_from(&mut self, q: u16) -> Vec<(u32, u32)> {
        let used = DriverQueue::base(q) + USED_ADDR;
        let used_idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let dq = &mut self.queues[usize::from(q)];
        let mut out = Vec::new();
        while dq.used_seen != used_idx {
            let slot = used + 4 + 8 * u64::from(dq.used_seen % dq.size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("used elem");
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).expect("used elem");
            out.push((id, len));
            dq.used_seen = dq.used_seen.wrapping_add(1);
        }
        out
    }

    /// Notifies queue 0 through the QueueNotify register and lets the device handle the event.
    pub fn kick(&mut self) {
        self.kick_queue(0);
    }

    /// Notifies queue `q` through the QueueNotify register and lets the device handle the event
    /// (queue eventfds use their queue index as token).
    pub fn kick_queue(&mut self, q: u16) {
        self.write_reg(0x50, u32::from(q));
        self.transport.device_mut().handle_event(u32::from(q));
    }

    /// Writes `data` at guest address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("guest write");
    }

    /// Reads `len` bytes at guest address `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("guest read");
        buf
    }
}

/// Whether `fd` becomes readable within `timeout_ms` (0: whether it is readable now).
pub fn readable_within(fd: std::os::fd::RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes exactly one pollfd, which lives on this stack frame.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("devices-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
