//! Emulated devices of the `vmm`.
//!
//! Devices know nothing of KVM: they are reached through a [`bus::Bus`] and signal the rest of the VMM
//! through [`vmm_sys_util::eventfd::EventFd`]s (an irqfd for interrupts, plain eventfds for events such
//! as "the guest asked to power off").

pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod timer;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line backed by an eventfd (registered with KVM as an irqfd).
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Wraps an eventfd that KVM injects as an interrupt when written.
    pub fn new(evt: EventFd) -> Self {
        IrqLine(evt)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals one event (such as "guest requested reset") to the VMM's event loop.
#[derive(Debug)]
pub struct EventSignal(EventFd);

impl EventSignal {
    /// Wraps an eventfd that the VMM's event loop watches.
    pub fn new(evt: EventFd) -> Self {
        EventSignal(evt)
    }

    /// Raises the event. A failure can only mean the eventfd counter is saturated, which still wakes the
    /// loop, so it is logged and otherwise ignored.
    pub fn raise(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("failed to signal event: {e}");
        }
    }
}

impl vm_superio::Trigger for EventSignal {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
