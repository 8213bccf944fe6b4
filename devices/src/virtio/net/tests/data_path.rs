//! Frames in both directions, offloads, mergeable buffers, a guest without buffers.

use super::*;

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

/// A pass delivers at most a budget of frames, then yields to the rest of the event loop by
/// notifying itself, and picks up where it stopped.
#[test]
fn a_long_receive_burst_yields_to_the_event_loop() {
    let mut r = rig_without_mrg();
    for _ in 0..QUEUE_SIZE {
        r.post_rx(128);
    }
    r.kick_rx();
    for i in 0..300 {
        r.peer.send(&frame(60, i as u8));
    }
    r.tap_event();
    assert_eq!(r.driver.take_used_from(RXQ).len(), 256);
    let rx_evt = r.source_fd(TOKEN_RX_QUEUE);
    assert!(readable_within(rx_evt, 0), "no reschedule after a full budget");
    // The rescheduled pass finds the ring empty and waits for buffers with one frame held.
    r.dev_mut().handle_event(TOKEN_RX_QUEUE);
    assert!(!readable_within(rx_evt, 0));
    assert!(r.dev().rx_frame_waiting());
    for _ in 0..64 {
        r.post_rx(128);
    }
    r.kick_rx();
    assert_eq!(r.driver.take_used_from(RXQ).len(), 44);
    assert_eq!(r.metrics().rx_frames, 300);
}

/// Runs a real epoll loop over the device's event sources, registered as the transport
/// registers them, for `rounds` waits of 20 ms; returns how many events it dispatched.
fn run_loop(r: &mut Rig, epoll: &vmm_sys_util::epoll::Epoll, rounds: usize) -> usize {
    use vmm_sys_util::epoll::EpollEvent;
    let mut dispatched = 0;
    let mut events = vec![EpollEvent::default(); 16];
    for _ in 0..rounds {
        let n = epoll.wait(20, &mut events).unwrap();
        for e in &events[..n] {
            r.dev_mut().handle_event(e.data() as u32);
            dispatched += 1;
        }
    }
    dispatched
}

/// The claim behind the edge-triggered tap, checked with a real epoll: a tap full of frames and a
/// guest without buffers do not wake the loop again and again; the guest's notification does.
#[test]
fn an_event_loop_does_not_spin_on_a_tap_the_guest_cannot_drain() {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
    let mut r = rig();
    let epoll = Epoll::new().unwrap();
    for s in r.dev().event_sources() {
        epoll
            .ctl(
                ControlOperation::Add,
                s.fd,
                EpollEvent::new(s.events, u64::from(s.token)),
            )
            .unwrap();
    }
    let frames: Vec<Vec<u8>> = (0..20).map(|i| frame(200, i)).collect();
    for f in &frames {
        r.peer.send(f);
    }
    let dispatched = run_loop(&mut r, &epoll, 10);
    assert!(
        dispatched <= 2,
        "{dispatched} wake-ups in 200 ms with nowhere to put the frames"
    );
    assert_eq!(r.ctl.frames_read.load(Ordering::SeqCst), 1);

    // The guest posts buffers and notifies through the register (the eventfd), as a vCPU would.
    let bufs: Vec<(u16, u64)> = (0..32).map(|_| r.post_rx(2048)).collect();
    r.driver.write_reg(0x50, u32::from(RXQ));
    run_loop(&mut r, &epoll, 3);
    let used = r.driver.take_used_from(RXQ);
    assert_eq!(used.len(), 20);
    for (f, &(_, addr)) in frames.iter().zip(&bufs) {
        assert_eq!(r.driver.read(addr, f.len()), as_received(f, 1));
    }
    // A new frame is a new edge: delivered without any notification.
    let late = frame(300, 99);
    r.peer.send(&late);
    run_loop(&mut r, &epoll, 3);
    assert_eq!(r.driver.take_used_from(RXQ).len(), 1);
    // And a quiet NIC stays quiet.
    assert_eq!(run_loop(&mut r, &epoll, 5), 0);
}

/// TCP segments queued on the tap together reach the guest as one segmentation-offload frame; the
/// frame behind them that does not continue them follows on its own, and a guest without
/// VIRTIO_NET_F_GUEST_TSO4 gets every segment as it came.
#[test]
fn queued_tcp_segments_reach_the_guest_as_one_frame() {
    use super::super::coalesce::{tcp_frame, TCP_ACK, TCP_PSH};
    const MSS: usize = 1448;
    let payload: Vec<u8> = (0..3 * MSS).map(|i| (i * 13) as u8).collect();
    let segments: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let flags = if i == 2 { TCP_ACK | TCP_PSH } else { TCP_ACK };
            tcp_frame((i * MSS) as u32, &payload[i * MSS..(i + 1) * MSS], flags)
        })
        .collect();
    let other = frame(60, 9);

    let mut r = rig();
    for s in &segments {
        r.peer.send(s);
    }
    r.peer.send(&other);
    let bufs: Vec<(u16, u64)> = (0..8).map(|_| r.post_rx(2048)).collect();
    r.kick_rx();
    r.tap_event();
    let used = r.driver.take_used_from(RXQ);
    let mut merged = tcp_frame(0, &payload, TCP_ACK | TCP_PSH);
    merged[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    merged[2..4].copy_from_slice(&66u16.to_le_bytes());
    merged[4..6].copy_from_slice(&(MSS as u16).to_le_bytes());
    // 4420 bytes in 2048-byte buffers: three of them, then the other frame in the fourth.
    assert_eq!(
        used.iter().map(|&(_, len)| len).collect::<Vec<_>>(),
        vec![2048, 2048, merged.len() as u32 - 4096, other.len() as u32]
    );
    let mut got = Vec::new();
    for &(_, addr) in &bufs[..3] {
        got.extend(r.driver.read(addr, 2048));
    }
    got.truncate(merged.len());
    assert_eq!(got, as_received(&merged, 3));
    assert_eq!(r.driver.read(bufs[3].1, other.len()), as_received(&other, 1));
    let m = r.metrics();
    assert_eq!((m.rx_frames, m.rx_coalesced), (2, 2));
    assert_eq!(r.interrupts(), 1);

    let mut r = rig_opts(
        feature(VIRTIO_NET_F_GUEST_TSO4),
        QUEUE_SIZE,
        unlimited(),
        unlimited(),
    );
    for s in &segments {
        r.peer.send(s);
    }
    let bufs: Vec<(u16, u64)> = (0..3).map(|_| r.post_rx(2048)).collect();
    r.kick_rx();
    r.tap_event();
    assert_eq!(r.driver.take_used_from(RXQ).len(), 3);
    for (s, &(_, addr)) in segments.iter().zip(&bufs) {
        assert_eq!(r.driver.read(addr, s.len()), as_received(s, 1));
    }
    assert_eq!(r.metrics().rx_coalesced, 0);
}

/// While the guest is behind (it has not taken what it was given), a TCP segment waits for the
/// ones behind it and they reach the guest as one frame once it catches up; a guest that stays
/// behind still gets the frame after the longest hold; a frame that ends short never waits.
#[test]
fn segments_wait_for_their_followers_only_while_the_guest_is_behind() {
    use super::super::coalesce::{tcp_frame, TCP_ACK, TCP_PSH};
    use super::super::pace::SLOW_GUEST;
    use super::super::rx::MAX_HOLD;
    const MSS: usize = 1448;
    let seg = |i: usize, flags: u8| tcp_frame((i * MSS) as u32, &vec![i as u8; MSS], flags);
    let mut r = rig();
    for _ in 0..16 {
        r.post_rx(2048);
    }
    r.kick_rx();
    let hold = r.source_fd(TOKEN_RX_HOLD);
    // Caught up (used_event == used index): delivered at once. Then behind, but not for long yet.
    for i in 0..2 {
        r.peer.send(&seg(i, TCP_ACK));
        r.tap_event();
        assert_eq!(r.driver.take_used_from(RXQ).len(), 1, "segment {i}");
    }
    std::thread::sleep(SLOW_GUEST * 2);
    r.peer.send(&seg(2, TCP_ACK));
    r.tap_event();
    assert!(
        r.driver.take_used_from(RXQ).is_empty(),
        "not held for a guest behind"
    );
    assert!(r.dev().rx_frame_waiting());
    // A push joins and is held with it: the guest would not look at it before it caught up.
    r.peer.send(&seg(3, TCP_ACK | TCP_PSH));
    r.tap_event();
    assert!(r.driver.take_used_from(RXQ).is_empty());
    // Still behind at the next look: still held.
    assert!(readable_within(hold, 1000), "hold timer not armed");
    r.dev_mut().handle_event(TOKEN_RX_HOLD);
    assert!(r.driver.take_used_from(RXQ).is_empty());
    // The guest catches up: the two segments arrive as one frame at the next look.
    r.driver.set_used_event(RXQ, 2);
    assert!(readable_within(hold, 1000), "hold timer not armed again");
    r.dev_mut().handle_event(TOKEN_RX_HOLD);
    // 2974 bytes: two 2048-byte buffers of one frame.
    let used = r.driver.take_used_from(RXQ);
    let lens: Vec<usize> = used.iter().map(|&(_, len)| len as usize).collect();
    assert_eq!(lens, [2048, seg(2, TCP_ACK).len() + MSS - 2048]);
    assert_eq!((r.metrics().rx_frames, r.metrics().rx_coalesced), (3, 1));

    // Known slow now: the next segment is held at once, and a guest that stays behind (used_event
    // stays 2) gets it anyway after the longest hold.
    r.peer.send(&seg(4, TCP_ACK));
    r.tap_event();
    assert!(
        r.driver.take_used_from(RXQ).is_empty(),
        "a slow guest's segment went at once"
    );
    let start = std::time::Instant::now();
    let mut looks = 0;
    while r.driver.take_used_from(RXQ).is_empty() {
        assert!(start.elapsed() < MAX_HOLD * 20, "held for good");
        assert!(readable_within(hold, 1000), "hold timer not armed");
        r.dev_mut().handle_event(TOKEN_RX_HOLD);
        looks += 1;
    }
    assert!(looks > 1, "delivered at the first look");
    // A guest that catches up within a look of its next delivery is fast again: no more holding.
    r.driver.set_used_event(RXQ, 5);
    r.peer.send(&seg(5, TCP_ACK));
    r.tap_event();
    assert_eq!(
        r.driver.take_used_from(RXQ).len(),
        1,
        "a caught-up guest's segment was held"
    );
    r.driver.set_used_event(RXQ, 6);
    assert!(
        readable_within(hold, 1000),
        "no look for the end of the busy spell"
    );
    r.dev_mut().handle_event(TOKEN_RX_HOLD);
    for i in 6..8 {
        r.peer.send(&seg(i, TCP_ACK));
        r.tap_event();
        assert_eq!(
            r.driver.take_used_from(RXQ).len(),
            1,
            "a fast guest's segment {i} was held"
        );
    }
    // A frame that ends with a short segment goes at once, behind or not: nothing can follow it.
    std::thread::sleep(SLOW_GUEST * 2);
    let mut ends_short = tcp_frame((8 * MSS) as u32, &vec![6; MSS + 100], TCP_ACK);
    ends_short[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    ends_short[4..6].copy_from_slice(&(MSS as u16).to_le_bytes());
    r.peer.send(&ends_short);
    r.tap_event();
    assert_eq!(r.driver.take_used_from(RXQ).len(), 1);
    assert!(!r.dev().rx_frame_waiting());
}
