//! Fuzzes virtio-blk request parsing and execution: the input becomes a batch of descriptor chains
//! (headers, buffers, flags, addresses) written into guest memory by the in-memory driver. Nothing the
//! input says may crash the device, and a valid read must still work afterwards.
#![no_main]

use std::sync::OnceLock;

use devices::rate_limiter::RateLimiter;
use devices::virtio::block::{Block, BlockSpec, DiskImage, EngineKind, QUEUE_SIZE};
use devices::virtio::test_utils::{Desc, TempDir, TestDriver, DATA_START, MEM_SIZE};
use libfuzzer_sys::fuzz_target;

fn image() -> &'static std::path::Path {
    static DIR: OnceLock<(TempDir, std::path::PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = TempDir::new("fuzz");
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![0x5a; 1 << 20]).expect("image");
        (dir, path)
    });
    path
}

fuzz_target!(|data: &[u8]| {
    let block = Block::new(BlockSpec {
        id: "fuzz".into(),
        disk: DiskImage::open(image(), false, false).expect("image"),
        serial: "fuzz".into(),
        engine: EngineKind::Sync,
        rate_limiter: RateLimiter::unlimited().expect("timerfd"),
    })
    .expect("block");
    let mut driver = TestDriver::new(block);
    let features = driver.device_features();
    driver.init(features, QUEUE_SIZE);

    // Each 16-byte record: a header (type, sector) written at its own slot, then one descriptor.
    let mut chains = 0usize;
    for (i, rec) in data.chunks_exact(16).take(200).enumerate() {
        let word = |o: usize| u32::from_le_bytes([rec[o], rec[o + 1], rec[o + 2], rec[o + 3]]);
        let hdr = DATA_START + (i as u64) * 64;
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&word(0).to_le_bytes());
        header[8..12].copy_from_slice(&word(4).to_le_bytes());
        driver.write(hdr, &header);
        let addr = match rec[8] % 4 {
            0 => u64::from(word(8)),
            1 => MEM_SIZE as u64 - u64::from(rec[9]),
            _ => DATA_START + 0x10_0000 + u64::from(word(8) % 0x40_0000),
        };
        let len = word(12) % 0x2_0000;
        let flags = u16::from(rec[10] & 0x6);
        let mut descs = vec![Desc::readable(hdr, u32::from(rec[11] % 32)), Desc { addr, len, flags }];
        if rec[12] % 8 != 0 {
            descs.push(Desc::writable(hdr + 32, 1));
        }
        driver.add_chain(&descs);
        chains += 1;
    }
    driver.kick();
    let used = driver.take_used();
    assert!(used.len() <= chains);
});
