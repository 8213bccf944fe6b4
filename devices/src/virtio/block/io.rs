//! Disk operations on host memory, and the synchronous engine that runs them in place.
//!
//! A request's guest buffers become `iovec`s pointing into the guest memory mapping. They are
//! validated against guest memory when built ([`to_iovecs`]), and guest memory stays mapped for the
//! life of the VMM, so the pointers stay valid for as long as an operation is in flight.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::disk::DiskImage;
use super::overlay::Source;
use super::request::Segment;

/// Where an operation goes, decided before it starts (see [`DiskImage::route`]).
#[derive(Debug)]
pub enum Route {
    /// To this file, the way it was asked.
    To(Source),
    /// Nowhere: it already finished, with this result (a read that spans a copy-on-write drive's
    /// image and base, or an operation refused).
    Done(io::Result<usize>),
}

/// The most iovecs one operation may have (the kernel's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// A host buffer: one contiguous piece of a guest buffer.
#[derive(Debug, Clone, Copy)]
pub struct HostBuf {
    ptr: *mut u8,
    len: usize,
}

impl HostBuf {
    /// Bytes it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its first `len` bytes (at most all of them).
    pub fn truncated(&self, len: usize) -> HostBuf {
        HostBuf {
            ptr: self.ptr,
            len: len.min(self.len),
        }
    }

    /// A buffer over memory a test owns.
    #[cfg(test)]
    pub(crate) fn new(ptr: *mut u8, len: usize) -> HostBuf {
        HostBuf { ptr, len }
    }
}

// SAFETY: a HostBuf points into guest memory, which is mapped for the whole life of the process and
// shared by design between the vCPU threads, the event loop and the kernel (io_uring); the pointer is
// only dereferenced by system calls.
unsafe impl Send for HostBuf {}

/// One disk operation, with offsets in bytes.
#[derive(Debug)]
pub enum DiskOp {
    /// Read into the buffers.
    Read {
        /// Disk offset.
        offset: u64,
        /// Destination.
        bufs: Vec<HostBuf>,
    },
    /// Write from the buffers.
    Write {
        /// Disk offset.
        offset: u64,
        /// Source.
        bufs: Vec<HostBuf>,
    },
    /// `fdatasync` the image.
    Flush,
    /// Deallocate a range (it reads back as zeroes).
    Discard {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Zero a range; `unmap` allows deallocating it.
    WriteZeroes {
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Deallocation allowed.
        unmap: bool,
    },
}

impl DiskOp {
    /// Bytes a successful read or write moves.
    pub fn expected_len(&self) -> usize {
        match self {
            DiskOp::Read { bufs, .. } | DiskOp::Write { bufs, .. } => bufs.iter().map(|b| b.len).sum(),
            _ => 0,
        }
    }
}

/// Why guest buffers could not be turned into host buffers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IovecError {
    /// A buffer is not (entirely) in guest memory.
    #[error("buffer outside guest memory")]
    OutsideMemory,
    /// More pieces than the kernel accepts in one call.
    #[error("too many buffer pieces")]
    TooMany,
}

/// Translates guest buffers into host buffers, splitting where a buffer crosses memory regions.
pub fn to_iovecs(mem: &GuestMemoryMmap, segs: &[Segment]) -> Result<Vec<HostBuf>, IovecError> {
    let mut bufs = Vec::with_capacity(segs.len());
    for seg in segs.iter().filter(|s| s.len > 0) {
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.map_err(|_| IovecError::OutsideMemory)?;
            if bufs.len() == MAX_IOVECS {
                return Err(IovecError::TooMany);
            }
            bufs.push(HostBuf {
                ptr: slice.ptr_guard_mut().as_ptr(),
                len: slice.len(),
            });
        }
    }
    Ok(bufs)
}

/// Converts host buffers to the kernel's iovec layout.
pub fn iovecs(bufs: &[HostBuf]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|b| libc::iovec {
            iov_base: b.ptr.cast(),
            iov_len: b.len,
        })
        .collect()
}

/// Drops the first `done` bytes from `bufs` (after a short transfer).
pub fn advance(bufs: &[HostBuf], mut done: usize) -> Vec<HostBuf> {
    let mut rest = Vec::with_capacity(bufs.len());
    for b in bufs {
        if done >= b.len {
            done -= b.len;
            continue;
        }
        rest.push(HostBuf {
            // In bounds: done < b.len.
            ptr: b.ptr.wrapping_add(done),
            len: b.len - done,
        });
        done = 0;
    }
    rest
}

/// Runs `op` to completion on the calling thread. Returns the bytes transferred.
pub fn run_sync(disk: &DiskImage, op: &DiskOp) -> io::Result<usize> {
    match disk.route(op) {
        Route::To(source) => {
            let result = run_on(disk.source_file(source), op);
            retry_buffered(disk, op, 0, result)
        }
        Route::Done(result) => result,
    }
}

/// Direct I/O refuses buffers that are not aligned to the host's block size (EINVAL); the guest
/// decides the alignment, so such a request is redone through the page cache rather than failed.
pub fn retry_buffered(
    disk: &DiskImage,
    op: &DiskOp,
    done: usize,
    result: io::Result<usize>,
) -> io::Result<usize> {
    match (result, disk.buffered()) {
        (Err(e), Some(buffered)) if e.raw_os_error() == Some(libc::EINVAL) => {
            if matches!(op, DiskOp::Read { .. } | DiskOp::Write { .. }) {
                finish_on(buffered, op, done)
            } else {
                Err(e)
            }
        }
        (result, _) => result,
    }
}

fn run_on(file: &File, op: &DiskOp) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    match op {
        DiskOp::Read { offset, bufs } => transfer_all(fd, *offset, bufs, false),
        DiskOp::Write { offset, bufs } => transfer_all(fd, *offset, bufs, true),
        DiskOp::Flush => file.sync_data().map(|()| 0),
        DiskOp::Discard { offset, len } => fallocate(fd, discard_mode(), *offset, *len),
        DiskOp::WriteZeroes { offset, len, unmap } => fallocate(fd, zero_mode(*unmap), *offset, *len),
    }
}

/// Finishes a read or write on `source` that moved `done` of its bytes (io_uring may complete
/// partially).
pub fn finish_sync(disk: &DiskImage, source: Source, op: &DiskOp, done: usize) -> io::Result<usize> {
    let result = finish_on(disk.source_file(source), op, done);
    retry_buffered(disk, op, done, result)
}

fn finish_on(file: &File, op: &DiskOp, done: usize) -> io::Result<usize> {
    match op {
        DiskOp::Read { offset, bufs } | DiskOp::Write { offset, bufs } => {
            let write = matches!(op, DiskOp::Write { .. });
            let rest = advance(bufs, done);
            transfer_all(file.as_raw_fd(), offset + done as u64, &rest, write).map(|n| n + done)
        }
        _ => Ok(done),
    }
}

/// The fallocate mode that deallocates a range while keeping the file size.
pub fn discard_mode() -> i32 {
    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
}

/// The fallocate mode for WRITE_ZEROES: punch a hole if allowed, otherwise zero in place.
pub fn zero_mode(unmap: bool) -> i32 {
    if unmap {
        discard_mode()
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<usize> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate takes no memory from us, only a file descriptor we keep open and integers.
    let ret = unsafe { libc::fallocate64(fd, mode, offset, len) };
    if ret == 0 {
        Ok(0)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// preadv/pwritev until every byte moved, retrying short transfers and EINTR.
pub(crate) fn transfer_all(fd: RawFd, mut offset: u64, bufs: &[HostBuf], write: bool) -> io::Result<usize> {
    let mut rest = bufs.to_vec();
    let mut total = 0usize;
    while !rest.is_empty() {
        let iov = iovecs(&rest);
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let count = iov.len().min(MAX_IOVECS) as i32;
        // SAFETY: `iov` describes buffers inside guest memory, which stays mapped for the life of the
        // process (see the module comment); the kernel reads `count` entries of `iov`, which lives
        // until the call returns.
        let ret = unsafe {
            if write {
                libc::pwritev64(fd, iov.as_ptr(), count, off)
            } else {
                libc::preadv64(fd, iov.as_ptr(), count, off)
            }
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            // End of file: the image shrank under us.
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let n = ret as usize;
        total += n;
        offset += n as u64;
        rest = advance(&rest, n);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_buffers() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let bufs = [
            HostBuf {
                ptr: a.as_mut_ptr(),
                len: 8,
            },
            HostBuf {
                ptr: b.as_mut_ptr(),
                len: 8,
            },
        ];
        let rest = advance(&bufs, 10);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].len, 6);
        assert_eq!(rest[0].ptr, b.as_mut_ptr().wrapping_add(2));
        assert!(advance(&bufs, 16).is_empty());
        assert_eq!(advance(&bufs, 0).len(), 2);
    }
}
