//! Virtio devices and the virtio-mmio transport that exposes them to the guest.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] owns it, speaks the virtio-mmio
//! register protocol on the MMIO bus, and hands the device its queues when the driver sets
//! DRIVER_OK. Queue notifications arrive on per-queue eventfds (registered with KVM as ioeventfds, so
//! a guest kick never exits to user space) and interrupts leave through an irqfd.

pub mod balloon;
pub mod block;
pub mod dirty;
pub mod mmio;
pub mod net;
pub mod persist;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::EventSet;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK as TYPE_BLOCK, VIRTIO_ID_NET as TYPE_NET};

/// Feature bit: the device follows virtio 1.x ("modern"). Required by this transport.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: descriptors may point to indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: used/avail event indexes suppress notifications and interrupts.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Interrupt status bit: a queue has new used buffers.
const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration space changed.
const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Bit `bit` of a 64-bit feature word.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// The interrupt of one virtio device: the InterruptStatus register and the irqfd behind it.
#[derive(Debug)]
pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    /// Wraps an eventfd that KVM injects as this device's interrupt.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            irqfd,
            status: AtomicU32::new(0),
        }
    }

    /// Tells the driver that a queue has new used buffers. False when that joined an interrupt the
    /// driver has not acknowledged yet, so none was sent.
    pub fn signal_used_queue(&self) -> bool {
        self.raise(INT_VRING)
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    /// Sets `bit` and interrupts the guest, unless `bit` was already set: then an interrupt for it
    /// is pending or being handled, and the driver's handler reads the queues only after its
    /// InterruptACK, so it sees what the device published before this call. This is a level-triggered
    /// line's behaviour, as the virtio-mmio spec describes it; writing the irqfd every time would
    /// cost the guest an extra interrupt whenever the device publishes twice before the driver
    /// acknowledges (a transmit completion and the reply it caused, say), and under kvm_pvm's
    /// instruction emulation each interrupt costs the guest thousands of emulated instructions.
    fn raise(&self, bit: u32) -> bool {
        // SeqCst orders the caller's writes to the used ring before the bit, against the driver's
        // InterruptACK (`ack`, the same atomic) that comes before its reads of the used ring.
        let before = self.status.fetch_or(bit, Ordering::SeqCst);
        if before & bit != 0 {
            return false;
        }
        // The write only fails if the counter would overflow, and then an interrupt is pending anyway.
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("virtio interrupt: {e}");
        }
        true
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets InterruptStatus to a saved value, raising the interrupt again if any bit is set.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(0, Ordering::SeqCst);
        if bits != 0 {
            self.raise(bits);
        }
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// The queues, configured and validated, in queue-index order.
    pub queues: Vec<Queue>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Where to mark the guest pages the device writes, when the VM tracks them.
    pub dirty: Option<std::sync::Arc<dirty::DirtyPages>>,
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport passed.
        got: usize,
    },
    /// A queue is not ready or its rings lie outside guest memory.
    #[error("queue {0} is not ready or lies outside guest memory")]
    InvalidQueue(usize),
    /// The device could not set up its back end.
    #[error("{0}")]
    Backend(String),
}

/// A file descriptor a device wants the event loop to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSource {
    /// The descriptor.
    pub fd: RawFd,
    /// Passed back to [`VirtioDevice::handle_event`].
    pub token: u32,
    /// What to wait for, and how: level-triggered readability for eventfds and timers; a device
    /// that drains a source itself until `EAGAIN` (a tap) may ask for edge-triggered events so the
    /// loop does not wake it again for data it has chosen to leave unread.
    pub events: EventSet,
}

impl EventSource {
    /// Level-triggered readability: the loop calls the device for as long as `fd` is readable.
    pub fn readable(fd: RawFd, token: u32) -> Self {
        EventSource {
            fd,
            token,
            events: EventSet::IN,
        }
    }
}

/// A virtio device behind a transport.
///
/// The transport calls everything here with the device's lock held: register accesses come from
/// vCPU threads, [`VirtioDevice::handle_event`] from the VMM's event loop.
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of the queues (the first ones) a driver that accepted `acked_features` sets up;
    /// only those must be ready at DRIVER_OK and are handed over on activation. A device whose
    /// optional queues come with optional features (the balloon's) says fewer than all of them.
    fn queues_in_use(&self, acked_features: u64) -> usize {
        let _ = acked_features;
        self.queue_max_sizes().len()
    }
    /// The features the device offers.
    fn avail_features(&self) -> u64;
    /// Reads `data.len()` bytes of the configuration space at `offset`. Out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space. Devices with a read-only configuration ignore this.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Starts processing the queues.
    fn activate(
        &mut self,
        activation: Activation,
        interrupt: &std::sync::Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops processing, waits for requests in flight, and drops the queues. Afterwards the device
    /// can be activated again.
    fn reset(&mut self);
    /// Stops taking requests from the queues (the VM is being paused) and finishes the ones in
    /// flight, so that guest memory and the rings no longer change. Notifications that arrive
    /// meanwhile are remembered for [`VirtioDevice::resume`].
    fn pause(&mut self);
    /// Takes requests again, including any queued while paused.
    fn resume(&mut self);
    /// The live state of each queue while the device is started (the transport's copies only hold
    /// what the driver configured), in queue-index order; empty when not started.
    fn live_queues(&self) -> Vec<persist::QueueSnapshot>;
    /// Every file descriptor the event loop should watch for this device, each with a token that
    /// is passed back to [`VirtioDevice::handle_event`]. Queue eventfds use their queue index.
    fn event_sources(&self) -> Vec<EventSource>;
    /// Called when the source with `token` is ready. Called even before activation (a hostile
    /// driver may notify early): the device must then just consume the event.
    fn handle_event(&mut self, token: u32);
}

/// Consumes a pending eventfd signal. A failure means nothing was pending (spurious wake-up).
pub(crate) fn drain_eventfd(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            log::warn!("eventfd read: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_status_and_ack() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        interrupt.signal_used_queue();
        interrupt.signal_config_change();
        assert_eq!(interrupt.status(), INT_VRING | INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 2);
        interrupt.ack(INT_VRING);
        assert_eq!(interrupt.status(), INT_CONFIG);
        interrupt.clear();
        assert_eq!(interrupt.status(), 0);
    }

    #[test]
    fn an_unacknowledged_bit_interrupts_once() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        interrupt.signal_used_queue();
        interrupt.signal_used_queue();
        interrupt.signal_used_queue();
        assert_eq!(
            irq.read().unwrap(),
            1,
            "one interrupt until the driver acknowledges"
        );
        // A different bit still interrupts: a driver that read only CONFIG acknowledges only CONFIG.
        interrupt.signal_config_change();
        assert_eq!(irq.read().unwrap(), 1);
        interrupt.ack(INT_VRING);
        interrupt.signal_used_queue();
        assert_eq!(
            irq.read().unwrap(),
            1,
            "after the acknowledgement the next one interrupts again"
        );
        assert_eq!(interrupt.status(), INT_VRING | INT_CONFIG);
    }

    #[test]
    fn restored_status_interrupts() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        interrupt.signal_used_queue();
        assert_eq!(irq.read().unwrap(), 1);
        interrupt.restore_status(INT_VRING);
        assert_eq!(
            irq.read().unwrap(),
            1,
            "a restored pending bit is delivered again"
        );
        assert_eq!(interrupt.status(), INT_VRING);
    }
}
