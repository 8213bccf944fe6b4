//! Parts of a disk image the guest wrote, for live migration with local disks: the source copies
//! the image while the guest runs, then sends again what the guest wrote meanwhile.
//!
//! A write is marked when it completes, not when it starts: a chunk read for sending after its
//! bit was taken either sees the write or gets its bit set again. Marking is conservative: a
//! failed write, a discard and write-zeroes count as written too.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes one bit stands for: large enough that the map of a big disk stays small (a 1 TiB disk
/// takes 2 MiB of bits), small enough that a 4 KiB write costs little to send again.
pub const CHUNK_BYTES: u64 = 64 << 10;

/// One bit per [`CHUNK_BYTES`] of a disk, set as writes complete.
#[derive(Debug)]
pub struct WrittenChunks {
    bytes: u64,
    bits: Vec<AtomicU64>,
}

impl WrittenChunks {
    /// A clean map for a disk of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let chunks = bytes.div_ceil(CHUNK_BYTES);
        WrittenChunks {
            bytes,
            bits: (0..chunks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The disk's size.
    pub fn disk_bytes(&self) -> u64 {
        self.bytes
    }

    /// Marks `[offset, offset + len)`; what lies past the end of the disk is ignored.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.bytes {
            return;
        }
        let last = offset.saturating_add(len - 1).min(self.bytes - 1);
        for chunk in offset / CHUNK_BYTES..=last / CHUNK_BYTES {
            if let Some(word) = self.bits.get((chunk / 64) as usize) {
                word.fetch_or(1 << (chunk % 64), Ordering::Relaxed);
            }
        }
    }

    /// The chunks written since the last call (bit `n` of word `n / 64` is chunk `n`), cleared as
    /// they are read.
    pub fn take(&self) -> Vec<u64> {
        self.bits.iter().map(|w| w.swap(0, Ordering::Relaxed)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_chunks_a_write_touches_and_clears_on_take() {
        let w = WrittenChunks::new(10 * CHUNK_BYTES + 512);
        assert_eq!(w.take().len(), 1);
        w.mark(CHUNK_BYTES - 512, 1024); // straddles chunks 0 and 1
        w.mark(5 * CHUNK_BYTES, 4096);
        w.mark(10 * CHUNK_BYTES, 512); // the partial last chunk
        assert_eq!(w.take(), vec![0b100_0010_0011]);
        assert_eq!(w.take(), vec![0]);
        // Past the end, empty, overflowing: nothing, and no panic.
        w.mark(11 * CHUNK_BYTES, 512);
        w.mark(0, 0);
        w.mark(u64::MAX - 10, 100);
        w.mark(10 * CHUNK_BYTES, u64::MAX);
        assert_eq!(w.take(), vec![1 << 10]);
    }

    #[test]
    fn a_large_disk_has_one_bit_per_chunk() {
        let w = WrittenChunks::new(1 << 40);
        assert_eq!(w.take().len(), (1usize << 40) / CHUNK_BYTES as usize / 64);
    }
}
