//! The host side of a drive: a raw image file, locked against concurrent writers.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::io::{DiskOp, Route};
use super::overlay::{Overlay, Source};

/// Bytes per virtio-blk sector, whatever the host's block size.
pub const SECTOR_SIZE: u64 = 512;

/// Why a disk image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process (most likely another VM) holds a conflicting lock on the image.
    #[error("disk image {path} is in use by another process (it holds a lock on the file)")]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// The file system cannot do direct I/O (`cache=none`) on the image.
    #[error("disk image {path} does not support direct I/O (use the page cache, cache=writeback)")]
    NoDirectIo {
        /// The image.
        path: PathBuf,
    },
    /// Locking failed for another reason.
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The image cannot be a copy-on-write image over its base.
    #[error("disk image {path} cannot be a copy-on-write image: {why}")]
    Overlay {
        /// The image.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The image size is not usable as a disk.
    #[error("disk image {path} is {size} bytes, which is not a positive multiple of 512")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
    /// With direct I/O: the same file through the page cache, for the rare request whose guest
    /// buffers are not aligned the way `O_DIRECT` needs.
    buffered: Option<File>,
    /// For a copy-on-write drive: its base, and what of the image holds data.
    overlay: Option<Overlay>,
}

impl DiskImage {
    /// Opens `path` and takes an advisory lock on it: exclusive for a writable drive, shared for a
    /// read-only one, so that two VMs can share a read-only base image but never write the same disk
    /// (or read one that another VM is writing). The lock lives as long as the file stays open.
    /// `direct` bypasses the host page cache (`O_DIRECT`).
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, DiskError> {
        let path_buf = path.to_path_buf();
        let open = |direct: bool| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(path)
        };
        let file = open(direct).map_err(|source| match source.raw_os_error() {
            Some(libc::EINVAL) if direct => DiskError::NoDirectIo {
                path: path_buf.clone(),
            },
            _ => DiskError::Open {
                path: path_buf.clone(),
                source,
            },
        })?;
        let buffered = if direct {
            // The same image through the page cache; closed again if the image is refused.
            Some(open(false).map_err(|source| DiskError::Open {
                path: path_buf.clone(),
                source,
            })?)
        } else {
            None
        };
        Self::locked(file, path_buf, read_only, buffered)
    }

    /// Uses an image someone else opened (a supervisor passing file descriptors), locked and
    /// checked like [`DiskImage::open`]; `name` stands for its path in messages. Buffered I/O only.
    pub fn from_file(file: File, name: &str, read_only: bool) -> Result<Self, DiskError> {
        let path = PathBuf::from(format!("fd:{name}"));
        if !read_only {
            // SAFETY: F_GETFL takes a descriptor `file` keeps open and no memory.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            if flags < 0 || flags & libc::O_ACCMODE != libc::O_RDWR {
                return Err(DiskError::Open {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "a writable drive needs a descriptor opened read-write",
                    ),
                });
            }
        }
        Self::locked(file, path, read_only, None)
    }

    fn locked(
        mut file: File,
        path: PathBuf,
        read_only: bool,
        buffered: Option<File>,
    ) -> Result<Self, DiskError> {
        lock(&file, read_only).map_err(|source| lock_error(&path, source))?;
        // Seeking also gives the size of block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size { path, size });
        }
        Ok(DiskImage {
            file,
            path,
            sectors: size / SECTOR_SIZE,
            read_only,
            buffered,
            overlay: None,
        })
    }

    /// Makes this image copy-on-write over `base` (see [`Overlay`]): blocks of the image that hold
    /// no data read from the base. Only for images through the page cache.
    pub fn with_backing(mut self, base: &Path) -> Result<Self, DiskError> {
        if self.buffered.is_some() {
            return Err(DiskError::Overlay {
                path: self.path,
                why: "direct I/O (cache=none) is not supported with a backing image".into(),
            });
        }
        self.overlay = Some(Overlay::open(
            base,
            &self.file,
            self.sectors * SECTOR_SIZE,
            &self.path,
        )?);
        Ok(self)
    }

    /// The base and allocation record of a copy-on-write image.
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// The file a [`Source`] names.
    pub fn source_file(&self, source: Source) -> &File {
        match (source, &self.overlay) {
            (Source::Base, Some(overlay)) => overlay.base(),
            _ => &self.file,
        }
    }

    /// Where `op` goes. A raw image takes everything itself; a copy-on-write image sends a read to
    /// the one file that holds all of it, or reads the pieces of both right here, makes the blocks a
    /// write touches its own first, and refuses discards (which would expose the base).
    pub fn route(&self, op: &DiskOp) -> Route {
        let Some(overlay) = &self.overlay else {
            return Route::To(Source::Image);
        };
        match op {
            DiskOp::Read { offset, bufs } => {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                match overlay.pieces(*offset, len).as_slice() {
                    [] => Route::To(Source::Image),
                    [(_, _, source)] => Route::To(*source),
                    _ => Route::Done(overlay.read_pieces(&self.file, *offset, bufs)),
                }
            }
            DiskOp::Write { offset, bufs } => {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                match overlay.prepare_write(&self.file, *offset, len) {
                    Ok(()) => Route::To(Source::Image),
                    Err(e) => Route::Done(Err(e)),
                }
            }
            DiskOp::Flush => Route::To(Source::Image),
            DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => {
                Route::Done(Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)))
            }
        }
    }

    /// The open image.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The image through the page cache when [`DiskImage::file`] is opened for direct I/O.
    pub fn buffered(&self) -> Option<&File> {
        self.buffered.as_ref()
    }

    /// Where it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the guest may only read it.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Why `path` could not be locked: held by someone else, or another failure.
pub(crate) fn lock_error(path: &Path, source: std::io::Error) -> DiskError {
    match source.raw_os_error() {
        Some(libc::EWOULDBLOCK) => DiskError::Locked {
            path: path.to_path_buf(),
        },
        _ => DiskError::Lock {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Takes the shared lock a read-only user (a read-only drive, a base image) holds on an image.
pub fn lock_shared(file: &File) -> std::io::Result<()> {
    lock(file, true)
}

/// Takes the exclusive lock a writable drive holds on its image (fails at once if taken).
pub fn lock_exclusive(file: &File) -> std::io::Result<()> {
    lock(file, false)
}

/// Gives up the lock on an image (a VM migrating away hands its disks to the destination; it
/// takes the lock again with [`lock_exclusive`] if the migration fails).
pub fn unlock(file: &File) -> std::io::Result<()> {
    flock(file, libc::LOCK_UN)
}

/// The parts of the first `len` bytes of `file` that may hold data, as `[start, end)` ranges
/// (holes of a sparse image read as zeros and are left out). A file system that cannot tell
/// (no `SEEK_DATA`) gives the whole range.
pub fn data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match seek(file, pos, libc::SEEK_DATA) {
            Ok(start) => start,
            // Nothing but a hole from `pos` to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && pos == 0 => return Ok(vec![(0, len)]),
            Err(e) => return Err(e),
        };
        if start >= len {
            break;
        }
        let end = seek(file, start, libc::SEEK_HOLE)?.min(len);
        ranges.push((start, end));
        pos = end;
    }
    Ok(ranges)
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek takes a descriptor `file` keeps open, an offset and a flag; no memory. The
    // file position it moves is not used by anyone: all image I/O is positional.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    u64::try_from(ret).map_err(|_| std::io::Error::last_os_error())
}

fn lock(file: &File, shared: bool) -> std::io::Result<()> {
    flock(file, if shared { libc::LOCK_SH } else { libc::LOCK_EX })
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock only takes a file descriptor that `file` keeps open, and flags; no memory is
    // passed.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::TempDir;
    use std::io::Write;

    fn image(len: usize) -> (TempDir, PathBuf) {
        let dir = TempDir::new("disk");
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().write_all(&vec![0u8; len]).unwrap();
        (dir, path)
    }

    #[test]
    fn rejects_sizes_that_are_not_sectors() {
        let (_dir, path) = image(1000);
        let err = DiskImage::open(&path, false, false).unwrap_err();
        assert!(matches!(err, DiskError::Size { size: 1000, .. }), "{err}");
        assert!(err.to_string().contains("not a positive multiple of 512"));
        let (_dir, path) = image(0);
        assert!(matches!(
            DiskImage::open(&path, true, false),
            Err(DiskError::Size { size: 0, .. })
        ));
    }

    #[test]
    fn writers_are_exclusive_readers_share() {
        let (_dir, path) = image(4096);
        let disk = DiskImage::open(&path, false, false).unwrap();
        assert_eq!(disk.sectors(), 8);
        let err = DiskImage::open(&path, false, false).unwrap_err();
        assert!(matches!(err, DiskError::Locked { .. }), "{err}");
        assert!(matches!(
            DiskImage::open(&path, true, false),
            Err(DiskError::Locked { .. })
        ));
        drop(disk);
        let a = DiskImage::open(&path, true, false).unwrap();
        let _b = DiskImage::open(&path, true, true).unwrap();
        assert!(a.read_only());
        assert!(matches!(
            DiskImage::open(&path, false, true),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn data_ranges_skip_holes() {
        let dir = TempDir::new("disk");
        let path = dir.path().join("sparse.img");
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        assert_eq!(data_ranges(&f, 8 << 20).unwrap(), vec![]);
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1; 4096], 1 << 20).unwrap();
        f.write_all_at(&[2; 8192], 5 << 20).unwrap();
        let ranges = data_ranges(&f, 8 << 20).unwrap();
        // File systems may allocate more than was written, never less.
        assert!(!ranges.is_empty() && ranges.len() <= 2, "{ranges:?}");
        let covers = |at: u64| ranges.iter().any(|&(s, e)| s <= at && at < e);
        assert!(covers(1 << 20) && covers((5 << 20) + 8191), "{ranges:?}");
        assert!(!covers(0) && !covers(7 << 20), "{ranges:?}");
        assert!(ranges.iter().all(|&(s, e)| s < e && e <= 8 << 20));
        // Only the first `len` bytes count.
        assert_eq!(data_ranges(&f, 1 << 20).unwrap(), vec![]);
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = DiskImage::open(Path::new("/nonexistent/disk.img"), false, false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
    }
}
