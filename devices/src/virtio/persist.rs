//! Saving and restoring virtio devices for snapshots: the transport's registers, each queue's
//! position, and whatever state the device itself keeps.
//!
//! A device is saved paused, after it has finished its requests in flight (see
//! [`super::VirtioDevice::pause`]), so the rings and guest memory hold everything the guest can
//! observe. It is restored paused too: [`MmioTransport::restore`] re-activates it from the saved
//! queues without the driver's involvement, and the VM's resume starts it.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::MmioTransport;
use super::{Activation, VirtioDevice};

/// Why a saved device could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The saved state does not fit this device (another type, other queue sizes).
    #[error("saved state does not match the device: {0}")]
    Mismatch(String),
    /// A saved queue is invalid (size, ring addresses outside guest memory).
    #[error("saved queue {0} is invalid")]
    InvalidQueue(usize),
    /// The device refused to start from the saved state.
    #[error("device refused to start: {0}")]
    Activate(String),
    /// The device still had requests in flight.
    #[error("device {0} has requests in flight")]
    InFlight(String),
}

/// One virtqueue: its configuration and the device's positions in its rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available entry the device will take.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl QueueSnapshot {
    /// The state of `queue` now.
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// A queue in this state (sizes and alignment checked by virtio-queue).
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// The virtio-mmio registers of one device and its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The virtio device type, to refuse a state saved from another kind of device.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device was started (DRIVER_OK accepted).
    pub activated: bool,
    /// The driver wrote a queue size the queue refused.
    pub queue_config_refused: bool,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Every queue: the device's live positions if activated, else the registers as written.
    pub queues: Vec<QueueSnapshot>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's state. The device must be paused.
    pub fn save(&self) -> MmioState {
        let live = if self.activated {
            self.device.live_queues()
        } else {
            Vec::new()
        };
        // The device's live positions for the queues it runs, the registers for the rest (queues a
        // driver did not set up, or all of them before activation).
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| live.get(i).copied().unwrap_or_else(|| QueueSnapshot::of(q)))
            .collect();
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            activated: self.activated,
            queue_config_refused: self.queue_config_refused,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Puts a freshly created transport (device paused, guest memory restored) in the saved
    /// state, starting the device from the saved queues if it was started. Checks everything it
    /// is given: a state file is input too.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), PersistError> {
        let mismatch = |what: String| Err(PersistError::Mismatch(what));
        if state.device_type != self.device.device_type() {
            return mismatch(format!(
                "device type {} saved, {} here",
                state.device_type,
                self.device.device_type()
            ));
        }
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len()
            || state.queues.iter().zip(max_sizes).any(|(q, &m)| q.max_size != m)
        {
            return mismatch("queue count or sizes differ".into());
        }
        if state.acked_features & !self.device.avail_features() != 0 {
            return mismatch("the driver accepted features this device does not offer".into());
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.to_queue().map_err(|_| PersistError::InvalidQueue(i)))
            .collect::<Result<Vec<_>, _>>()?;
        if state.activated {
            let in_use = self.device.queues_in_use(state.acked_features).min(queues.len());
            if let Some(i) = queues[..in_use]
                .iter()
                .position(|q| !q.ready() || !q.is_valid(&self.mem))
            {
                return Err(PersistError::InvalidQueue(i));
            }
            let live = queues[..in_use]
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| PersistError::Activate(e.to_string()))?;
            let activation = Activation {
                mem: self.mem.clone(),
                queues: live,
                acked_features: state.acked_features,
                dirty: self.dirty.clone(),
            };
            self.device
                .activate(activation, &self.interrupt)
                .map_err(|e| PersistError::Activate(e.to_string()))?;
        }
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.activated = state.activated;
        self.queue_config_refused = state.queue_config_refused;
        // An interrupt the guest had not acknowledged is raised again: a spurious one costs the
        // driver a status read, a lost one could stall it.
        self.interrupt.restore_status(state.interrupt_status);
        Ok(())
    }
}
