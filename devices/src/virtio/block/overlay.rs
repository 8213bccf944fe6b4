//! Copy-on-write drives: a writable image that holds only what the guest wrote, over a read-only
//! base image that any number of drives share.
//!
//! The image's own allocation is the record of what the guest wrote: a block the guest wrote is
//! data in the image, a block it never wrote is a hole (so the image needs no metadata of its own,
//! and after a crash it is exactly as consistent as a raw image). Opening a drive reads that record
//! once (`SEEK_DATA`/`SEEK_HOLE`) into a bitmap; from then on the bitmap routes each read to the
//! image or the base, and a write that covers only part of a block never written first copies that
//! block from the base ("copy-up"), so that every block of the image holds whole, valid data.
//!
//! Two rules keep the record true: nothing punches holes in the image (the drive offers no discard
//! or write-zeroes), and blocks are as large as the file system's, since it allocates whole blocks.
//! Blocks past the end of the base (an image larger than its base) read as zeros from the image.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::disk::{data_ranges, DiskError, SECTOR_SIZE};
use super::io::{advance, HostBuf};

/// The smallest block tracked: the host's page, and most file systems' block.
const MIN_BLOCK: u64 = 4096;
/// File systems known to report holes exactly (their `statfs` magic numbers): on others,
/// `SEEK_DATA` may call a hole data, which would hide the base behind zeros.
const HOLE_REPORTING_FS: [i64; 8] = [
    0xEF53,      // ext2/3/4
    0x5846_5342, // XFS
    0x9123_683E, // btrfs
    0x0102_1994, // tmpfs
    0xF2F5_2010, // F2FS
    0xCA45_1A4E, // bcachefs
    0x2FC1_2FC1, // ZFS
    0x794C_7630, // overlayfs (holes of its upper layer's file system)
];

/// Where a piece of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The drive's own image.
    Image,
    /// The base image.
    Base,
}

/// The base of a copy-on-write drive and which blocks of the image hold the guest's data.
#[derive(Debug)]
pub struct Overlay {
    base: File,
    base_len: u64,
    block: u64,
    /// One bit per block of the image, set where the image holds data.
    written: Mutex<Vec<u64>>,
}

impl Overlay {
    /// Opens `base` read-only (shared lock: many drives use one base, none may write it) for the
    /// image `image` of `image_len` bytes, and reads which blocks of the image hold data.
    pub fn open(base: &Path, image: &File, image_len: u64, image_path: &Path) -> Result<Self, DiskError> {
        let base_path = base.to_path_buf();
        let file = File::open(base).map_err(|source| DiskError::Open {
            path: base_path.clone(),
            source,
        })?;
        super::disk::lock_shared(&file).map_err(|source| super::disk::lock_error(base, source))?;
        let base_len = file
            .metadata()
            .map_err(|source| DiskError::Open {
                path: base_path.clone(),
                source,
            })?
            .len();
        if base_len == 0 || !base_len.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size {
                path: base_path,
                size: base_len,
            });
        }
        if image_len < base_len {
            return Err(DiskError::Overlay {
                path: image_path.to_path_buf(),
                why: format!(
                    "it is {image_len} bytes, smaller than its base {} ({base_len} bytes)",
                    base.display()
                ),
            });
        }
        let overlay_error = |why: String| DiskError::Overlay {
            path: image_path.to_path_buf(),
            why,
        };
        let block = block_size(image).map_err(|e| overlay_error(e.to_string()))?;
        let written = allocation(image, image_len, block).map_err(|e| overlay_error(e.to_string()))?;
        Ok(Overlay {
            base: file,
            base_len,
            block,
            written: Mutex::new(written),
        })
    }

    /// The base image.
    pub fn base(&self) -> &File {
        &self.base
    }

    fn bits(&self) -> MutexGuard<'_, Vec<u64>> {
        // Bits only: a panic elsewhere leaves nothing half-updated that matters.
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `[offset, offset + len)` cut where its source changes: at block edges, and at the end of
    /// the base.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, Source)> {
        let bits = self.bits();
        let mut out: Vec<(u64, u64, Source)> = Vec::new();
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let block_end = (pos / self.block + 1) * self.block;
            let mut piece_end = block_end.min(end);
            if pos < self.base_len {
                piece_end = piece_end.min(self.base_len);
            }
            let source = if pos >= self.base_len || is_set(&bits, pos / self.block) {
                Source::Image
            } else {
                Source::Base
            };
            match out.last_mut() {
                Some(last) if last.2 == source && last.0 + last.1 == pos => last.1 += piece_end - pos,
                _ => out.push((pos, piece_end - pos, source)),
            }
            pos = piece_end;
        }
        out
    }

    /// Reads `[offset, ...)` into `bufs` piece by piece from the image and the base.
    pub fn read_pieces(&self, image: &File, offset: u64, bufs: &[HostBuf]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut rest = bufs.to_vec();
        for (start, len, source) in self.pieces(offset, total as u64) {
            let file = match source {
                Source::Image => image,
                Source::Base => &self.base,
            };
            let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let piece = take(&rest, len);
            super::io::transfer_all(file.as_raw_fd(), start, &piece, false)?;
            rest = advance(&rest, len);
        }
        Ok(total)
    }

    /// Makes `[offset, offset + len)` writable in the image: the blocks it covers only in part and
    /// that hold no data yet get the base's contents first; then every block it touches counts as
    /// written (before the write lands: a read that races the guest's own write may see either).
    pub fn prepare_write(&self, image: &File, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let first = offset / self.block;
        let last = (end - 1) / self.block;
        let mut bits = self.bits();
        for edge in [first, last] {
            let (start, stop) = (edge * self.block, (edge + 1) * self.block);
            let covered = offset <= start && stop <= end;
            if !covered && !is_set(&bits, edge) && start < self.base_len {
                self.copy_up(image, start)?;
                set(&mut bits, edge);
            }
        }
        for b in first..=last {
            set(&mut bits, b);
        }
        Ok(())
    }

    /// Copies the base's block at `start` into the image (zeros past the base's end).
    fn copy_up(&self, image: &File, start: u64) -> io::Result<()> {
        let mut buf = vec![0u8; self.block as usize];
        let from_base = (self.base_len - start).min(self.block) as usize;
        self.base.read_exact_at(&mut buf[..from_base], start)?;
        image.write_all_at(&buf, start)
    }
}

fn is_set(bits: &[u64], block: u64) -> bool {
    bits.get((block / 64) as usize)
        .is_some_and(|word| word & (1 << (block % 64)) != 0)
}

fn set(bits: &mut [u64], block: u64) {
    if let Some(word) = bits.get_mut((block / 64) as usize) {
        *word |= 1 << (block % 64);
    }
}

/// The first `len` bytes of `bufs`.
fn take(bufs: &[HostBuf], mut len: usize) -> Vec<HostBuf> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let n = b.len().min(len);
        out.push(b.truncated(n));
        len -= n;
    }
    out
}

/// The block the image's file system allocates, at least [`MIN_BLOCK`]; refuses file systems not
/// known to report holes exactly.
fn block_size(image: &File) -> io::Result<u64> {
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes one `struct statfs` into the buffer we pass, which is that large, and
    // reads only the descriptor `image` keeps open.
    let ret = unsafe { libc::fstatfs(image.as_raw_fd(), fs.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so it filled the whole struct.
    let fs = unsafe { fs.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
    let magic = fs.f_type as i64;
    if !HOLE_REPORTING_FS.contains(&magic) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("its file system (type {magic:#x}) is not known to report holes exactly, which a copy-on-write image needs"),
        ));
    }
    let block = u64::try_from(fs.f_bsize).unwrap_or(0).max(MIN_BLOCK);
    if !block.is_power_of_two() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("its file system's block size {block} is not a power of two"),
        ));
    }
    Ok(block)
}

/// One bit per `block` of the first `len` bytes of `image`, set where it holds data.
fn allocation(image: &File, len: u64, block: u64) -> io::Result<Vec<u64>> {
    let blocks = len.div_ceil(block);
    let mut bits = vec![0u64; blocks.div_ceil(64) as usize];
    for (start, end) in data_ranges(image, len)? {
        for b in start / block..end.div_ceil(block) {
            set(&mut bits, b);
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::TempDir;
    use std::fs::OpenOptions;

    struct Setup {
        _dir: TempDir,
        image: File,
        overlay: Overlay,
    }

    /// A base of `base_len` bytes of 0xBB and an empty image of `image_len` bytes over it.
    fn setup(base_len: u64, image_len: u64) -> Setup {
        let dir = TempDir::new("overlay");
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0xBB; base_len as usize]).unwrap();
        let path = dir.path().join("image.img");
        let image = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        image.set_len(image_len).unwrap();
        let overlay = Overlay::open(&base, &image, image_len, &path).unwrap();
        Setup {
            _dir: dir,
            image,
            overlay,
        }
    }

    fn read(s: &Setup, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0x55u8; len];
        let bufs = [HostBuf::new(buf.as_mut_ptr(), len)];
        assert_eq!(s.overlay.read_pieces(&s.image, offset, &bufs).unwrap(), len);
        buf
    }

    fn write(s: &Setup, offset: u64, data: &[u8]) {
        s.overlay
            .prepare_write(&s.image, offset, data.len() as u64)
            .unwrap();
        s.image.write_all_at(data, offset).unwrap();
    }

    #[test]
    fn unwritten_blocks_read_from_the_base_and_zeros_past_it() {
        let s = setup(12288, 16384);
        assert_eq!(
            s.overlay.pieces(0, 16384),
            vec![(0, 12288, Source::Base), (12288, 4096, Source::Image)]
        );
        let data = read(&s, 8192, 8192);
        assert!(data[..4096].iter().all(|&b| b == 0xBB));
        assert!(data[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_partial_write_copies_its_block_up_and_survives_reopening() {
        let s = setup(16384, 16384);
        // 512 bytes in the middle of block 1: the rest of block 1 keeps the base's bytes.
        write(&s, 4096 + 1024, &[0x11; 512]);
        let data = read(&s, 0, 16384);
        assert!(data[..5120].iter().all(|&b| b == 0xBB));
        assert!(data[5120..5632].iter().all(|&b| b == 0x11));
        assert!(data[5632..].iter().all(|&b| b == 0xBB));
        assert_eq!(
            s.overlay.pieces(0, 16384),
            vec![
                (0, 4096, Source::Base),
                (4096, 4096, Source::Image),
                (8192, 8192, Source::Base)
            ]
        );
        // A second drive over the same files (a restarted VMM) finds the same record.
        let again = Overlay::open(
            &s._dir.path().join("base.img"),
            &s.image,
            16384,
            &s._dir.path().join("image.img"),
        )
        .unwrap();
        assert_eq!(again.pieces(0, 16384), s.overlay.pieces(0, 16384));
        // The base itself never changed.
        let base = std::fs::read(s._dir.path().join("base.img")).unwrap();
        assert!(base.iter().all(|&b| b == 0xBB));
    }

    #[test]
    fn a_write_spanning_blocks_copies_up_only_its_edges() {
        let s = setup(16384, 16384);
        // From the middle of block 0 to the middle of block 2: block 1 is covered whole.
        write(&s, 2048, &[0x22; 8192]);
        let data = read(&s, 0, 16384);
        assert!(data[..2048].iter().all(|&b| b == 0xBB));
        assert!(data[2048..10240].iter().all(|&b| b == 0x22));
        assert!(data[10240..].iter().all(|&b| b == 0xBB));
        assert_eq!(
            s.overlay.pieces(0, 16384),
            vec![(0, 12288, Source::Image), (12288, 4096, Source::Base)]
        );
    }

    #[test]
    fn reads_across_several_buffers_keep_their_order() {
        let s = setup(16384, 16384);
        write(&s, 4096, &[0x33; 4096]);
        let mut a = vec![0u8; 3000];
        let mut b = vec![0u8; 9288];
        let bufs = [
            HostBuf::new(a.as_mut_ptr(), a.len()),
            HostBuf::new(b.as_mut_ptr(), b.len()),
        ];
        assert_eq!(s.overlay.read_pieces(&s.image, 0, &bufs).unwrap(), 12288);
        let whole: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        assert!(whole[..4096].iter().all(|&x| x == 0xBB));
        assert!(whole[4096..8192].iter().all(|&x| x == 0x33));
        assert!(whole[8192..].iter().all(|&x| x == 0xBB));
    }

    #[test]
    fn an_image_smaller_than_its_base_is_refused() {
        let dir = TempDir::new("overlay");
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![1; 8192]).unwrap();
        let path = dir.path().join("image.img");
        let image = File::create(&path).unwrap();
        image.set_len(4096).unwrap();
        let err = Overlay::open(&base, &image, 4096, &path).unwrap_err();
        assert!(err.to_string().contains("smaller than its base"), "{err}");
        let err = Overlay::open(&dir.path().join("none"), &image, 4096, &path).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
    }
}
