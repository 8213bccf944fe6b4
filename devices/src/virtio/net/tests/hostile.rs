//! What a hostile guest or a failing tap can do, and a randomized run.

use super::*;

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

/// A driver whose available index runs more than a ring ahead gets nothing served, and nothing
/// loops; after a reset everything works.
#[test]
fn a_lying_available_index_does_not_hang_the_device() {
    let mut r = rig();
    r.peer.send(&frame(100, 1));
    r.driver.set_avail_idx_of(RXQ, 1000);
    r.driver.set_avail_idx_of(TXQ, 1000);
    r.kick_rx();
    r.tap_event();
    r.kick_tx();
    assert!(r.driver.take_used_from(RXQ).is_empty());
    assert!(r.driver.take_used_from(TXQ).is_empty());
    assert!(r.peer.recv_all().is_empty());
    let features = r.driver.device_features();
    assert_eq!(r.driver.init(features, QUEUE_SIZE) & 0x4, 0x4);
    r.next_rx = RX_AREA;
    r.peer.recv_all();
    r.assert_still_serves();
}

/// A driver that fills the receive ring with chains the device may not write: each goes back
/// once, and the frame waits for a usable buffer instead of looping.
#[test]
fn a_ring_full_of_bad_receive_chains_is_returned_once() {
    let mut r = rig();
    for _ in 0..QUEUE_SIZE {
        r.driver.add_chain_to(RXQ, &[Desc::readable(RX_AREA, 2048)]);
    }
    r.kick_rx();
    r.peer.send(&frame(100, 1));
    r.tap_event();
    assert_eq!(r.driver.take_used_from(RXQ).len(), usize::from(QUEUE_SIZE));
    assert!(r.dev().rx_frame_waiting());
    assert_eq!(r.metrics().rx_malformed_chains, u64::from(QUEUE_SIZE));
    let (head, addr) = r.post_rx(2048);
    r.kick_rx();
    assert_eq!(r.driver.take_used_from(RXQ), vec![(u32::from(head), 112)]);
    assert_eq!(r.driver.read(addr, 112), as_received(&frame(100, 1), 1));
}

/// Heads beyond the queue name no descriptor: nothing can be returned for them, and the next
/// good chain still serves.
#[test]
fn out_of_range_heads_are_skipped() {
    let mut r = rig();
    r.driver.publish_to(RXQ, QUEUE_SIZE + 5);
    let (head, _) = r.post_rx(2048);
    r.kick_rx();
    r.peer.send(&frame(100, 1));
    r.tap_event();
    assert_eq!(r.driver.take_used_from(RXQ), vec![(u32::from(head), 112)]);
    r.driver.publish_to(TXQ, QUEUE_SIZE + 5);
    let f = frame(100, 2);
    let h = r.queue_tx(&f);
    r.kick_tx();
    assert_eq!(r.driver.take_used_from(TXQ), vec![(u32::from(h), 0)]);
    assert_eq!(r.peer.recv_all(), vec![f]);
    r.assert_still_serves();
}
