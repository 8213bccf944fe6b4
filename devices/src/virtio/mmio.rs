//! The virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2, section 4.2.2).
//!
//! Every value here comes from the guest, so every write is checked against the device status state
//! machine: queue registers only change between FEATURES_OK and DRIVER_OK, features only before
//! FEATURES_OK, and anything out of order is ignored (and logged, rate-limited) rather than trusted.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{feature, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of one device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "QEMU"'s vendor ID is used by most VMMs; drivers do not look at it.
const VENDOR_ID: u32 = 0x554d_4551;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register, where KVM ioeventfds are attached.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// A virtio device on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice> {
    pub(super) device: D,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queues: Vec<Queue>,
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) acked_features: u64,
    pub(super) queue_sel: u32,
    pub(super) config_generation: u32,
    pub(super) activated: bool,
    /// The driver wrote a queue setting the queue refused.
    pub(super) queue_config_refused: bool,
    /// Where the device marks the pages it writes, if the VM tracks them.
    pub(super) dirty: Option<Arc<super::dirty::DirtyPages>>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a transport that raises `interrupt`.
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            queue_config_refused: false,
            dirty: None,
        }
    }

    /// Makes the device mark the guest pages it writes in `dirty` from its next activation on.
    pub fn track_dirty_pages(&mut self, dirty: Arc<super::dirty::DirtyPages>) {
        self.dirty = Some(dirty);
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (for run-time changes such as rate limits).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Stops the device's queue processing (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) {
        self.device.pause();
    }

    /// Restarts the device's queue processing.
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// Whether the driver has started the device.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn has_status(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may only be written while the driver sets the device up.
    fn queue_config_allowed(&self) -> bool {
        self.has_status(VIRTIO_CONFIG_S_FEATURES_OK) && !self.has_status(VIRTIO_CONFIG_S_DRIVER_OK)
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            warn_guest("queue register written outside device setup");
            return;
        }
        match self.selected_queue() {
            Some(q) => f(q),
            None => warn_guest("queue register written with an invalid QueueSel"),
        }
    }

    fn read_queue(&self, f: impl FnOnce(&Queue) -> u32) -> u32 {
        self.queues.get(self.queue_sel as usize).map(f).unwrap_or(0)
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, one step of the initialisation sequence at a time.
        let added = value & !self.status;
        if value & self.status != self.status {
            warn_guest("driver cleared device status bits without a reset");
            return;
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        let driver = ack | VIRTIO_CONFIG_S_DRIVER;
        let features_ok = driver | VIRTIO_CONFIG_S_FEATURES_OK;
        match added {
            VIRTIO_CONFIG_S_ACKNOWLEDGE if self.status == 0 => self.status = value,
            VIRTIO_CONFIG_S_DRIVER if self.status == ack => self.status = value,
            VIRTIO_CONFIG_S_FEATURES_OK if self.status == driver => {
                // Leaving FEATURES_OK unset tells the driver its feature set was refused.
                if self.features_acceptable() {
                    self.status = value;
                }
            }
            VIRTIO_CONFIG_S_DRIVER_OK if self.status == features_ok => {
                self.status = value;
                self.activate();
            }
            _ => warn_guest("device status written out of order"),
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.acked_features & !offered == 0 && self.acked_features & feature(VIRTIO_F_VERSION_1) != 0
    }

    /// The queues the driver sets up for the features it accepted.
    fn queues_in_use(&self, acked_features: u64) -> usize {
        self.device.queues_in_use(acked_features).min(self.queues.len())
    }

    /// Tells the driver that the device changed its configuration space (a new balloon target).
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.activated {
            self.interrupt.signal_config_change();
        }
    }

    fn activate(&mut self) {
        let in_use = self.queues_in_use(self.acked_features);
        let invalid = self.queues[..in_use]
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.mem));
        if self.queue_config_refused {
            log::warn!("virtio: driver started the device with a refused queue size");
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            return;
        }
        if let Some(index) = invalid {
            log::warn!("virtio: driver started the device with unusable queue {index}");
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            return;
        }
        let event_idx = self.acked_features & feature(super::VIRTIO_RING_F_EVENT_IDX) != 0;
        // The device gets live copies; the transport keeps its own so the registers read back.
        let queues: Result<Vec<Queue>, _> = self.queues[..in_use]
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let mut queues = match queues {
            Ok(queues) => queues,
            Err(e) => {
                log::warn!("virtio: driver configured an invalid queue: {e}");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
        };
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
            dirty: self.dirty.clone(),
        };
        match self.device.activate(activation, &self.interrupt) {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::warn!("virtio: device failed to start: {e}");
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.queues = new_queues(self.device.queue_max_sizes());
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.queue_config_refused = false;
        self.interrupt.clear();
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.read_queue(|q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.read_queue(|q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::QUEUE_DESC_LOW => self.read_queue(|q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => self.read_queue(|q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => self.read_queue(|q| q.avail_ring() as u32),
            reg::QUEUE_DRIVER_HIGH => self.read_queue(|q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => self.read_queue(|q| q.used_ring() as u32),
            reg::QUEUE_DEVICE_HIGH => self.read_queue(|q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: a length of all ones means "does not exist".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                warn_guest("read of an unknown or write-only virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.has_status(VIRTIO_CONFIG_S_DRIVER) && !self.has_status(VIRTIO_CONFIG_S_FEATURES_OK) {
                    let shift = match self.driver_features_sel {
                        0 => 0,
                        1 => 32,
                        _ => return,
                    };
                    self.acked_features &= !(u64::from(u32::MAX) << shift);
                    self.acked_features |= u64::from(value) << shift;
                } else {
                    warn_guest("driver features written outside feature negotiation");
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                let mut refused = false;
                self.update_queue(|q| {
                    // Sizes must be powers of two no larger than the maximum. The queue keeps its old
                    // size when refusing one, so remember the refusal and fail DRIVER_OK.
                    refused = u16::try_from(value).map_or(true, |size| q.try_set_size(size).is_err());
                });
                self.queue_config_refused |= refused;
            }
            reg::QUEUE_READY => self.update_queue(|q| q.set_ready(value == 1)),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => self.update_queue(|q| q.set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => self.update_queue(|q| q.set_desc_table_address(None, Some(value))),
            reg::QUEUE_DRIVER_LOW => self.update_queue(|q| q.set_avail_ring_address(Some(value), None)),
            reg::QUEUE_DRIVER_HIGH => self.update_queue(|q| q.set_avail_ring_address(None, Some(value))),
            reg::QUEUE_DEVICE_LOW => self.update_queue(|q| q.set_used_ring_address(Some(value), None)),
            reg::QUEUE_DEVICE_HIGH => self.update_queue(|q| q.set_used_ring_address(None, Some(value))),
            reg::SHM_SEL => {}
            _ => warn_guest("write to an unknown or read-only virtio-mmio register"),
        }
    }

    /// A notification that reached user space (no ioeventfd registered, e.g. in tests): forward it
    /// to the queue's eventfd so it is handled like one that KVM delivered.
    fn notify(&mut self, queue: u32) {
        match self.device.queue_events().get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::warn!("virtio: queue notification: {e}");
                }
            }
            None => warn_guest("notification for a queue that does not exist"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and must be accessed as such.
        let Ok(bytes) = <&mut [u8; 4]>::try_from(data) else {
            warn_guest("virtio-mmio register read that is not 32 bits wide");
            return;
        };
        if !offset.is_multiple_of(4) {
            warn_guest("unaligned virtio-mmio register read");
            *bytes = [0; 4];
            return;
        }
        *bytes = self.read_register(offset).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.has_status(VIRTIO_CONFIG_S_DRIVER) {
                self.device.write_config(offset - reg::CONFIG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_guest("virtio-mmio register write that is not 32 bits wide");
            return;
        };
        if !offset.is_multiple_of(4) {
            warn_guest("unaligned virtio-mmio register write");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

/// The event loop side: queue eventfds and the device's own sources (I/O completions, timers).
impl<D: VirtioDevice> MutEventSubscriber for MmioTransport<D> {
    fn init(&mut self, ops: &mut EventOps) {
        for source in self.device.event_sources() {
            if let Err(e) = ops.add(Events::with_data_raw(source.fd, source.token, source.events)) {
                log::error!("virtio: cannot watch device event source: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        self.device.handle_event(events.data());
    }
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&size| match Queue::new(size) {
            Ok(q) => Some(q),
            Err(e) => {
                // Device constructors use constant power-of-two sizes; this is a programming error.
                log::error!("virtio: invalid queue size {size}: {e}");
                None
            }
        })
        .collect()
}

/// Logs a driver's protocol violation. Rate limiting happens in the logger.
fn warn_guest(what: &str) {
    log::warn!("virtio-mmio: {what}");
}
