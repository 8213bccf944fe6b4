//! virtio-net against the in-memory driver and a socket-pair tap: both directions, mergeable
//! buffers, a guest without buffers, oversized frames, hostile chains, failing taps, rate limits,
//! pause, and a randomized run.

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

#[test]
fn features_config_space_and_offloads() {
    let (net, _peer, ctl) = new_net(unlimited(), unlimited());
    assert_eq!(
        ctl.offload.load(Ordering::SeqCst),
        0,
        "offloads cleared at creation"
    );
    let mut driver = TestDriver::new(net);
    assert_eq!(driver.read_reg(8), TYPE_NET);
    let features = driver.device_features();
    for bit in [
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
        VIRTIO_NET_F_HOST_UFO,
    ] {
        assert_ne!(features & feature(bit), 0, "feature {bit} missing");
    }
    let mut config = [0xffu8; 10];
    driver.transport.device().read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(&config[8..], &[0, 0], "no max_virtqueue_pairs without MQ");
    let mut far = [0xffu8; 2];
    driver.transport.device().read_config(4096, &mut far);
    assert_eq!(far, [0, 0]);

    // The tap gets exactly the offloads the guest accepted, and loses them on reset.
    assert_eq!(driver.init(features, QUEUE_SIZE) & 0x4, 0x4);
    assert_eq!(
        ctl.offload.load(Ordering::SeqCst),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO
    );
    driver.write_reg(0x70, 0);
    assert_eq!(ctl.offload.load(Ordering::SeqCst), 0);
    let plain = features & !feature(VIRTIO_NET_F_GUEST_CSUM);
    assert_eq!(driver.init(plain, QUEUE_SIZE) & 0x4, 0x4);
    assert_eq!(ctl.offload.load(Ordering::SeqCst), 0);

    // A tap that refuses the offloads falls back to none; the device still starts.
    // (The reset at the start of init clears offloads first: that call fails too, harmlessly.)
    ctl.offload_errors.store(2, Ordering::SeqCst);
    assert_eq!(driver.init(features, QUEUE_SIZE) & 0x44, 0x4);
    assert_eq!(ctl.offload.load(Ordering::SeqCst), 0);

    // Link status changes reach the guest as a configuration interrupt.
    while driver.irq.read().is_ok() {}
    driver.transport.device_mut().set_link_up(false);
    driver.transport.device().read_config(6, &mut far);
    assert_eq!(far, [0, 0]);
    assert_eq!(driver.irq.read().unwrap(), 1);
    assert_eq!(driver.read_reg(0x60) & 2, 2, "config change interrupt status");
}

#[test]
fn bad_mac_is_refused() {
    for mac in [[0u8; 6], [1, 0, 0, 0, 0, 1]] {
        let (tap, _peer, _) = SocketTap::pair();
        let err = Net::new(NetSpec {
            id: "n".into(),
            tap: Box::new(tap),
            mac,
            rx_rate_limiter: unlimited(),
            tx_rate_limiter: unlimited(),
        })
        .err()
        .unwrap();
        assert!(matches!(err, NetError::InvalidMac { .. }), "{err}");
    }
}

#[test]
fn frames_go_from_guest_to_tap() {
    let mut r = rig();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(60 + i * 700, i as u8)).collect();
    let heads: Vec<u16> = frames.iter().map(|f| r.queue_tx(f)).collect();
    r.kick_tx();
    assert_eq!(r.peer.recv_all(), frames);
    let used = r.driver.take_used_from(TXQ);
    assert_eq!(used, heads.iter().map(|&h| (u32::from(h), 0)).collect::<Vec<_>>());
    let m = r.metrics();
    assert_eq!((m.tx_frames, m.tx_bytes), (3, (60 + 760 + 1460) as u64));
    assert_eq!(r.interrupts(), 1, "one interrupt for the batch");

    // Header and frame in one descriptor, and through an indirect table.
    let f = frame(200, 9);
    let addr = r.tx_addr(f.len());
    r.driver.write(addr, &f);
    r.driver
        .add_chain_to(TXQ, &[Desc::readable(addr, f.len() as u32)]);
    let table = r.tx_addr(48);
    let mut raw = Vec::new();
    for (i, (a, l)) in [(addr, 5u32), (addr + 5, 100), (addr + 105, f.len() as u32 - 105)]
        .into_iter()
        .enumerate()
    {
        let (flags, next) = if i < 2 { (1u16, i as u16 + 1) } else { (0, 0) };
        raw.extend_from_slice(&a.to_le_bytes());
        raw.extend_from_slice(&l.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
    }
    r.driver.write(table, &raw);
    r.driver.add_chain_to(
        TXQ,
        &[Desc {
            addr: table,
            len: 48,
            flags: F_INDIRECT,
        }],
    );
    r.kick_tx();
    assert_eq!(r.peer.recv_all(), vec![f.clone(), f]);
}

#[test]
fn frames_go_from_tap_to_guest_in_one_buffer_each() {
    let mut r = rig_without_mrg();
    let bufs: Vec<(u16, u64)> = (0..4).map(|_| r.post_rx(2048)).collect();
    r.kick_rx();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(60 + i * 500, i as u8)).collect();
    for f in &frames {
        r.peer.send(f);
    }
    r.tap_event();
    let used = r.driver.take_used_from(RXQ);
    assert_eq!(used.len(), 3);
    for ((f, (head, addr)), (id, len)) in frames.iter().zip(&bufs).zip(&used) {
        assert_eq!((*id, *len), (u32::from(*head), f.len() as u32));
        assert_eq!(r.driver.read(*addr, f.len()), as_received(f, 1));
    }
    let m = r.metrics();
    assert_eq!((m.rx_frames, m.rx_bytes), (3, (60 + 560 + 1060) as u64));
    assert_eq!(r.interrupts(), 1, "one interrupt for the batch");
    assert_eq!(m.dropped(), 0);
}

#[test]
fn mergeable_buffers_carry_a_frame_across_several_chains() {
    let mut r = rig();
    let bufs: Vec<(u16, u64)> = (0..8).map(|_| r.post_rx(256)).collect();
    r.kick_rx();
    let big = frame(1000, 3); // 1012 bytes: four 256-byte buffers
    let small = frame(50, 4);
    r.peer.send(&big);
    r.peer.send(&small);
    r.tap_event();
    let used = r.driver.take_used_from(RXQ);
    let want: Vec<(u32, u32)> = bufs[..5]
        .iter()
        .zip([256, 256, 256, 244, 62])
        .map(|(&(h, _), len)| (u32::from(h), len))
        .collect();
    assert_eq!(used, want);
    let mut got = Vec::new();
    for (&(_, addr), &(_, len)) in bufs.iter().zip(&used).take(4) {
        got.extend(r.driver.read(addr, len as usize));
    }
    assert_eq!(got, as_received(&big, 4), "num_buffers = 4 and the data in order");
    assert_eq!(r.driver.read(bufs[4].1, small.len()), as_received(&small, 1));

    // Not enough room yet: the frame waits (it is not dropped) until more buffers come.
    let (h5, a5) = bufs[5];
    let (h6, a6) = bufs[6];
    let (h7, a7) = bufs[7];
    let huge = frame(1000, 5);
    r.peer.send(&huge);
    r.tap_event();
    assert!(r.driver.take_used_from(RXQ).is_empty());
    assert!(r.dev().rx_frame_waiting());
    let (h8, a8) = r.post_rx(256);
    r.kick_rx();
    let used = r.driver.take_used_from(RXQ);
    assert_eq!(
        used,
        vec![
            (u32::from(h5), 256),
            (u32::from(h6), 256),
            (u32::from(h7), 256),
            (u32::from(h8), 244)
        ]
    );
    let mut got = Vec::new();
    for (a, l) in [(a5, 256), (a6, 256), (a7, 256), (a8, 244)] {
        got.extend(r.driver.read(a, l));
    }
    assert_eq!(got, as_received(&huge, 4));
    assert_eq!(r.metrics().rx_dropped_oversized, 0);
}

#[test]
fn without_receive_buffers_frames_wait_and_nothing_spins() {
    let mut r = rig();
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(100 + i, i as u8)).collect();
    for f in &frames {
        r.peer.send(f);
    }
    r.tap_event();
    r.tap_event();
    r.tap_event();
    // One frame was read and is held; the rest stay in the tap.
    assert_eq!(r.ctl.frames_read.load(Ordering::SeqCst), 1);
    assert!(r.dev().rx_frame_waiting());
    assert!(r.driver.take_used_from(RXQ).is_empty());
    // The device did not schedule itself again and asked the driver for a notification
    // (EVENT_IDX: avail_event is the next index it will look at).
    let rx_evt = r.source_fd(TOKEN_RX_QUEUE);
    assert!(!readable_within(rx_evt, 0), "device rescheduled itself");
    assert_eq!(r.driver.avail_event(RXQ), 0);
    assert_eq!(r.interrupts(), 0);
    assert!(r.metrics().rx_no_buffers >= 1);

    let bufs: Vec<(u16, u64)> = (0..8).map(|_| r.post_rx(2048)).collect();
    r.kick_rx();
    let used = r.driver.take_used_from(RXQ);
    assert_eq!(used.len(), 5);
    for (f, &(_, addr)) in frames.iter().zip(&bufs) {
        assert_eq!(r.driver.read(addr, f.len()), as_received(f, 1));
    }
    assert_eq!(r.interrupts(), 1);
    assert!(!r.dev().rx_frame_waiting());
    assert_eq!(r.metrics().dropped(), 0);
}

#[test]
fn oversized_frames_are_dropped_and_counted_not_truncated() {
    let mut r = rig_without_mrg();
    let (head, addr) = r.post_rx(1526);
    r.kick_rx();
    r.driver.write(addr, &[0xee; 1526]);
    r.peer.send(&frame(2000, 1));
    let ok = frame(100, 2);
    r.peer.send(&ok);
    r.tap_event();
    assert_eq!(
        r.driver.take_used_from(RXQ),
        vec![(u32::from(head), ok.len() as u32)]
    );
    assert_eq!(r.driver.read(addr, ok.len()), as_received(&ok, 1));
    assert_eq!(
        r.driver.read(addr + ok.len() as u64, 10),
        vec![0xee; 10],
        "nothing past the frame"
    );
    assert_eq!(r.metrics().rx_dropped_oversized, 1);

    // Larger than any frame can be, even with mergeable buffers.
    let mut r = rig();
    for _ in 0..64 {
        r.post_rx(4096);
    }
    r.kick_rx();
    r.peer.send(&frame(MAX_FRAME_LEN, 1));
    r.tap_event();
    assert!(r.driver.take_used_from(RXQ).is_empty());
    assert_eq!(r.metrics().rx_dropped_oversized, 1);
    r.assert_still_serves();

    // With mergeable buffers, a frame larger than a whole queue of buffers is dropped.
    let mut r = rig_opts(0, 16, unlimited(), unlimited());
    for _ in 0..16 {
        r.post_rx(64);
    }
    r.kick_rx();
    r.peer.send(&frame(2000, 1));
    let ok = frame(100, 3);
    r.peer.send(&ok);
    r.tap_event();
    let used = r.driver.take_used_from(RXQ);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![64, 48]);
    assert_eq!(r.metrics().rx_dropped_oversized, 1);
}

#[test]
fn frames_with_offloads_the_guest_refused_are_dropped() {
    let mut r = rig_opts(
        feature(VIRTIO_NET_F_GUEST_TSO4),
        QUEUE_SIZE,
        unlimited(),
        unlimited(),
    );
    r.post_rx(4096);
    r.kick_rx();
    let mut gso = frame(3000, 1);
    gso[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    r.peer.send(&gso);
    r.tap_event();
    assert!(r.driver.take_used_from(RXQ).is_empty());
    assert_eq!(r.metrics().rx_dropped_offload, 1);
    r.assert_still_serves();
}

#[test]
fn malformed_transmit_chains_are_dropped_and_the_device_keeps_serving() {
    let mut r = rig();
    let f = frame(100, 1);
    let addr = r.tx_addr(f.len());
    r.driver.write(addr, &f);
    let outside = MEM_SIZE as u64 + 0x1000;
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        (
            "writable descriptor",
            vec![Desc::readable(addr, 12), Desc::writable(addr + 12, 100)],
        ),
        (
            "outside memory",
            vec![Desc::readable(addr, 12), Desc::readable(outside, 100)],
        ),
        (
            "straddling the end of memory",
            vec![Desc::readable(MEM_SIZE as u64 - 8, 100)],
        ),
        ("header only, short", vec![Desc::readable(addr, 8)]),
        ("empty", vec![Desc::readable(addr, 0)]),
        (
            "too long",
            vec![Desc::readable(TX_AREA, 40_000), Desc::readable(TX_AREA, 40_000)],
        ),
    ];
    let n = cases.len();
    for (_, descs) in &cases {
        r.driver.add_chain_to(TXQ, descs);
    }
    // A loop: 0 -> 1 -> 0 in a fresh part of the table.
    let base = 200;
    r.driver.write_desc_to(
        TXQ,
        base,
        Desc {
            addr,
            len: 12,
            flags: 1,
        },
        base + 1,
    );
    r.driver.write_desc_to(
        TXQ,
        base + 1,
        Desc {
            addr,
            len: 12,
            flags: 1,
        },
        base,
    );
    r.driver.publish_to(TXQ, base);
    // A next index beyond the queue.
    r.driver.write_desc_to(
        TXQ,
        base + 2,
        Desc {
            addr,
            len: 12,
            flags: 1,
        },
        4000,
    );
    r.driver.publish_to(TXQ, base + 2);
    // An indirect table outside memory.
    r.driver.write_desc_to(
        TXQ,
        base + 3,
        Desc {
            addr: outside,
            len: 64,
            flags: F_INDIRECT,
        },
        0,
    );
    r.driver.publish_to(TXQ, base + 3);
    r.kick_tx();
    let used = r.driver.take_used_from(TXQ);
    assert_eq!(used.len(), n + 3, "every chain is returned: {used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert!(r.peer.recv_all().is_empty(), "nothing malformed reached the tap");
    let m = r.metrics();
    assert_eq!(m.tx_dropped_oversized, 1);
    assert_eq!(m.tx_malformed_chains, (n + 3 - 1) as u64);
    assert_eq!(m.tx_frames, 0);
    r.assert_still_serves();
}

#[test]
fn malformed_receive_chains_are_returned_and_the_frame_goes_to_the_next_one() {
    let mut r = rig_without_mrg();
    let outside = MEM_SIZE as u64 + 0x1000;
    let bad = [
        r.driver.add_chain_to(RXQ, &[Desc::readable(RX_AREA, 2048)]),
        r.driver.add_chain_to(RXQ, &[Desc::writable(outside, 2048)]),
        r.driver.add_chain_to(RXQ, &[Desc::writable(RX_AREA, 8)]),
    ];
    let (good, addr) = r.post_rx(2048);
    r.kick_rx();
    let f = frame(300, 7);
    r.peer.send(&f);
    r.tap_event();
    let mut want: Vec<(u32, u32)> = bad.iter().map(|&h| (u32::from(h), 0)).collect();
    want.push((u32::from(good), f.len() as u32));
    assert_eq!(r.driver.take_used_from(RXQ), want);
    assert_eq!(r.driver.read(addr, f.len()), as_received(&f, 1));
    assert_eq!(r.metrics().rx_malformed_chains, 3);

    // With mergeable buffers, a bad chain between good ones goes back with them.
    let mut r = rig();
    let (h1, _) = r.post_rx(128);
    let hb = r.driver.add_chain_to(RXQ, &[Desc::readable(RX_AREA, 128)]);
    let (h2, _) = r.post_rx(128);
    r.kick_rx();
    r.peer.send(&frame(200, 1));
    r.tap_event();
    assert_eq!(
        r.driver.take_used_from(RXQ),
        vec![(u32::from(h1), 128), (u32::from(h2), 84), (u32::from(hb), 0)],
        "the frame's buffers together, the bad chain after them"
    );
    r.assert_still_serves();
}

#[test]
fn a_failing_tap_keeps_the_device_alive() {
    let mut r = rig();
    // Reads: three EIOs, then the frames.
    r.ctl.read_errors.store(3, Ordering::SeqCst);
    for _ in 0..2 {
        r.post_rx(2048);
    }
    r.kick_rx();
    r.peer.send(&frame(100, 1));
    r.peer.send(&frame(100, 2));
    r.tap_event();
    assert_eq!(r.driver.take_used_from(RXQ).len(), 2);
    assert_eq!(r.metrics().rx_tap_errors, 3);

    // A tap that fails every read: the pass gives up instead of spinning.
    r.ctl.read_errors.store(u32::MAX, Ordering::SeqCst);
    r.peer.send(&frame(100, 3));
    r.tap_event();
    assert!(r.metrics().rx_tap_errors <= 3 + 8);
    r.ctl.read_errors.store(0, Ordering::SeqCst);
    r.post_rx(2048);
    r.kick_rx();
    assert_eq!(
        r.driver.take_used_from(RXQ).len(),
        1,
        "the frame left behind is delivered"
    );

    // Writes: EIO drops the frame (counted, chain returned); the next one goes through.
    r.ctl.write_errors.store(1, Ordering::SeqCst);
    let lost = frame(100, 4);
    let sent = frame(100, 5);
    let h1 = r.queue_tx(&lost);
    let h2 = r.queue_tx(&sent);
    r.kick_tx();
    assert_eq!(
        r.driver.take_used_from(TXQ),
        vec![(u32::from(h1), 0), (u32::from(h2), 0)]
    );
    assert_eq!(r.peer.recv_all(), vec![sent]);
    assert_eq!(r.metrics().tx_tap_errors, 1);

    // EAGAIN: the chain stays with the device until the tap takes it.
    r.ctl.write_eagain.store(2, Ordering::SeqCst);
    let waiting = frame(100, 6);
    let h3 = r.queue_tx(&waiting);
    r.kick_tx();
    assert!(
        r.driver.take_used_from(TXQ).is_empty(),
        "chain returned although not sent"
    );
    assert!(r.peer.recv_all().is_empty());
    assert!(r.metrics().tx_tap_full >= 1);
    r.tap_event();
    assert_eq!(r.driver.take_used_from(TXQ), vec![(u32::from(h3), 0)]);
    assert_eq!(r.peer.recv_all(), vec![waiting]);
    r.assert_still_serves();
}

fn ops_limit(size: u64, refill_ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: refill_ms,
        }),
    }
}

#[test]
fn rate_limiter_holds_transmit_frames_until_its_timer_fires() {
    let limiter = RateLimiter::new(&ops_limit(1, 50)).unwrap();
    let mut r = rig_opts(0, QUEUE_SIZE, unlimited(), limiter);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100, i)).collect();
    for f in &frames {
        r.queue_tx(f);
    }
    r.kick_tx();
    let mut got = r.peer.recv_all();
    assert_eq!(got.len(), 1, "one frame fits the bucket");
    // Kicks while throttled change nothing.
    r.kick_tx();
    assert!(r.peer.recv_all().is_empty());
    let timer = r.source_fd(TOKEN_TX_LIMITER);
    while got.len() < 3 {
        assert!(readable_within(timer, 5000), "rate limiter timer never fired");
        r.dev_mut().handle_event(TOKEN_TX_LIMITER);
        got.extend(r.peer.recv_all());
    }
    assert_eq!(got, frames);
    assert_eq!(r.driver.take_used_from(TXQ).len(), 3);
    assert!(r.metrics().tx_throttled >= 2);

    // Lifting the limit at run time; an invalid configuration changes nothing.
    let bad = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: u64::MAX,
        }),
    };
    assert!(r
        .dev_mut()
        .update_rate_limiters(Some(&bad), Some(&RateLimiterConfig::default()))
        .is_err());
    assert_eq!(r.dev().rate_limiters().1, ops_limit(1, 50));
    r.dev_mut()
        .update_rate_limiters(None, Some(&RateLimiterConfig::default()))
        .unwrap();
    for f in &frames {
        r.queue_tx(f);
    }
    r.kick_tx();
    assert_eq!(r.peer.recv_all().len(), 3);
}

#[test]
fn rate_limiter_holds_receive_frames_until_its_timer_fires() {
    let limiter = RateLimiter::new(&ops_limit(1, 50)).unwrap();
    let mut r = rig_opts(0, QUEUE_SIZE, limiter, unlimited());
    for _ in 0..4 {
        r.post_rx(2048);
    }
    r.kick_rx();
    for i in 0..3 {
        r.peer.send(&frame(100, i));
    }
    r.tap_event();
    let mut used = r.driver.take_used_from(RXQ);
    assert_eq!(used.len(), 1);
    assert!(
        r.ctl.frames_read.load(Ordering::SeqCst) <= 2,
        "tap drained while throttled"
    );
    let timer = r.source_fd(TOKEN_RX_LIMITER);
    while used.len() < 3 {
        assert!(readable_within(timer, 5000), "rate limiter timer never fired");
        r.dev_mut().handle_event(TOKEN_RX_LIMITER);
        used.extend(r.driver.take_used_from(RXQ));
    }
    assert!(r.metrics().rx_throttled >= 2);
}

#[test]
fn pause_holds_traffic_and_resume_delivers_it() {
    let mut r = rig();
    for _ in 0..4 {
        r.post_rx(2048);
    }
    r.kick_rx();
    r.driver.transport.pause();
    let out = frame(100, 1);
    let inbound = frame(200, 2);
    r.queue_tx(&out);
    r.kick_tx();
    r.peer.send(&inbound);
    r.tap_event();
    r.kick_rx();
    assert!(r.peer.recv_all().is_empty(), "sent while paused");
    assert!(r.driver.take_used_from(TXQ).is_empty());
    assert!(r.driver.take_used_from(RXQ).is_empty());
    assert_eq!(
        r.ctl.frames_read.load(Ordering::SeqCst),
        0,
        "tap read while paused"
    );
    r.driver.transport.resume();
    assert_eq!(r.peer.recv_all(), vec![out]);
    assert_eq!(r.driver.take_used_from(TXQ).len(), 1);
    assert_eq!(r.driver.take_used_from(RXQ), vec![(0, inbound.len() as u32)]);
    // Pausing and resuming twice is harmless.
    r.driver.transport.pause();
    r.driver.transport.pause();
    r.driver.transport.resume();
    r.driver.transport.resume();
    r.assert_still_serves();
}

#[test]
fn event_idx_suppresses_interrupts_until_the_driver_asks() {
    let mut r = rig();
    // The driver wants to hear only after the fourth used entry (index 3).
    r.driver.set_used_event(TXQ, 3);
    for i in 0..3 {
        r.queue_tx(&frame(60, i));
        r.kick_tx();
    }
    assert_eq!(r.interrupts(), 0);
    r.queue_tx(&frame(60, 3));
    r.kick_tx();
    assert_eq!(r.interrupts(), 1);
    // Transmit notifications: the device asks for the next one after what it has consumed.
    assert_eq!(r.driver.avail_event(TXQ), 4);
}

#[test]
fn reset_forgets_the_waiting_frame_and_restarts() {
    let mut r = rig();
    r.peer.send(&frame(100, 1));
    r.tap_event();
    assert!(r.dev().rx_frame_waiting());
    r.driver.write_reg(0x70, 0);
    assert!(!r.dev().rx_frame_waiting());
    let features = r.driver.device_features();
    assert_eq!(r.driver.init(features, QUEUE_SIZE) & 0x4, 0x4);
    r.next_rx = RX_AREA;
    r.assert_still_serves();
}

/// A small deterministic generator, so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Throws ~2,000 generated transmit chains (many invalid) and random frames and buffers at the
/// device: every transmit chain comes back, every valid frame reaches the tap intact and in
/// order, every frame the guest receives is intact, and the device works afterwards.
#[test]
fn randomized_traffic_never_breaks_the_device() {
    let mut r = rig();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut chains = 0usize;
    let mut returned = 0usize;
    let mut expect_tx: Vec<Vec<u8>> = Vec::new();
    let mut got_tx: Vec<Vec<u8>> = Vec::new();
    let mut rx_sent = 0u64;
    let mut rx_lens: std::collections::HashMap<u32, u32> = Default::default();
    let mut rx_outstanding = 0usize;
    while chains < 2000 {
        let batch = 1 + rng.below(30) as usize;
        for _ in 0..batch {
            let len = [14, 60, 1500, 9000, 65_000, 70_000][rng.below(6) as usize] as usize;
            let f = frame(len.min(MAX_FRAME_LEN - HDR_LEN + 1), rng.next() as u8);
            let addr = r.tx_addr(f.len());
            let valid = rng.below(3) != 0 && f.len() <= MAX_FRAME_LEN;
            if valid {
                r.driver.write(addr, &f);
                let split = 1 + rng.below(f.len() as u64 - 1) as usize;
                r.driver.add_chain_to(
                    TXQ,
                    &[
                        Desc::readable(addr, split as u32),
                        Desc::readable(addr + split as u64, (f.len() - split) as u32),
                    ],
                );
                expect_tx.push(f);
            } else {
                let mut descs = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let a = match rng.below(4) {
                        0 => rng.next(),
                        1 => MEM_SIZE as u64 - rng.below(64),
                        _ => addr,
                    };
                    let l = [0, 4, 12, 100, 70_000, u32::MAX][rng.below(6) as usize];
                    let flags = if rng.below(3) == 0 { 2 } else { 0 };
                    descs.push(Desc {
                        addr: a,
                        len: l,
                        flags,
                    });
                }
                // Make sure it is invalid, in one of several ways.
                descs[0] = match rng.below(4) {
                    0 => Desc::writable(addr, 4),
                    1 => Desc::readable(MEM_SIZE as u64 + rng.below(1 << 20), 64),
                    2 => Desc::readable(addr, (MAX_FRAME_LEN + 1) as u32),
                    _ => {
                        descs.truncate(1);
                        Desc::readable(addr, 4)
                    }
                };
                r.driver.add_chain_to(TXQ, &descs);
            }
            chains += 1;
        }
        r.kick_tx();
        returned += r.driver.take_used_from(TXQ).len();
        got_tx.extend(r.peer.recv_all());

        // Receive side: random buffers, random frames.
        for _ in 0..rng.below(8) {
            // The in-memory driver does not track free descriptors: stay below the queue size.
            if rx_outstanding == 200 {
                break;
            }
            let len = [16u32, 64, 256, 1526, 4096][rng.below(5) as usize];
            let head = if rng.below(8) == 0 {
                // Malformed: the device may not write it.
                r.driver.add_chain_to(RXQ, &[Desc::readable(RX_AREA, len)])
            } else {
                r.post_rx(len).0
            };
            rx_lens.insert(u32::from(head), len);
            rx_outstanding += 1;
        }
        for _ in 0..rng.below(4) {
            let len = [1usize, 60, 1500, 3000][rng.below(4) as usize];
            r.peer.send(&frame(len, 0x5a));
            rx_sent += 1;
        }
        match rng.below(3) {
            0 => r.kick_rx(),
            _ => r.tap_event(),
        }
        for (head, len) in r.driver.take_used_from(RXQ) {
            let posted = rx_lens.get(&head).copied();
            assert!(
                posted.is_some_and(|p| len <= p),
                "head {head}: {len} bytes in {posted:?}"
            );
            rx_outstanding -= 1;
        }
    }
    assert_eq!(returned, chains, "every transmit chain comes back");
    assert_eq!(
        got_tx, expect_tx,
        "valid frames reach the tap intact and in order"
    );
    let m = r.metrics();
    assert_eq!(m.tx_frames as usize, expect_tx.len());
    assert!(m.tx_malformed_chains > 0 && m.tx_dropped_oversized > 0 && m.rx_malformed_chains > 0);
    assert!(m.rx_frames + m.rx_dropped_oversized <= rx_sent);
    // Drain what the receive side still holds, then check both directions.
    while rx_outstanding < 200 {
        r.post_rx(4096);
        rx_outstanding += 1;
    }
    r.kick_rx();
    rx_outstanding -= r.driver.take_used_from(RXQ).len();
    assert!(!r.dev().rx_frame_waiting());
    assert!(rx_outstanding > 0);
    r.assert_still_serves();
}
