//! Disk images in a snapshot: a copy-on-write clone where the filesystem offers one (FICLONE on
//! btrfs, XFS, bcachefs), otherwise a sparse copy of the allocated extents only.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOW(0x94, 9, int)`: share `src`'s extents with `dst`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// How an image was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The filesystem shares the extents (no data moved).
    Reflink,
    /// The allocated extents were copied.
    Sparse,
}

/// Makes `dst` (empty, writable) an image with `src`'s contents, synced to disk if `durable`;
/// returns how, and the bytes of data moved (0 for a reflink).
pub fn copy_image(src: &File, dst: &File, durable: bool) -> io::Result<(CopyKind, u64)> {
    // SAFETY: FICLONE takes two descriptors that `src` and `dst` keep open, and no memory.
    let ret = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if ret == 0 {
        return Ok((CopyKind::Reflink, 0));
    }
    let len = src.metadata()?.len();
    dst.set_len(0)?;
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        copy_range(src, dst, data, hole - data)?;
        copied += hole - data;
        pos = hole;
    }
    dst.set_len(len)?;
    if durable {
        dst.sync_all()?;
    }
    Ok((CopyKind::Sparse, copied))
}

/// `lseek(fd, offset, whence)`; `None` where SEEK_DATA finds no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek takes a descriptor `file` keeps open and plain integers.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if ret >= 0 {
        return Ok(Some(ret as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(err),
    }
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`, in the kernel.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (offset + done) as libc::loff_t;
        let mut off_out = off_in;
        let chunk = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are kept open by their Files; the offsets are local variables
        // the kernel updates; no other memory is passed.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        match n {
            n if n > 0 => done += n as u64,
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sparse_image_is_copied_with_its_holes() {
        let dir = std::env::temp_dir().join(format!("vmm-diskcopy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src_path = dir.join("src");
        let src = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src_path)
            .unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(b"head", 0).unwrap();
        src.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        src.write_all_at(&[5u8; 8192], 10 << 20).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("dst"))
            .unwrap();
        let (kind, copied) = copy_image(&src, &dst, true).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), 64 << 20);
        if kind == CopyKind::Sparse {
            assert!(copied < 1 << 20, "copied {copied} bytes of a mostly empty image");
        }
        let mut buf = [0u8; 4];
        dst.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"head");
        dst.read_exact_at(&mut buf, (64 << 20) - 4).unwrap();
        assert_eq!(&buf, b"tail");
        let mut mid = [0u8; 8192];
        dst.read_exact_at(&mut mid, 10 << 20).unwrap();
        assert_eq!(mid, [5u8; 8192]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
