//! A copy-on-write drive through the virtqueue: the guest sees its base until it writes, its
//! writes land in its own image only, and it cannot deallocate (which would expose the base).

use std::os::unix::fs::MetadataExt;

use super::*;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;

/// The base is the usual recognisable image; the drive's own image starts empty (a hole).
fn cow_rig(dir: TempDir, engine: EngineKind) -> Rig {
    image(&dir);
    let path = dir.path().join("overlay.img");
    let f = File::create(&path).unwrap();
    f.set_len(DISK_SECTORS * 512).unwrap();
    drop(f);
    reopen(dir, path, engine)
}

/// A copy-on-write drive over the image at `path` in `dir` and the base beside it.
fn reopen(dir: TempDir, path: PathBuf, engine: EngineKind) -> Rig {
    let disk = DiskImage::open(&path, false, false)
        .unwrap()
        .with_backing(&dir.path().join("disk.img"))
        .unwrap();
    let r = rig_on(dir, path, disk, engine, RateLimiter::unlimited().unwrap());
    assert!(r.driver.transport.device().has_backing());
    let features = r.driver.transport.device().avail_features();
    assert_eq!(
        features & (feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)),
        0,
        "a copy-on-write drive must not offer deallocation"
    );
    r
}

/// What the base holds at `offset` (see [`image`]).
fn base_bytes(offset: u64, len: usize) -> Vec<u8> {
    (offset as usize..offset as usize + len)
        .map(|i| ((i / 512 + i % 512) % 251) as u8)
        .collect()
}

fn read(r: &mut Rig, sector: u64, len: u32) -> Vec<u8> {
    r.driver.write(DATA, &vec![0xEE; len as usize]);
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, sector, Some(Desc::writable(DATA, len))),
        (len + 1, OK)
    );
    r.driver.read(DATA, len as usize)
}

#[test]
fn the_guest_reads_its_base_until_it_writes_and_writes_only_its_own_image() {
    both_engines(|engine| {
        let dir = TempDir::new("blk-cow");
        let base_path = dir.path().join("disk.img");
        let mut r = cow_rig(dir, engine);
        let base_before = std::fs::read(&base_path).unwrap();
        assert_eq!(read(&mut r, 8, 4096), base_bytes(8 * 512, 4096), "{engine:?}");

        // One sector in the middle of the second 4 KiB block.
        r.driver.write(DATA, &[0x5A; 512]);
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 9, Some(Desc::readable(DATA, 512))),
            (1, OK)
        );
        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, None), (1, OK));
        let mut want = base_bytes(0, 16384);
        want[9 * 512..10 * 512].fill(0x5A);
        // 16 KiB across base, written and base blocks: one read from both files.
        assert_eq!(read(&mut r, 0, 16384), want, "{engine:?}");
        // Reads entirely inside the written block, and entirely in the base.
        assert_eq!(read(&mut r, 8, 4096), want[4096..8192], "{engine:?}");
        assert_eq!(read(&mut r, 16, 1024), base_bytes(16 * 512, 1024), "{engine:?}");

        // The image holds that one block; the base is untouched.
        assert!(std::fs::metadata(&r.path).unwrap().blocks() * 512 <= 8192);
        assert_eq!(r.file_bytes(4096, 4096), want[4096..8192]);
        assert_eq!(std::fs::read(&base_path).unwrap(), base_before);

        // A driver that deallocates anyway (not negotiated) is refused and changes nothing.
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.driver.write(DATA, &seg);
        let (_, status) = r.request(VIRTIO_BLK_T_DISCARD, 0, Some(Desc::readable(DATA, 16)));
        assert_ne!(status, OK);
        assert_eq!(read(&mut r, 0, 16384), want, "{engine:?}");
    });
}

#[test]
fn a_reopened_drive_finds_what_the_guest_wrote() {
    let dir = TempDir::new("blk-cow");
    let mut r = cow_rig(dir, EngineKind::Uring);
    r.driver.write(DATA, &[0x77; 8192]);
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 100, Some(Desc::readable(DATA, 8192))),
        (1, OK)
    );
    let Rig {
        driver,
        path,
        _dir: dir,
    } = r;
    drop(driver);
    let mut r = reopen(dir, path, EngineKind::Sync);
    // Sector 100 starts at byte 51,200, inside a 4 KiB block: the write's edges were copied up.
    let got = read(&mut r, 96, 16384);
    let mut want = base_bytes(96 * 512, 16384);
    want[4 * 512..4 * 512 + 8192].fill(0x77);
    assert_eq!(got, want);
}

#[test]
fn an_image_smaller_than_its_base_or_on_direct_io_is_refused() {
    let dir = TempDir::new("blk-cow");
    let base = image(&dir);
    let path = dir.path().join("small.img");
    File::create(&path).unwrap().set_len(512 * 8).unwrap();
    let err = DiskImage::open(&path, false, false)
        .unwrap()
        .with_backing(&base)
        .unwrap_err();
    assert!(err.to_string().contains("smaller than its base"), "{err}");
    let big = dir.path().join("big.img");
    File::create(&big).unwrap().set_len(DISK_SECTORS * 1024).unwrap();
    if let Ok(direct) = DiskImage::open(&big, false, true) {
        let err = direct.with_backing(&base).unwrap_err();
        assert!(err.to_string().contains("direct I/O"), "{err}");
    }
}
