//! Guest memory in a snapshot: written sparse (only pages that hold data), restored by mapping the
//! file MAP_PRIVATE so that nothing is read up front, pages load on first touch, and clones of one
//! snapshot share the page cache until they write.
//!
//! The memory file holds the guest's regions one after another, each at the sum of the sizes
//! before it; its length is the guest's memory size, with holes where pages are zero.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

const PAGE: usize = 4096;

/// Why memory could not be saved or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// File I/O failed.
    #[error("memory file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not as long as the guest's memory: mapping it would fault.
    #[error("memory file {path} holds {len} bytes, the VM has {expected}")]
    Length {
        /// The file.
        path: String,
        /// Its length.
        len: u64,
        /// The guest's memory size.
        expected: u64,
    },
    /// The snapshot's regions do not form a valid guest memory map.
    #[error("memory layout: {0}")]
    Layout(String),
}

/// How guest memory is backed, which decides how a snapshot finds the pages worth writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory: pages the guest never touched are not resident and are skipped unread.
    Anonymous,
    /// A snapshot's memory file: every page may hold data and is read.
    SnapshotFile,
}

/// What was written.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    /// Bytes of pages with data.
    pub data_bytes: u64,
    /// The guest's memory size (the file's length).
    pub total_bytes: u64,
}

/// A region's host mapping as bytes.
///
/// # Safety
/// Nothing may write the region while the slice lives: the vCPUs and devices must be paused.
unsafe fn region_bytes(region: &GuestRegionMmap) -> Option<&[u8]> {
    let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
    // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by `region`,
    // which outlives the returned slice; the caller guarantees nothing writes it meanwhile.
    Some(unsafe { std::slice::from_raw_parts(host, region.len() as usize) })
}

/// Which pages of `bytes` are resident (a zero byte per page not), or `None` if the kernel cannot
/// say.
fn resident_pages(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut vec = vec![0u8; bytes.len().div_ceil(PAGE)];
    // SAFETY: the range is a live mapping of this process (mincore only reads its page tables) and
    // `vec` has one byte per page of it, as mincore writes.
    let ret = unsafe { libc::mincore(bytes.as_ptr() as *mut libc::c_void, bytes.len(), vec.as_mut_ptr()) };
    (ret == 0).then_some(vec)
}

/// Creates the memory file at `path` (it must not exist), hands `each` every region's bytes with
/// its index and the file offset where it starts, then sets the file's length to the memory size
/// and syncs it. `each` returns the bytes of data it wrote. The VM must be paused.
fn write_regions(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut each: impl FnMut(usize, &[u8], u64, &File) -> std::io::Result<u64>,
) -> Result<Written, MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    let mut written = Written::default();
    for (index, region) in mem.iter().enumerate() {
        // SAFETY: the caller has paused the vCPUs and devices, so nothing writes guest memory
        // while the slice is read.
        let Some(bytes) = (unsafe { region_bytes(region) }) else {
            return Err(MemoryFileError::Layout("a region has no host mapping".into()));
        };
        written.data_bytes += each(index, bytes, written.total_bytes, &file).map_err(io)?;
        written.total_bytes += bytes.len() as u64;
    }
    file.set_len(written.total_bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(written)
}

/// Per region, the pages of anonymous guest memory the guest has touched (bit `n` of word `n / 64`
/// is page `n`): what a live migration's first round must look at, the rest reads as zeros. `None`
/// where that cannot be known (memory mapped from a snapshot file, a host with swap, or mincore
/// refused). Reads page tables only, so the guest may run meanwhile.
pub fn touched_pages(mem: &GuestMemoryMmap, backing: Backing) -> Option<Vec<Vec<u64>>> {
    if backing != Backing::Anonymous || swap_enabled() {
        return None;
    }
    mem.iter()
        .map(|region| {
            let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
            let len = region.len() as usize;
            let mut vec = vec![0u8; len.div_ceil(PAGE)];
            // SAFETY: `host..host+len` is a live mapping owned by `region`; mincore only reads the
            // page tables of that range and writes one byte per page into `vec`, which has that many.
            let ret = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
            if ret != 0 {
                return None;
            }
            let mut bits = vec![0u64; vec.len().div_ceil(64)];
            for (page, r) in vec.iter().enumerate() {
                if r & 1 != 0 {
                    bits[page / 64] |= 1 << (page % 64);
                }
            }
            Some(bits)
        })
        .collect()
}

/// Writes guest memory to `path` (created; it must not exist), sparse. The VM must be paused.
pub fn save(mem: &GuestMemoryMmap, backing: Backing, path: &Path) -> Result<Written, MemoryFileError> {
    // mincore calls a swapped-out page not resident: trust it only on hosts without swap.
    let skip_untouched = backing == Backing::Anonymous && !swap_enabled();
    write_regions(mem, path, |_, bytes, base, file| {
        let resident = if skip_untouched {
            resident_pages(bytes)
        } else {
            None
        };
        let mut data = 0u64;
        let mut run: Option<usize> = None;
        let pages = bytes.len().div_ceil(PAGE);
        for page in 0..=pages {
            let has_data = page < pages
                && resident.as_ref().is_none_or(|r| r[page] & 1 != 0)
                && !is_zero(&bytes[page * PAGE..((page + 1) * PAGE).min(bytes.len())]);
            match (has_data, run) {
                (true, None) => run = Some(page),
                (false, Some(start)) => {
                    let (from, to) = (start * PAGE, (page * PAGE).min(bytes.len()));
                    file.write_all_at(&bytes[from..to], base + from as u64)?;
                    data += (to - from) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(data)
    })
}

/// Writes the pages of `pages` (per region, bit `n` of word `n / 64` is page `n`) to `path`
/// (created; it must not exist), laid out like a full memory file: a diff. Pages that are zero
/// stay holes, which read back as the zeros they are. The VM must be paused.
pub fn save_pages(
    mem: &GuestMemoryMmap,
    pages: &[Vec<u64>],
    path: &Path,
) -> Result<Written, MemoryFileError> {
    if pages.len() != mem.num_regions() {
        return Err(MemoryFileError::Layout("the page map does not fit the VM".into()));
    }
    write_regions(mem, path, |index, bytes, base, file| {
        let mut data = 0u64;
        for page in set_bits(&pages[index]).take_while(|&p| p * PAGE < bytes.len()) {
            let from = page * PAGE;
            let chunk = &bytes[from..(from + PAGE).min(bytes.len())];
            if !is_zero(chunk) {
                file.write_all_at(chunk, base + from as u64)?;
                data += chunk.len() as u64;
            }
        }
        Ok(data)
    })
}

/// Copies the pages of a diff (`pages`, as [`save_pages`] took them) from its file into `mem`,
/// which must have the diff's layout. For restoring a chain, before any vCPU runs.
pub fn apply_pages(mem: &GuestMemoryMmap, pages: &[Vec<u64>], path: &Path) -> Result<(), MemoryFileError> {
    use vm_memory::Bytes;
    let io = |source| MemoryFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let expected: u64 = mem.iter().map(|r| r.len()).sum();
    let len = file.metadata().map_err(io)?.len();
    if len != expected {
        return Err(MemoryFileError::Length {
            path: path.display().to_string(),
            len,
            expected,
        });
    }
    if pages.len() != mem.num_regions() {
        return Err(MemoryFileError::Layout(
            "the diff's page map does not fit the VM".into(),
        ));
    }
    let mut buf = vec![0u8; PAGE];
    let mut base = 0u64;
    for (region, bits) in mem.iter().zip(pages) {
        let region_len = region.len();
        for page in set_bits(bits) {
            let from = (page * PAGE) as u64;
            if from >= region_len {
                return Err(MemoryFileError::Layout(
                    "the diff names a page outside its region".into(),
                ));
            }
            let n = PAGE.min((region_len - from) as usize);
            file.read_exact_at(&mut buf[..n], base + from).map_err(io)?;
            mem.write_slice(&buf[..n], region.start_addr().unchecked_add(from))
                .map_err(|e| MemoryFileError::Layout(e.to_string()))?;
        }
        base += region_len;
    }
    Ok(())
}

/// The indices of the set bits of a bitmap.
fn set_bits(bits: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(i, &word)| {
        (0..64)
            .filter(move |b| word & (1 << b) != 0)
            .map(move |b| i * 64 + b)
    })
}

/// Whether the host has swap space (`/proc/swaps` lists more than its header); unknown counts as
/// yes.
fn swap_enabled() -> bool {
    std::fs::read_to_string("/proc/swaps").map_or(true, |s| s.lines().count() > 1)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Maps `path` as guest memory laid out as `ranges` (start, length), copy-on-write. Refuses a file
/// whose length is not exactly the ranges' total (a shorter one would fault the VMM when the
/// guest touches its end).
pub fn map(path: &Path, ranges: &[(u64, u64)]) -> Result<GuestMemoryMmap, MemoryFileError> {
    let name = path.display().to_string();
    let io = |source| MemoryFileError::Io {
        path: name.clone(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let expected: u64 = ranges.iter().map(|r| r.1).sum();
    if len != expected {
        return Err(MemoryFileError::Length {
            path: name,
            len,
            expected,
        });
    }
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, size) in ranges {
        let size_usize =
            usize::try_from(size).map_err(|_| MemoryFileError::Layout("region too large".into()))?;
        let file = file.try_clone().map_err(io)?;
        let mapping = MmapRegionBuilder::new(size_usize)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| MemoryFileError::Layout(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryFileError::Layout("region overflows the address space".into()))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Layout(e.to_string()))
}

/// Starts the kernel's readahead of every region's file pages (`MADV_WILLNEED`) without waiting
/// for it. Best effort: a refusal only means pages load on first touch, as without it.
pub fn prefetch(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: advisory only, on a live mapping of this process owned by `mem`; WILLNEED
        // neither changes the mapping's contents nor its validity.
        let ret = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_WILLNEED) };
        if ret != 0 {
            log::debug!("MADV_WILLNEED refused: {}", std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn saves_only_pages_with_data_and_maps_them_back_copy_on_write() {
        let dir = std::env::temp_dir().join(format!("vmm-memfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ranges = [(0u64, 1u64 << 20), (4 << 20, 256 << 10)];
        let as_usize: Vec<_> = ranges
            .iter()
            .map(|&(s, l)| (GuestAddress(s), l as usize))
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&as_usize).unwrap();
        mem.write_slice(&[7u8; 10], GuestAddress(5000)).unwrap();
        mem.write_slice(&[9u8; 3], GuestAddress((4 << 20) + 4096 * 3))
            .unwrap();
        let path = dir.join("memory");
        let written = save(&mem, Backing::Anonymous, &path).unwrap();
        assert_eq!(written.data_bytes, 2 * PAGE as u64);
        assert_eq!(written.total_bytes, (1 << 20) + (256 << 10));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), written.total_bytes);

        let restored = map(&path, &ranges).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(5000)).unwrap();
        assert_eq!(buf, [7u8; 10]);
        let mut three = [0u8; 3];
        restored
            .read_slice(&mut three, GuestAddress((4 << 20) + 4096 * 3))
            .unwrap();
        assert_eq!(three, [9u8; 3]);
        // Writes stay private to the mapping: the snapshot is untouched.
        restored.write_slice(&[1u8; 4], GuestAddress(0)).unwrap();
        let again = map(&path, &ranges).unwrap();
        let mut four = [0xffu8; 4];
        again.read_slice(&mut four, GuestAddress(0)).unwrap();
        assert_eq!(four, [0u8; 4]);
        // A restored VM's memory is read whole when it is snapshotted again.
        let second = dir.join("memory2");
        let w2 = save(&restored, Backing::SnapshotFile, &second).unwrap();
        assert_eq!(w2.data_bytes, 3 * PAGE as u64);

        // A diff of two pages (one of them zeroed since), applied onto the full snapshot's mapping.
        mem.write_slice(&[0u8; 10], GuestAddress(5000)).unwrap();
        mem.write_slice(&[3u8; 8], GuestAddress(8192)).unwrap();
        let pages = vec![vec![0b110u64; 4], vec![0u64; 1]];
        let diff = dir.join("diff");
        let w3 = save_pages(&mem, &pages, &diff).unwrap();
        assert_eq!(w3.data_bytes, PAGE as u64);
        let chained = map(&path, &ranges).unwrap();
        apply_pages(&chained, &pages, &diff).unwrap();
        let mut got = [0xffu8; 10];
        chained.read_slice(&mut got, GuestAddress(5000)).unwrap();
        assert_eq!(got, [0u8; 10]);
        let mut eight = [0u8; 8];
        chained.read_slice(&mut eight, GuestAddress(8192)).unwrap();
        assert_eq!(eight, [3u8; 8]);
        chained
            .read_slice(&mut three, GuestAddress((4 << 20) + 4096 * 3))
            .unwrap();
        assert_eq!(three, [9u8; 3]);

        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(matches!(map(&path, &ranges), Err(MemoryFileError::Length { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
