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
const DESC_ADDR: u64 = 0x1000;
const AVAIL_ADDR: u64 = 0x8000;
const USED_ADDR: u64 = 0x9000;

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

/// A guest driver for one single-queue-or-more device behind an [`MmioTransport`].
pub struct TestDriver<D: VirtioDevice> {
    /// The device under test, behind its transport.
    pub transport: MmioTransport<D>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The irqfd the device signals.
    pub irq: EventFd,
    queue_size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<D: VirtioDevice> TestDriver<D> {
    /// Wraps `device` in a transport over fresh guest memory; the driver is not initialised yet.
    pub fn new(device: D) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("eventfd clone")));
        TestDriver {
            transport: MmioTransport::new(device, mem.clone(), interrupt),
            mem,
            irq,
            queue_size: 0,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
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

    /// Runs the initialisation sequence accepting `features`, with queue 0 of `queue_size` entries.
    /// Returns the device status afterwards.
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
        self.setup_queue(queue_size);
        self.write_reg(0x70, s | VIRTIO_CONFIG_S_DRIVER_OK);
        self.read_reg(0x70)
    }

    fn setup_queue(&mut self, size: u16) {
        self.queue_size = size;
        self.next_desc = 0;
        self.avail_idx = 0;
        self.used_seen = 0;
        // Clean rings, as a freshly allocated driver ring would be.
        let zeroes = vec![0u8; (USED_ADDR + 0x1000 - DESC_ADDR) as usize];
        self.mem
            .write_slice(&zeroes, GuestAddress(DESC_ADDR))
            .expect("ring memory");
        self.write_reg(0x30, 0);
        self.write_reg(0x38, u32::from(size));
        self.write_reg(0x80, DESC_ADDR as u32);
        self.write_reg(0x84, 0);
        self.write_reg(0x90, AVAIL_ADDR as u32);
        self.write_reg(0x94, 0);
        self.write_reg(0xa0, USED_ADDR as u32);
        self.write_reg(0xa4, 0);
        self.write_reg(0x44, 1);
    }

    /// Writes one raw descriptor at `index` of the descriptor table.
    pub fn write_desc(&self, index: u16, desc: Desc, next: u16) {
        let addr = GuestAddress(DESC_ADDR + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&desc.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&desc.len.to_le_bytes());
        raw[12..14].copy_from_slice(&desc.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, addr).expect("descriptor table");
    }

    /// Writes `descs` as one chain into free table slots and makes it available. Returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let size = self.queue_size;
        let head = self.next_desc % size;
        for (i, d) in descs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % size;
            let next = (index + 1) % size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= F_NEXT;
            }
            self.write_desc(index, d, next);
        }
        self.next_desc = self.next_desc.wrapping_add(descs.len().max(1) as u16);
        self.publish(head);
        head
    }

    /// Puts `head` on the available ring (for hand-built, possibly malformed, chains).
    pub fn publish(&mut self, head: u16) {
        let slot = AVAIL_ADDR + 4 + 2 * u64::from(self.avail_idx % self.queue_size);
        self.mem.write_obj(head, GuestAddress(slot)).expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_ADDR + 2))
            .expect("avail idx");
    }

    /// Overwrites the available index (to test a driver that lies about it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(AVAIL_ADDR + 2))
            .expect("avail idx");
    }

    /// Used entries `(head, len)` added since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED_ADDR + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != used_idx {
            let slot = USED_ADDR + 4 + 8 * u64::from(self.used_seen % self.queue_size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).expect("used elem");
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).expect("used elem");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Notifies queue 0 through the QueueNotify register and lets the device handle the event.
    pub fn kick(&mut self) {
        self.write_reg(0x50, 0);
        self.transport.device_mut().handle_event(0);
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
