//! virtio-blk against the in-memory driver: every request type, both engines, and hostile chains.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vmm_api::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

use super::*;
use crate::rate_limiter::RateLimiter;
use crate::virtio::test_utils::{
    readable_within, Desc, TempDir, TestDriver, DATA_START, F_INDIRECT, MEM_SIZE,
};
use crate::virtio::{
    feature, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const HDR: u64 = DATA_START;
const DATA: u64 = DATA_START + 0x1000;
const STATUS: u64 = DATA_START + 0x800;
const DISK_SECTORS: u64 = 2048; // 1 MiB

struct Rig {
    driver: TestDriver<Block>,
    path: PathBuf,
    _dir: TempDir,
}

fn image(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("disk.img");
    let mut f = File::create(&path).unwrap();
    // Recognisable contents: byte i of sector s is (s + i) mod 251.
    let mut data = vec![0u8; (DISK_SECTORS * 512) as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = ((i / 512 + i % 512) % 251) as u8;
    }
    f.write_all(&data).unwrap();
    path
}

fn rig_with(engine: EngineKind, read_only: bool, limiter: RateLimiter) -> Rig {
    rig_opts(engine, read_only, false, limiter)
}

fn rig_opts(engine: EngineKind, read_only: bool, direct: bool, limiter: RateLimiter) -> Rig {
    let dir = TempDir::new("blk");
    let path = image(&dir);
    let disk = DiskImage::open(&path, read_only, direct).unwrap();
    rig_on(dir, path, disk, engine, limiter)
}

/// A drive on `disk` (the image at `path` in `dir`), initialized by the driver with every feature
/// it offers.
fn rig_on(dir: TempDir, path: PathBuf, disk: DiskImage, engine: EngineKind, limiter: RateLimiter) -> Rig {
    let block = Block::new(BlockSpec {
        id: "test".into(),
        disk,
        serial: "serial-0123".into(),
        engine,
        rate_limiter: limiter,
    })
    .unwrap();
    assert_eq!(block.engine_kind(), engine, "engine unavailable on this host");
    let mut driver = TestDriver::new(block);
    let features = driver.device_features();
    let status = driver.init(features, QUEUE_SIZE);
    assert_eq!(status & 0x4, 0x4, "DRIVER_OK not set: {status:#x}");
    Rig {
        driver,
        path,
        _dir: dir,
    }
}

fn rig(engine: EngineKind) -> Rig {
    rig_with(engine, false, RateLimiter::unlimited().unwrap())
}

fn header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

impl Rig {
    /// Runs the device until `n` used entries appear (waiting for io_uring completions).
    fn run(&mut self, n: usize) -> Vec<(u32, u32)> {
        self.driver.kick();
        let mut used = self.driver.take_used();
        while used.len() < n {
            let fd = self
                .completion_fd()
                .expect("requests pending on a synchronous engine");
            assert!(readable_within(fd, 5000), "no completion within 5 s");
            self.driver.transport.device_mut().handle_event(1);
            used.extend(self.driver.take_used());
        }
        used
    }

    fn completion_fd(&self) -> Option<i32> {
        self.driver
            .transport
            .device()
            .event_sources()
            .into_iter()
            .find(|s| s.token == 1)
            .map(|s| s.fd)
    }

    fn status(&self) -> u8 {
        self.driver.read(STATUS, 1)[0]
    }

    fn request(&mut self, req_type: u32, sector: u64, data: Option<Desc>) -> (u32, u8) {
        self.driver.write(HDR, &header(req_type, sector));
        self.driver.write(STATUS, &[0xff]);
        let mut descs = vec![Desc::readable(HDR, 16)];
        descs.extend(data);
        descs.push(Desc::writable(STATUS, 1));
        self.driver.add_chain(&descs);
        let used = self.run(1);
        assert_eq!(used.len(), 1);
        (used[0].1, self.status())
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).unwrap();
        buf
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn both_engines(test: impl Fn(EngineKind)) {
    test(EngineKind::Sync);
    test(EngineKind::Uring);
}

#[test]
fn features_and_config_space() {
    let mut r = rig(EngineKind::Sync);
    let features = r.driver.device_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_DISCARD,
    ] {
        assert_ne!(features & feature(bit), 0, "feature {bit} missing");
    }
    assert_eq!(features & feature(VIRTIO_BLK_F_RO), 0);
    let mut cap = [0u8; 8];
    r.driver.transport.device().read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    // Beyond the config space reads zeroes.
    let mut far = [0xffu8; 4];
    r.driver.transport.device().read_config(4096, &mut far);
    assert_eq!(far, [0; 4]);

    let ro = rig_with(EngineKind::Sync, true, RateLimiter::unlimited().unwrap());
    let mut d = ro.driver;
    let f = d.device_features();
    assert_ne!(f & feature(VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & feature(VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn write_read_flush_round_trip() {
    both_engines(|engine| {
        let mut r = rig(engine);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
        r.driver.write(DATA, &pattern);
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 8, Some(Desc::readable(DATA, 4096))),
            (1, OK)
        );
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None), (1, OK));
        assert_eq!(r.file_bytes(8 * 512, 4096), pattern);

        r.driver.write(DATA, &[0u8; 4096]);
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 8, Some(Desc::writable(DATA, 4096))),
            (4097, OK)
        );
        assert_eq!(r.driver.read(DATA, 4096), pattern);
        let m = r.driver.transport.device().metrics().snapshot();
        assert_eq!((m.reads, m.writes, m.flushes), (1, 1, 1), "{engine:?}");
        assert_eq!((m.read_bytes, m.write_bytes), (4096, 4096));
    });
}

/// Direct I/O (cache=none): aligned buffers go straight to the file, and a buffer the host refuses
/// for direct I/O (unaligned) is served through the page cache instead of failing.
#[test]
fn direct_io_serves_aligned_and_unaligned_buffers() {
    both_engines(|engine| {
        let mut r = rig_opts(engine, false, true, RateLimiter::unlimited().unwrap());
        for (addr, sector) in [(DATA, 16u64), (DATA + 3, 24)] {
            let data: Vec<u8> = (0..4096u32)
                .map(|i| (i * 13 % 256) as u8 ^ sector as u8)
                .collect();
            r.driver.write(addr, &data);
            assert_eq!(
                r.request(VIRTIO_BLK_T_OUT, sector, Some(Desc::readable(addr, 4096))),
                (1, OK)
            );
            assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None), (1, OK));
            assert_eq!(r.file_bytes(sector * 512, 4096), data, "{engine:?} at {addr:#x}");
            r.driver.write(addr, &[0u8; 4096]);
            assert_eq!(
                r.request(VIRTIO_BLK_T_IN, sector, Some(Desc::writable(addr, 4096))),
                (4097, OK)
            );
            assert_eq!(r.driver.read(addr, 4096), data);
        }
        assert_eq!(r.driver.transport.device().metrics().snapshot().io_errors, 0);
    });
}

#[test]
fn many_requests_in_flight_complete() {
    let mut r = rig(EngineKind::Uring);
    for i in 0..64u64 {
        let hdr = DATA_START + 0x10_0000 + i * 32;
        let status = hdr + 16;
        let buf = DATA_START + 0x20_0000 + i * 4096;
        r.driver.write(hdr, &header(VIRTIO_BLK_T_IN, i * 8));
        r.driver.add_chain(&[
            Desc::readable(hdr, 16),
            Desc::writable(buf, 4096),
            Desc::writable(status, 1),
        ]);
    }
    let used = r.run(64);
    assert_eq!(used.len(), 64);
    for i in 0..64u64 {
        let status = r.driver.read(DATA_START + 0x10_0000 + i * 32 + 16, 1)[0];
        assert_eq!(status, OK);
        let data = r.driver.read(DATA_START + 0x20_0000 + i * 4096, 1);
        assert_eq!(data[0], ((i * 8) % 251) as u8);
    }
}

#[test]
fn get_id_returns_the_serial() {
    both_engines(|engine| {
        let mut r = rig(engine);
        let (len, status) = r.request(VIRTIO_BLK_T_GET_ID, 0, Some(Desc::writable(DATA, 20)));
        assert_eq!((len, status), (21, OK));
        assert_eq!(&r.driver.read(DATA, 20)[..11], b"serial-0123");
        assert_eq!(r.driver.read(DATA + 11, 9), vec![0u8; 9]);
    });
}

#[test]
fn discard_and_write_zeroes() {
    both_engines(|engine| {
        let mut r = rig(engine);
        let blocks_before = std::fs::metadata(&r.path).unwrap().blocks();
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&0u64.to_le_bytes());
        seg[8..12].copy_from_slice(&1024u32.to_le_bytes());
        r.driver.write(DATA, &seg);
        assert_eq!(
            r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::readable(DATA, 16))),
            (1, OK)
        );
        assert!(std::fs::metadata(&r.path).unwrap().blocks() < blocks_before);
        assert_eq!(r.file_bytes(0, 4096), vec![0u8; 4096]);

        // Write zeroes without unmap on sectors 1024..1032.
        seg[0..8].copy_from_slice(&1024u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.driver.write(DATA, &seg);
        let (_, status) = r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some(Desc::readable(DATA, 16)));
        assert_eq!(status, OK, "{engine:?}");
        assert_eq!(r.file_bytes(1024 * 512, 4096), vec![0u8; 4096]);

        // Unmap on a discard is reserved; ranges past the end are refused.
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        r.driver.write(DATA, &seg);
        assert_eq!(
            r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::readable(DATA, 16)))
                .1,
            UNSUPP
        );
        seg[0..8].copy_from_slice(&(DISK_SECTORS - 1).to_le_bytes());
        seg[12..16].copy_from_slice(&0u32.to_le_bytes());
        r.driver.write(DATA, &seg);
        assert_eq!(
            r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::readable(DATA, 16)))
                .1,
            IOERR
        );
    });
}

#[test]
fn read_only_drive_refuses_writes_and_keeps_the_file() {
    both_engines(|engine| {
        let mut r = rig_with(engine, true, RateLimiter::unlimited().unwrap());
        let before = std::fs::read(&r.path).unwrap();
        r.driver.write(DATA, &[0xaa; 512]);
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 0, Some(Desc::readable(DATA, 512))).1,
            IOERR
        );
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.driver.write(DATA, &seg);
        assert_eq!(
            r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::readable(DATA, 16)))
                .1,
            UNSUPP
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, Some(Desc::writable(DATA, 512))).1,
            OK
        );
        assert_eq!(std::fs::read(&r.path).unwrap(), before);
    });
}

/// Checks that a plain read still works after whatever the test did before.
fn assert_still_serves(r: &mut Rig) {
    r.driver.write(DATA, &[0u8; 512]);
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 3, Some(Desc::writable(DATA, 512))),
        (513, OK)
    );
    assert_eq!(r.driver.read(DATA, 1)[0], 3);
}

#[test]
fn malformed_chains_fail_and_the_device_keeps_serving() {
    both_engines(|engine| {
        let mut r = rig(engine);
        let out_of_memory = MEM_SIZE as u64 + 0x1000;
        let cases: Vec<(&str, u32, u64, Vec<Desc>, u8)> = vec![
            ("unknown type", 99, 0, vec![], UNSUPP),
            (
                "read past the end",
                VIRTIO_BLK_T_IN,
                DISK_SECTORS,
                vec![Desc::writable(DATA, 512)],
                IOERR,
            ),
            (
                "sector overflow",
                VIRTIO_BLK_T_IN,
                u64::MAX,
                vec![Desc::writable(DATA, 512)],
                IOERR,
            ),
            (
                "not whole sectors",
                VIRTIO_BLK_T_IN,
                0,
                vec![Desc::writable(DATA, 100)],
                IOERR,
            ),
            (
                "read buffer readable",
                VIRTIO_BLK_T_IN,
                0,
                vec![Desc::readable(DATA, 512)],
                IOERR,
            ),
            (
                "write buffer writable",
                VIRTIO_BLK_T_OUT,
                0,
                vec![Desc::writable(DATA, 512)],
                IOERR,
            ),
            (
                "buffer outside memory",
                VIRTIO_BLK_T_IN,
                0,
                vec![Desc::writable(out_of_memory, 512)],
                IOERR,
            ),
            ("GET_ID without buffer", VIRTIO_BLK_T_GET_ID, 0, vec![], IOERR),
            ("discard without segment", VIRTIO_BLK_T_DISCARD, 0, vec![], IOERR),
            (
                "write zeroes with two segments",
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                vec![Desc::readable(DATA, 32)],
                IOERR,
            ),
        ];
        for (what, req_type, sector, data, want) in cases {
            r.driver.write(HDR, &header(req_type, sector));
            r.driver.write(STATUS, &[0xff]);
            let mut descs = vec![Desc::readable(HDR, 16)];
            descs.extend(data);
            descs.push(Desc::writable(STATUS, 1));
            r.driver.add_chain(&descs);
            let used = r.run(1);
            assert_eq!(used.len(), 1, "{what}");
            assert_eq!(r.status(), want, "{what} ({engine:?})");
        }

        // A status buffer of the wrong size: the data length then is not whole sectors.
        r.driver.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
        r.driver.add_chain(&[
            Desc::readable(HDR, 16),
            Desc::writable(DATA, 512),
            Desc::writable(STATUS, 4),
        ]);
        r.run(1);
        assert_eq!(r.driver.read(STATUS + 3, 1)[0], IOERR);

        // Header too short, split header, readable after writable.
        r.driver
            .add_chain(&[Desc::readable(HDR, 8), Desc::writable(STATUS, 1)]);
        r.run(1);
        assert_eq!(r.status(), IOERR);
        r.driver.write(HDR, &header(VIRTIO_BLK_T_IN, 2));
        r.driver.add_chain(&[
            Desc::readable(HDR, 4),
            Desc::readable(HDR + 4, 12),
            Desc::writable(DATA, 512),
            Desc::writable(STATUS, 1),
        ]);
        r.run(1);
        assert_eq!(r.status(), OK, "a header split over two descriptors is valid");
        r.driver.add_chain(&[
            Desc::readable(HDR, 16),
            Desc::writable(DATA, 512),
            Desc::readable(DATA + 512, 512),
            Desc::writable(STATUS, 1),
        ]);
        r.run(1);
        assert_eq!(r.status(), IOERR);

        // No writable byte at all: dropped with a zero-length used entry.
        r.driver
            .add_chain(&[Desc::readable(HDR, 16), Desc::readable(DATA, 512)]);
        assert_eq!(r.run(1)[0].1, 0);
        // Zero-length status descriptor only.
        r.driver
            .add_chain(&[Desc::readable(HDR, 16), Desc::writable(STATUS, 0)]);
        assert_eq!(r.run(1)[0].1, 0);
        let m = r.driver.transport.device().metrics().snapshot();
        assert!(m.invalid_requests >= 14, "{m:?}");
        assert_still_serves(&mut r);
    });
}

#[test]
fn looping_and_out_of_range_descriptor_chains() {
    let mut r = rig(EngineKind::Uring);
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after queue-size descriptors.
    r.driver.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
    r.driver.write_desc(
        0,
        Desc {
            addr: HDR,
            len: 16,
            flags: 1,
        },
        1,
    );
    r.driver.write_desc(
        1,
        Desc {
            addr: STATUS,
            len: 1,
            flags: 3,
        },
        0,
    );
    r.driver.publish(0);
    let used = r.run(1);
    assert_eq!(used.len(), 1);
    // A head index beyond the queue: nothing can be returned for it, and nothing breaks.
    r.driver.publish(QUEUE_SIZE + 5);
    r.driver.kick();
    assert!(r.driver.take_used().is_empty());
    // A next index beyond the queue ends the chain there.
    r.driver.write_desc(
        2,
        Desc {
            addr: HDR,
            len: 16,
            flags: 1,
        },
        4000,
    );
    r.driver.publish(2);
    r.driver.kick();
    r.driver.take_used();
    // An indirect table outside guest memory.
    r.driver.write_desc(
        3,
        Desc {
            addr: MEM_SIZE as u64,
            len: 64,
            flags: F_INDIRECT,
        },
        0,
    );
    r.driver.publish(3);
    r.driver.kick();
    r.driver.take_used();
    // Restart the driver (the ring positions above are unknown to it) and check the device works.
    let features = r.driver.device_features();
    r.driver.init(features, QUEUE_SIZE);
    assert_still_serves(&mut r);
}

#[test]
fn indirect_descriptors_work() {
    let mut r = rig(EngineKind::Sync);
    let table = DATA_START + 0x8000;
    let raw = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    r.driver.write(table, &raw(HDR, 16, 1, 1));
    r.driver.write(table + 16, &raw(DATA, 512, 3, 2));
    r.driver.write(table + 32, &raw(STATUS, 1, 2, 0));
    r.driver.write(HDR, &header(VIRTIO_BLK_T_IN, 5));
    r.driver.add_chain(&[Desc {
        addr: table,
        len: 48,
        flags: F_INDIRECT,
    }]);
    assert_eq!(r.run(1)[0].1, 513);
    assert_eq!(r.status(), OK);
    assert_eq!(r.driver.read(DATA, 1)[0], 5);
}

#[test]
fn a_lying_avail_index_does_not_break_the_device() {
    let mut r = rig(EngineKind::Sync);
    r.driver.set_avail_idx(1000);
    r.driver.kick();
    assert!(r.driver.take_used().is_empty());
    let features = r.driver.device_features();
    r.driver.init(features, QUEUE_SIZE);
    assert_still_serves(&mut r);
}

#[test]
fn reset_with_requests_in_flight_then_restart() {
    let mut r = rig(EngineKind::Uring);
    for i in 0..32u64 {
        let hdr = DATA_START + 0x10_0000 + i * 32;
        r.driver.write(hdr, &header(VIRTIO_BLK_T_IN, i));
        r.driver.add_chain(&[
            Desc::readable(hdr, 16),
            Desc::writable(DATA_START + 0x20_0000 + i * 512, 512),
            Desc::writable(hdr + 16, 1),
        ]);
    }
    r.driver.kick();
    r.driver.write_reg(0x70, 0);
    assert_eq!(r.driver.read_reg(0x70), 0);
    let features = r.driver.device_features();
    assert_eq!(r.driver.init(features, QUEUE_SIZE) & 0x4, 0x4);
    assert_still_serves(&mut r);
}

/// Queues 32 reads of sector i into buffer i; returns nothing, the caller kicks.
fn queue_reads(r: &mut Rig, first: u64, n: u64) {
    for i in first..first + n {
        let hdr = DATA_START + 0x10_0000 + i * 32;
        r.driver.write(hdr, &header(VIRTIO_BLK_T_IN, i));
        r.driver.write(hdr + 16, &[0xff]);
        r.driver.add_chain(&[
            Desc::readable(hdr, 16),
            Desc::writable(DATA_START + 0x20_0000 + i * 512, 512),
            Desc::writable(hdr + 16, 1),
        ]);
    }
}

#[test]
fn pause_finishes_requests_in_flight_and_holds_new_ones_until_resume() {
    both_engines(|engine| {
        let mut r = rig(engine);
        queue_reads(&mut r, 0, 32);
        r.driver.kick();
        // Every request started before the pause is complete once pause returns: nothing writes
        // guest memory while the VM is paused.
        r.driver.transport.pause();
        let done = r.driver.take_used();
        assert_eq!(done.len(), 32, "{engine:?}: in flight after pause");
        for i in 0..32u64 {
            assert_eq!(r.driver.read(DATA_START + 0x10_0000 + i * 32 + 16, 1)[0], OK);
        }
        // Requests queued (and notified) while paused wait.
        queue_reads(&mut r, 32, 8);
        r.driver.kick();
        assert!(r.driver.take_used().is_empty(), "{engine:?}: served while paused");
        assert!(r.completion_fd().is_none_or(|fd| !readable_within(fd, 50)));
        // Resume serves them without another notification.
        r.driver.transport.resume();
        let mut used = r.driver.take_used();
        while used.len() < 8 {
            let fd = r
                .completion_fd()
                .expect("requests pending on a synchronous engine");
            assert!(readable_within(fd, 5000), "no completion within 5 s");
            r.driver.transport.device_mut().handle_event(1);
            used.extend(r.driver.take_used());
        }
        assert_eq!(used.len(), 8);
        // Pausing twice and resuming twice is harmless.
        r.driver.transport.pause();
        r.driver.transport.pause();
        r.driver.transport.resume();
        r.driver.transport.resume();
        assert_still_serves(&mut r);
    });
}

#[test]
fn transport_refuses_out_of_order_setup() {
    let dir = TempDir::new("blk");
    let path = image(&dir);
    let block = Block::new(BlockSpec {
        id: "t".into(),
        disk: DiskImage::open(&path, false, false).unwrap(),
        serial: String::new(),
        engine: EngineKind::Sync,
        rate_limiter: RateLimiter::unlimited().unwrap(),
    })
    .unwrap();
    let mut d = TestDriver::new(block);
    assert_eq!(d.read_reg(0), 0x7472_6976);
    assert_eq!(d.read_reg(4), 2);
    assert_eq!(d.read_reg(8), 2);
    // DRIVER_OK straight away is refused.
    d.write_reg(0x70, 0x4);
    assert_eq!(d.read_reg(0x70), 0);
    // Without VERSION_1 FEATURES_OK does not stick.
    assert_eq!(d.init(0, QUEUE_SIZE) & 0x8, 0);
    // Features the device does not offer are refused too.
    assert_eq!(d.init(u64::MAX, QUEUE_SIZE) & 0x8, 0);
    // A queue size that is not a power of two fails at DRIVER_OK.
    let features = d.device_features();
    let status = d.init(features, 100);
    assert_eq!(status & 0x4, 0x4);
    assert_ne!(
        status & 0x40,
        0,
        "DEVICE_NEEDS_RESET expected, status {status:#x}"
    );
    assert!(!d.transport.is_activated());
    // Narrow and unaligned register accesses are ignored.
    let mut byte = [0xffu8; 1];
    crate::bus::BusDevice::read(&mut d.transport, 0, &mut byte);
    assert_eq!(byte, [0xff]);
    let mut word = [0xffu8; 4];
    crate::bus::BusDevice::read(&mut d.transport, 2, &mut word);
    assert_eq!(word, [0; 4]);
    // And a proper start works.
    assert_eq!(d.init(features, QUEUE_SIZE) & 0x44, 0x4);
    assert!(d.transport.is_activated());
}

#[test]
fn rate_limiter_holds_requests_until_its_timer_fires() {
    let limits = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 100,
        }),
    };
    let mut r = rig_with(EngineKind::Sync, false, RateLimiter::new(&limits).unwrap());
    for i in 0..3u64 {
        let hdr = DATA_START + 0x10_0000 + i * 32;
        r.driver.write(hdr, &header(VIRTIO_BLK_T_IN, i));
        r.driver.add_chain(&[
            Desc::readable(hdr, 16),
            Desc::writable(DATA_START + 0x20_0000 + i * 512, 512),
            Desc::writable(hdr + 16, 1),
        ]);
    }
    r.driver.kick();
    let mut used = r.driver.take_used();
    assert_eq!(used.len(), 1, "only one op fits the bucket");
    let timer = r
        .driver
        .transport
        .device()
        .event_sources()
        .into_iter()
        .find(|s| s.token == 2)
        .unwrap()
        .fd;
    while used.len() < 3 {
        assert!(readable_within(timer, 5000), "rate limiter timer never fired");
        r.driver.transport.device_mut().handle_event(2);
        used.extend(r.driver.take_used());
    }
    assert!(r.driver.transport.device().metrics().snapshot().throttled >= 2);
    // Lifting the limit at run time.
    r.driver
        .transport
        .device_mut()
        .update_rate_limiter(&RateLimiterConfig::default())
        .unwrap();
    assert_still_serves(&mut r);
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

/// Throws thousands of generated chains, mostly invalid, at the device: none may take it down, every
/// chain with a status byte gets one, and a valid request still works afterwards.
#[test]
fn randomized_chains_never_break_the_device() {
    both_engines(|engine| {
        let mut r = rig(engine);
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ engine as u64);
        let types = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            7,
            u32::MAX,
        ];
        for round in 0..100 {
            let batch = 1 + rng.below(40) as usize;
            for i in 0..batch {
                let hdr = DATA_START + 0x10_0000 + (i as u64) * 64;
                let req_type = types[rng.below(types.len() as u64) as usize];
                let sector = match rng.below(4) {
                    0 => rng.next(),
                    _ => rng.below(DISK_SECTORS + 16),
                };
                r.driver.write(hdr, &header(req_type, sector));
                let mut descs = vec![Desc::readable(hdr, [16, 8, 0, 32][rng.below(4) as usize])];
                for _ in 0..rng.below(5) {
                    let addr = match rng.below(6) {
                        0 => rng.next(),
                        1 => MEM_SIZE as u64 - rng.below(1024),
                        _ => DATA_START + 0x40_0000 + rng.below(0x40_0000),
                    };
                    let len = [512, 4096, 16, 1, 0, 65536, u32::MAX][rng.below(7) as usize];
                    let flags = if rng.below(2) == 0 { 0 } else { 2 };
                    descs.push(Desc { addr, len, flags });
                }
                if rng.below(8) != 0 {
                    descs.push(Desc::writable(hdr + 32, 1 + rng.below(3) as u32));
                }
                r.driver.add_chain(&descs);
            }
            let used = r.run(batch);
            assert_eq!(used.len(), batch, "round {round}");
        }
        assert_still_serves(&mut r);
    });
}

#[test]
fn writes_discards_and_write_zeroes_mark_the_chunks_they_change_reads_do_not() {
    both_engines(|engine| {
        let mut r = rig(engine);
        let chunk_sectors = written::CHUNK_BYTES / 512;
        let written = std::sync::Arc::clone(r.driver.transport.device().written());
        assert!(written.take().iter().all(|w| *w == 0));
        r.driver.write(DATA, &[5u8; 4096]);
        // 4 KiB ending 512 bytes into chunk 1.
        let sector = chunk_sectors - 7;
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, sector, Some(Desc::readable(DATA, 4096))),
            (1, OK)
        );
        assert_eq!(
            r.request(
                VIRTIO_BLK_T_IN,
                3 * chunk_sectors,
                Some(Desc::writable(DATA, 4096))
            ),
            (4097, OK)
        );
        assert_eq!(written.take()[0], 0b11, "{engine:?}");
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&(2 * chunk_sectors).to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.driver.write(DATA, &seg);
        assert_eq!(
            r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::readable(DATA, 16))),
            (1, OK)
        );
        seg[0..8].copy_from_slice(&(4 * chunk_sectors).to_le_bytes());
        r.driver.write(DATA, &seg);
        assert_eq!(
            r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some(Desc::readable(DATA, 16)))
                .1,
            OK
        );
        assert_eq!(written.take()[0], 0b10100, "{engine:?}");
        // A write the device refuses (past the end) changes nothing.
        r.driver.write(DATA, &[1u8; 4096]);
        assert_eq!(
            r.request(
                VIRTIO_BLK_T_OUT,
                DISK_SECTORS - 1,
                Some(Desc::readable(DATA, 4096))
            )
            .1,
            IOERR
        );
        assert!(written.take().iter().all(|w| *w == 0));
    });
}

mod copy_on_write;
