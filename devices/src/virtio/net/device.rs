//! The virtio-net device: features, configuration space, activation, events, pause and reset.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::EventSet;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_api::rate_limiter::RateLimiterConfig;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::NetMetrics;
use super::rx::{self, RxState, RxStop};
use super::tap::{offload_flags, TapIo};
use super::tx::{self, TxState, TxStop};
use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

use crate::rate_limiter::{RateLimiter, RateLimiterError, RateLimiterState};
use crate::virtio::persist::{PersistError, QueueSnapshot};
use crate::virtio::{
    drain_eventfd, feature, ActivateError, Activation, EventSource, Interrupt, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Event token of the receive queue's notifications (its queue index).
pub const TOKEN_RX_QUEUE: u32 = RX_QUEUE as u32;
/// Event token of the transmit queue's notifications (its queue index).
pub const TOKEN_TX_QUEUE: u32 = TX_QUEUE as u32;
/// Event token of the tap (edge-triggered, readable or writable).
pub const TOKEN_TAP: u32 = 2;
/// Event token of the receive rate limiter's timer.
pub const TOKEN_RX_LIMITER: u32 = 3;
/// Event token of the transmit rate limiter's timer.
pub const TOKEN_TX_LIMITER: u32 = 4;
/// Event token of the timer that looks again at a frame held back for merging.
pub const TOKEN_RX_HOLD: u32 = 5;

/// Size of the configuration space: `mac` and `status` (`max_virtqueue_pairs` and later fields
/// only exist with features this device does not offer).
const CONFIG_LEN: usize = 8;

/// Why a NIC could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC address is all zeroes or a multicast address.
    #[error("NIC {id}: MAC address {mac} is not a unicast address")]
    InvalidMac {
        /// The NIC.
        id: String,
        /// The address, as text.
        mac: String,
    },
    /// Eventfds could not be created.
    #[error("NIC {id}: {source}")]
    Setup {
        /// The NIC.
        id: String,
        /// Why.
        source: std::io::Error,
    },
    /// The tap refused to clear its offloads.
    #[error("NIC {id}: tap {tap}: cannot set offloads")]
    Offload {
        /// The NIC.
        id: String,
        /// The tap.
        tap: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What a NIC keeps beyond its queues, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The link status the guest was told.
    pub link_up: bool,
    /// The receive limiter's buckets.
    pub rx_rate_limiter: RateLimiterState,
    /// The transmit limiter's buckets.
    pub tx_rate_limiter: RateLimiterState,
}

/// What a NIC is made of.
pub struct NetSpec {
    /// The NIC's name in the VMM (metrics, rate limiter updates).
    pub id: String,
    /// The back end, usually a [`Tap`](super::Tap).
    pub tap: Box<dyn TapIo>,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Throttling of frames to the guest; [`RateLimiter::unlimited`] for none.
    pub rx_rate_limiter: RateLimiter,
    /// Throttling of frames from the guest; [`RateLimiter::unlimited`] for none.
    pub tx_rate_limiter: RateLimiter,
}

/// What the device holds while the driver runs it.
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) acked: u64,
    pub(super) mrg_rxbuf: bool,
    pub(super) dirty: Option<Arc<crate::virtio::dirty::DirtyPages>>,
}

/// A virtio-net NIC on a tap.
pub struct Net {
    id: String,
    mac: [u8; 6],
    tap: Box<dyn TapIo>,
    avail_features: u64,
    link_up: bool,
    queue_evts: [EventFd; 2],
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    metrics: Arc<NetMetrics>,
    active: Option<Active>,
    rx: RxState,
    tx: TxState,
    /// Frames wait for the receive limiter's timer.
    rx_throttled: bool,
    /// Armed while a frame is held back for merging (see `rx`).
    hold_timer: TimerFd,
    /// Frames wait for the transmit limiter's timer.
    tx_throttled: bool,
    /// A transmit frame waits for the tap to take it.
    tx_tap_full: bool,
    /// The VM is paused: neither guest memory nor the rings are touched until `resume`.
    paused: bool,
}

impl Net {
    /// Creates a NIC. The tap's offloads are cleared until a driver accepts some.
    pub fn new(mut spec: NetSpec) -> Result<Net, NetError> {
        if spec.mac == [0; 6] || spec.mac[0] & 1 != 0 {
            return Err(NetError::InvalidMac {
                mac: format_mac(&spec.mac),
                id: spec.id,
            });
        }
        let setup = |source| NetError::Setup {
            id: spec.id.clone(),
            source,
        };
        let queue_evts = [
            EventFd::new(EFD_NONBLOCK).map_err(setup)?,
            EventFd::new(EFD_NONBLOCK).map_err(setup)?,
        ];
        let hold_timer = TimerFd::new().map_err(|e| setup(std::io::Error::from(e)))?;
        if let Err(source) = spec.tap.set_offload(0) {
            return Err(NetError::Offload {
                id: spec.id,
                tap: spec.tap.name().to_string(),
                source,
            });
        }
        let avail_features = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
        ]
        .into_iter()
        .fold(0, |acc, bit| acc | feature(bit));
        Ok(Net {
            id: spec.id,
            mac: spec.mac,
            tap: spec.tap,
            avail_features,
            link_up: true,
            queue_evts,
            rx_limiter: spec.rx_rate_limiter,
            tx_limiter: spec.tx_rate_limiter,
            metrics: Arc::new(NetMetrics::default()),
            active: None,
            rx: RxState::new(),
            tx: TxState::default(),
            rx_throttled: false,
            hold_timer,
            tx_throttled: false,
            tx_tap_full: false,
            paused: false,
        })
    }

    /// Announces the guest's MAC on its tap after a live migration, as QEMU does: a broadcast RARP
    /// from that MAC, so that bridges and switches learn the port it is behind now (the guest's IP
    /// and MAC are unchanged, so peers' ARP caches stay right). Sent `times` times in a row: a
    /// learning bridge needs one, the rest cover drops.
    pub fn announce(&mut self, times: usize) -> std::io::Result<()> {
        let frame = rarp_frame(self.mac);
        for _ in 0..times {
            super::tap::TxFrame::write_host(self.tap.as_mut(), &frame)?;
        }
        Ok(())
    }

    /// The NIC's name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The NIC's counters.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Whether the link is reported up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Reports the link up or down to the guest (the `status` field, with a configuration change
    /// interrupt if the driver accepted VIRTIO_NET_F_STATUS). Frames keep flowing either way; a
    /// driver stops using a NIC whose link is down.
    pub fn set_link_up(&mut self, up: bool) {
        if self.link_up == up {
            return;
        }
        self.link_up = up;
        if let Some(active) = &self.active {
            if active.acked & feature(VIRTIO_NET_F_STATUS) != 0 {
                active.interrupt.signal_config_change();
            }
        }
    }

    /// Applies new rate limits for either direction (`None` leaves a direction as it is). Both
    /// configurations are validated before either is applied. Frames held back resume when the
    /// limiter's timer fires, which an update of a blocked limiter makes happen at once.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), RateLimiterError> {
        for config in [rx, tx].into_iter().flatten() {
            config.validate()?;
        }
        if let Some(config) = rx {
            self.rx_limiter.update_buckets(config)?;
        }
        if let Some(config) = tx {
            self.tx_limiter.update_buckets(config)?;
        }
        Ok(())
    }

    /// The current limits, receive then transmit.
    pub fn rate_limiters(&self) -> (RateLimiterConfig, RateLimiterConfig) {
        (self.rx_limiter.config(), self.tx_limiter.config())
    }

    /// The NIC's state for a snapshot. A frame read from the tap but not yet delivered (with
    /// coalescing, up to 64 KiB of one connection's TCP segments, and the frame behind it) is not
    /// part of it: to the guest those are lost frames, which networks allow and TCP resends.
    pub fn save_state(&self) -> NetState {
        NetState {
            mac: self.mac,
            link_up: self.link_up,
            rx_rate_limiter: self.rx_limiter.save(),
            tx_rate_limiter: self.tx_limiter.save(),
        }
    }

    /// Applies a saved state to a NIC just created for a restored VM (its MAC must be the saved
    /// one: the guest's driver has read it). Leaves the NIC paused.
    pub fn restore_state(&mut self, state: &NetState) -> Result<(), PersistError> {
        if state.mac != self.mac {
            return Err(PersistError::Mismatch(format!(
                "NIC {}: saved with MAC {}, created with {}",
                self.id,
                format_mac(&state.mac),
                format_mac(&self.mac)
            )));
        }
        let limiter = |s| RateLimiter::restore(s).map_err(|e| PersistError::Mismatch(e.to_string()));
        self.rx_limiter = limiter(&state.rx_rate_limiter)?;
        self.tx_limiter = limiter(&state.tx_rate_limiter)?;
        self.link_up = state.link_up;
        self.paused = true;
        Ok(())
    }

    /// Whether a frame read from the tap waits for room in the guest.
    #[cfg(test)]
    pub(super) fn rx_frame_waiting(&self) -> bool {
        self.rx.has_pending()
    }

    fn process_rx(&mut self) {
        if self.paused || self.rx_throttled {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        match rx::process(
            &mut self.rx,
            active,
            self.tap.as_mut(),
            &mut self.rx_limiter,
            &self.metrics,
        ) {
            RxStop::Throttled => self.rx_throttled = true,
            // Come back after the rest of the event loop had its turn.
            RxStop::Budget => self.notify_self(RX_QUEUE),
            RxStop::Holding => self.look_again_soon(),
            RxStop::TapDrained | RxStop::NoBuffers | RxStop::TapErrors | RxStop::BrokenRing => {
                if self.rx.watching() {
                    self.look_again_soon();
                }
            }
        }
    }

    /// Arms the timer that looks at the receive ring again within [`rx::HOLD_CHECK`], for a held
    /// frame or a busy guest (see `pace`), unless it is armed already: rearming on every pass would
    /// put the look off for as long as frames keep coming.
    fn look_again_soon(&mut self) {
        if matches!(self.hold_timer.is_armed(), Ok(true)) {
            return;
        }
        if let Err(e) = self.hold_timer.reset(rx::HOLD_CHECK, None) {
            // Without the timer a held frame goes at the next tap event or notification.
            log::warn!("net {}: cannot arm the hold timer: {e}", self.id);
        }
    }

    fn process_tx(&mut self) {
        if self.paused || self.tx_throttled {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        self.tx_tap_full = false;
        match tx::process(
            &mut self.tx,
            active,
            self.tap.as_mut(),
            &mut self.tx_limiter,
            &self.metrics,
        ) {
            TxStop::Throttled => self.tx_throttled = true,
            TxStop::TapFull => self.tx_tap_full = true,
            TxStop::Budget => self.notify_self(TX_QUEUE),
            TxStop::Done => {}
        }
    }

    /// Signals one of our own queue eventfds, so the event loop calls back later.
    fn notify_self(&self, queue: usize) {
        if let Some(evt) = self.queue_evts.get(queue) {
            if let Err(e) = evt.write(1) {
                log::warn!("net {}: cannot reschedule queue {queue}: {e}", self.id);
            }
        }
    }

    fn limiter_fired(&mut self, tx: bool) {
        let limiter = if tx {
            &mut self.tx_limiter
        } else {
            &mut self.rx_limiter
        };
        if let Err(e) = limiter.event_handler() {
            log::warn!("net {}: rate limiter: {e}", self.id);
        }
        if tx {
            self.tx_throttled = false;
            self.process_tx();
        } else {
            self.rx_throttled = false;
            self.process_rx();
        }
    }
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&self.mac);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only by legacy drivers; virtio 1.x changes it through the control
        // queue, which is not offered.
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(&mut self, activation: Activation, interrupt: &Arc<Interrupt>) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let mut queues = activation.queues.into_iter();
        let (Some(mut rxq), Some(txq), None) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let acked = activation.acked_features;
        let offloads = offload_flags(acked);
        if let Err(e) = self.tap.set_offload(offloads) {
            // Fewer offloads are always safe: the guest then just receives plain frames.
            log::warn!(
                "net {}: tap {} refused offloads {offloads:#x} ({e}), using none",
                self.id,
                self.tap.name()
            );
            self.tap.set_offload(0).map_err(|e| {
                ActivateError::Backend(format!("tap {}: cannot set offloads: {e}", self.tap.name()))
            })?;
        }
        // Receive notifications are only wanted once the guest runs out of buffers.
        if let Err(e) = rxq.disable_notification(&activation.mem) {
            log::warn!("net {}: {e}", self.id);
        }
        self.active = Some(Active {
            mem: activation.mem,
            rx: rxq,
            tx: txq,
            interrupt: Arc::clone(interrupt),
            acked,
            mrg_rxbuf: acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
            dirty: activation.dirty,
        });
        // Frames the driver queued before DRIVER_OK, and frames the tap queued meanwhile (whose
        // edge-triggered event came before there was anywhere to put them).
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx.clear();
        self.tx_tap_full = false;
        // The next driver may accept fewer offloads.
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!(
                "net {}: tap {}: cannot clear offloads: {e}",
                self.id,
                self.tap.name()
            );
        }
    }

    fn pause(&mut self) {
        // Frames are moved synchronously inside event handling, so nothing is in flight once this
        // flag is set: guest memory and the rings stay as they are until `resume`.
        self.paused = true;
    }

    fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        // Notifications and tap edges that arrived while paused were consumed without action;
        // serving both directions now covers them all.
        self.process_tx();
        self.process_rx();
    }

    fn live_queues(&self) -> Vec<QueueSnapshot> {
        self.active
            .iter()
            .flat_map(|a| [QueueSnapshot::of(&a.rx), QueueSnapshot::of(&a.tx)])
            .collect()
    }

    fn event_sources(&self) -> Vec<EventSource> {
        vec![
            EventSource::readable(self.queue_evts[RX_QUEUE].as_raw_fd(), TOKEN_RX_QUEUE),
            EventSource::readable(self.queue_evts[TX_QUEUE].as_raw_fd(), TOKEN_TX_QUEUE),
            // Edge-triggered: the device reads the tap until EAGAIN unless it has a reason to stop,
            // and each reason has its own wake-up (see `rx`). Level-triggered, a tap with frames
            // queued and a guest without buffers would wake the loop in a busy circle. Writable
            // edges resume a transmit frame the tap refused with EAGAIN.
            EventSource {
                fd: self.tap.as_raw_fd(),
                token: TOKEN_TAP,
                events: EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            },
            EventSource::readable(self.rx_limiter.as_raw_fd(), TOKEN_RX_LIMITER),
            EventSource::readable(self.tx_limiter.as_raw_fd(), TOKEN_TX_LIMITER),
            EventSource::readable(self.hold_timer.as_raw_fd(), TOKEN_RX_HOLD),
        ]
    }

    fn handle_event(&mut self, token: u32) {
        match token {
            TOKEN_RX_QUEUE => {
                drain_eventfd(&self.queue_evts[RX_QUEUE]);
                NetMetrics::inc(&self.metrics.rx_queue_events);
                if let Some(active) = self.active.as_mut() {
                    if !self.paused {
                        // Back to no notifications until the buffers run out again.
                        if let Err(e) = active.rx.disable_notification(&active.mem) {
                            log::warn!("net {}: {e}", self.id);
                        }
                    }
                }
                self.process_rx();
            }
            TOKEN_TX_QUEUE => {
                drain_eventfd(&self.queue_evts[TX_QUEUE]);
                NetMetrics::inc(&self.metrics.tx_queue_events);
                self.process_tx();
            }
            TOKEN_TAP => {
                NetMetrics::inc(&self.metrics.tap_events);
                if self.tx_tap_full {
                    self.process_tx();
                }
                self.process_rx();
            }
            TOKEN_RX_LIMITER => self.limiter_fired(false),
            TOKEN_RX_HOLD => {
                // The timerfd blocks on read: read it only once it has expired (no longer armed).
                if matches!(self.hold_timer.is_armed(), Ok(false)) {
                    if let Err(e) = self.hold_timer.wait() {
                        log::warn!("net {}: hold timer: {e}", self.id);
                    }
                }
                self.process_rx();
            }
            TOKEN_TX_LIMITER => self.limiter_fired(true),
            _ => log::error!("net {}: unknown event token {token}", self.id),
        }
    }
}

/// A broadcast RARP request (reverse request, ethertype 0x8035) from `mac`, after an empty
/// virtio-net header, padded to the Ethernet minimum.
fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; super::HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]);
    // Ethernet, IPv4, 6-byte and 4-byte addresses, "reverse request"; sender and target are the
    // guest's MAC with no IP.
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(super::HDR_LEN + 60, 0);
    f
}

#[cfg(test)]
mod announce_tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_from_the_guest_mac() {
        let mac = [0x02, 0, 0, 0, 0x79, 0x02];
        let f = rarp_frame(mac);
        let eth = &f[crate::virtio::net::HDR_LEN..];
        assert_eq!(eth.len(), 60);
        assert_eq!(&eth[..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &mac);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
        assert_eq!(&eth[20..22], &[0, 3], "reverse request");
        assert_eq!(&eth[22..28], &mac);
        assert_eq!(&eth[32..38], &mac);
        assert!(f[..crate::virtio::net::HDR_LEN].iter().all(|b| *b == 0));
    }
}
