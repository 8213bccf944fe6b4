//! virtio-net against the in-memory driver and a socket-pair tap: both directions, mergeable
//! buffers and a guest without buffers (`data_path`); oversized frames, hostile chains, failing
//! taps and a randomized run (`hostile`); rate limits, pause, interrupt suppression and reset
//! (`control`).

mod control;
mod data_path;
mod hostile;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_GSO_TCPV4,
};
use vmm_api::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

use super::test_tap::{Peer, SocketTap, TapControl};
use super::*;
use crate::rate_limiter::RateLimiter;
use crate::virtio::test_utils::{readable_within, Desc, TestDriver, DATA_START, F_INDIRECT, MEM_SIZE};
use crate::virtio::{
    feature, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x12, 0x34, 0x56];
const RXQ: u16 = 0;
const TXQ: u16 = 1;
/// Receive buffers live here, transmit frames above.
const RX_AREA: u64 = DATA_START + 0x10_0000;
const TX_AREA: u64 = DATA_START + 0x80_0000;

struct Rig {
    driver: TestDriver<Net>,
    peer: Peer,
    ctl: Arc<TapControl>,
    next_rx: u64,
    next_tx: u64,
    /// Address of each posted receive buffer, by head.
    rx_addrs: std::collections::HashMap<u32, u64>,
}

fn unlimited() -> RateLimiter {
    RateLimiter::unlimited().unwrap()
}

fn new_net(rx: RateLimiter, tx: RateLimiter) -> (Net, Peer, Arc<TapControl>) {
    let (tap, peer, ctl) = SocketTap::pair();
    let net = Net::new(NetSpec {
        id: "net0".into(),
        tap: Box::new(tap),
        mac: MAC,
        rx_rate_limiter: rx,
        tx_rate_limiter: tx,
    })
    .unwrap();
    (net, peer, ctl)
}

/// A started device accepting `features` (all offered, minus `remove`).
fn rig_opts(remove: u64, queue_size: u16, rx: RateLimiter, tx: RateLimiter) -> Rig {
    let (net, peer, ctl) = new_net(rx, tx);
    let mut driver = TestDriver::new(net);
    let features = driver.device_features() & !remove;
    let status = driver.init(features, queue_size);
    assert_eq!(status & 0x4, 0x4, "DRIVER_OK not set: {status:#x}");
    assert!(driver.transport.is_activated());
    Rig {
        driver,
        peer,
        ctl,
        next_rx: RX_AREA,
        next_tx: TX_AREA,
        rx_addrs: Default::default(),
    }
}

fn rig() -> Rig {
    rig_opts(0, QUEUE_SIZE, unlimited(), unlimited())
}

fn rig_without_mrg() -> Rig {
    rig_opts(
        feature(VIRTIO_NET_F_MRG_RXBUF),
        QUEUE_SIZE,
        unlimited(),
        unlimited(),
    )
}

/// A frame as it travels: a zero virtio-net header, then `len` payload bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// What the guest should see for `f` delivered in `buffers` buffers.
fn as_received(f: &[u8], buffers: u16) -> Vec<u8> {
    let mut f = f.to_vec();
    f[10..12].copy_from_slice(&buffers.to_le_bytes());
    f
}

impl Rig {
    fn dev(&self) -> &Net {
        self.driver.transport.device()
    }

    fn dev_mut(&mut self) -> &mut Net {
        self.driver.transport.device_mut()
    }

    fn metrics(&self) -> NetMetricsSnapshot {
        self.dev().metrics().snapshot()
    }

    /// Posts one receive buffer of `len` bytes; returns (head, address).
    fn post_rx(&mut self, len: u32) -> (u16, u64) {
        let addr = self.next_rx;
        self.next_rx += u64::from(len).next_multiple_of(64);
        if self.next_rx >= TX_AREA {
            self.next_rx = RX_AREA;
        }
        let head = self.driver.add_chain_to(RXQ, &[Desc::writable(addr, len)]);
        self.rx_addrs.insert(u32::from(head), addr);
        (head, addr)
    }

    /// Puts `f` in guest memory as a transmit chain: header and data in separate descriptors.
    fn queue_tx(&mut self, f: &[u8]) -> u16 {
        let addr = self.tx_addr(f.len());
        self.driver.write(addr, f);
        self.driver.add_chain_to(
            TXQ,
            &[
                Desc::readable(addr, HDR_LEN as u32),
                Desc::readable(addr + HDR_LEN as u64, (f.len() - HDR_LEN) as u32),
            ],
        )
    }

    fn tx_addr(&mut self, len: usize) -> u64 {
        if self.next_tx + len as u64 >= MEM_SIZE as u64 {
            self.next_tx = TX_AREA;
        }
        let addr = self.next_tx;
        self.next_tx += (len as u64).next_multiple_of(64);
        addr
    }

    fn kick_tx(&mut self) {
        self.driver.kick_queue(TXQ);
    }

    fn kick_rx(&mut self) {
        self.driver.kick_queue(RXQ);
    }

    fn tap_event(&mut self) {
        self.dev_mut().handle_event(TOKEN_TAP);
    }

    /// Interrupts raised since the last call (the irqfd's counter).
    fn interrupts(&self) -> u64 {
        self.driver.irq.read().unwrap_or(0)
    }

    fn source_fd(&self, token: u32) -> i32 {
        self.dev()
            .event_sources()
            .into_iter()
            .find(|s| s.token == token)
            .unwrap()
            .fd
    }

    /// Checks that both directions still work.
    fn assert_still_serves(&mut self) {
        let f = frame(100, 0xaa);
        self.queue_tx(&f);
        self.kick_tx();
        assert_eq!(self.peer.recv_all().last(), Some(&f), "transmit broken");
        self.post_rx(2048);
        self.kick_rx();
        self.peer.send(&f);
        self.tap_event();
        let used = self.driver.take_used_from(RXQ);
        let &(head, len) = used.last().expect("receive broken");
        assert_eq!(len, f.len() as u32, "receive broken");
        assert_eq!(
            self.driver.read(self.rx_addrs[&head], f.len()),
            as_received(&f, 1)
        );
    }
}
