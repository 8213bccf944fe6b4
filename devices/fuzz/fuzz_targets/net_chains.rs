//! Fuzzes virtio-net: the input becomes transmit chains (flags, addresses, lengths, contents),
//! receive buffers and frames arriving from a stand-in tap, in interleaved batches. Nothing the
//! input says may crash or hang the device, every transmit chain comes back, and a valid frame
//! still goes through both ways afterwards.
#![no_main]

use devices::rate_limiter::RateLimiter;
use devices::virtio::net::test_tap::SocketTap;
use devices::virtio::net::{Net, NetSpec, HDR_LEN, QUEUE_SIZE, TOKEN_TAP};
use devices::virtio::test_utils::{Desc, TestDriver, DATA_START, MEM_SIZE};
use devices::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use libfuzzer_sys::fuzz_target;

const RX_AREA: u64 = DATA_START + 0x10_0000;
const TX_AREA: u64 = DATA_START + 0x80_0000;

fuzz_target!(|data: &[u8]| {
    let (tap, peer, _ctl) = SocketTap::pair();
    let net = Net::new(NetSpec {
        id: "fuzz".into(),
        tap: Box::new(tap),
        mac: [2, 0, 0, 0, 0, 1],
        rx_rate_limiter: RateLimiter::unlimited().expect("timerfd"),
        tx_rate_limiter: RateLimiter::unlimited().expect("timerfd"),
    })
    .expect("net");
    let mut d = TestDriver::new(net);
    // The first byte picks the features the guest accepts (mergeable buffers, event index...).
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let mut features = d.device_features();
    if pick & 1 != 0 {
        features &= !(1 << 15); // VIRTIO_NET_F_MRG_RXBUF
    }
    if pick & 2 != 0 {
        features &= !(1 << VIRTIO_RING_F_EVENT_IDX);
    }
    d.init(features, QUEUE_SIZE);

    let mut tx_chains = 0usize;
    let mut tx_used = 0usize;
    let mut rx_posted = 0usize;
    // Each 12-byte record: kind, flags, then two words.
    for (i, rec) in data.chunks_exact(12).take(400).enumerate() {
        let word = |o: usize| u32::from_le_bytes([rec[o], rec[o + 1], rec[o + 2], rec[o + 3]]);
        let addr = match rec[1] % 4 {
            0 => u64::from(word(4)),
            1 => MEM_SIZE as u64 - u64::from(rec[2]),
            _ => TX_AREA + u64::from(word(4) % 0x60_0000),
        };
        let len = word(8) % 0x2_0000;
        match rec[0] % 5 {
            0 | 1 => {
                let flags = u16::from(rec[3] & 0x6);
                let mut descs = vec![Desc { addr, len, flags }];
                if rec[0] & 0x80 != 0 {
                    descs.insert(0, Desc::readable(TX_AREA + (i as u64) * 16, HDR_LEN as u32));
                }
                if tx_chains - tx_used < 100 {
                    d.add_chain_to(1, &descs);
                    tx_chains += 1;
                }
            }
            2 => {
                // The in-memory driver does not track free descriptors: stay below the ring size.
                if rx_posted < 200 {
                    let flags = if rec[3] % 8 == 0 { 0 } else { 2 };
                    d.add_chain_to(
                        0,
                        &[Desc {
                            addr: RX_AREA + u64::from(word(4) % 0x60_0000),
                            len: len % 0x1_1000,
                            flags,
                        }],
                    );
                    rx_posted += 1;
                }
            }
            3 => {
                let n = (word(8) as usize) % 70_000;
                let mut frame = vec![rec[3]; n];
                if frame.len() >= 2 {
                    frame[0] = rec[4];
                    frame[1] = rec[5];
                }
                // A full socket buffer is like a full tap queue: the frame is lost.
                peer.try_send(&frame);
            }
            _ => {
                match rec[3] % 4 {
                    0 => d.kick_queue(0),
                    1 => d.kick_queue(1),
                    2 => d.transport.device_mut().handle_event(TOKEN_TAP),
                    _ => {
                        d.transport.pause();
                        d.kick_queue(1);
                        d.transport.resume();
                    }
                }
                tx_used += d.take_used_from(1).len();
                rx_posted -= d.take_used_from(0).len().min(rx_posted);
                while peer.recv().is_some() {}
            }
        }
    }
    // Make room in the "network", then every transmit chain must come back.
    while peer.recv().is_some() {}
    d.kick_queue(1);
    tx_used += d.take_used_from(1).len();
    assert_eq!(tx_used, tx_chains, "a transmit chain was not returned");
});
