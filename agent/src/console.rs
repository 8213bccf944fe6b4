//! Serial console logs: the vmm writes `console.log` at growing offsets (it does not append), so the
//! agent bounds the disk it takes by punching the old part out of the file (the file stays sparse,
//! its size keeps growing, its data does not), and readers start at the first byte of data.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use rustix::fs::{FallocateFlags, SeekFrom as RawSeek};

/// Punch granularity: file system blocks.
const BLOCK: u64 = 4096;

/// Where the kept data of an open log starts (after punched holes).
pub fn data_start(file: &File) -> u64 {
    // ENXIO: no data at all (empty, or all punched).
    rustix::fs::seek(file, RawSeek::Data(0)).unwrap_or(0)
}

/// Keeps at most about `max_bytes` of data in the log at `path`: when more is there, frees all but
/// the last `max_bytes / 2`. Returns the bytes freed. A missing log is not an error.
pub fn cap(path: &Path, max_bytes: u64) -> std::io::Result<u64> {
    let file = match File::options().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    let start = data_start(&file);
    if size.saturating_sub(start) <= max_bytes {
        return Ok(0);
    }
    let end = (size - max_bytes / 2) / BLOCK * BLOCK;
    if end <= start {
        return Ok(0);
    }
    rustix::fs::fallocate(
        &file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        end,
    )?;
    Ok(end - start)
}

/// Reads the log from `offset` (moved past holes) up to `limit` bytes; returns the data and the offset
/// after it. An offset past the end (the log was recreated) starts again at its beginning.
pub fn read_from(file: &mut File, offset: u64, limit: usize) -> std::io::Result<(Vec<u8>, u64)> {
    let size = file.metadata()?.len();
    let mut offset = if offset > size { 0 } else { offset };
    offset = offset.max(data_start(file));
    if offset >= size {
        return Ok((Vec::new(), size.max(offset)));
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut data = Vec::with_capacity(limit.min((size - offset) as usize));
    file.take(limit as u64).read_to_end(&mut data)?;
    let next = offset + data.len() as u64;
    Ok((data, next))
}

/// Where a reader that wants the last `tail` bytes starts.
pub fn tail_offset(file: &File, tail: u64) -> std::io::Result<u64> {
    let size = file.metadata()?.len();
    Ok(size.saturating_sub(tail).max(data_start(file)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn capping_keeps_the_tail_and_readers_skip_the_hole() {
        let dir = harness::TempDir::new("agent-console").unwrap();
        let path = dir.path().join("console.log");
        assert_eq!(cap(&path, 1000).unwrap(), 0, "a missing log is fine");
        // Written like the vmm does: one writer at growing offsets.
        let mut writer = File::create(&path).unwrap();
        let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
        for _ in 0..2048 {
            writer.write_all(line).unwrap();
        }
        let total = 2048 * line.len() as u64;
        assert_eq!(cap(&path, 1 << 20).unwrap(), 0, "under the cap nothing happens");
        let freed = cap(&path, 32 * 1024).unwrap();
        assert!(freed > 0);
        let mut reader = File::open(&path).unwrap();
        let start = data_start(&reader);
        assert!(
            start >= total - 32 * 1024 && start <= total - 16 * 1024,
            "{start}"
        );
        let (data, next) = read_from(&mut reader, 0, 1 << 20).unwrap();
        assert_eq!(next, total);
        assert_eq!(data.len() as u64, total - start);
        assert!(!data.contains(&0), "no zeroes from the hole");
        assert!(data.ends_with(line));
        // The writer goes on where it was.
        writer.write_all(b"more\n").unwrap();
        let (data, next) = read_from(&mut reader, next, 100).unwrap();
        assert_eq!((data.as_slice(), next), (&b"more\n"[..], total + 5));
        assert_eq!(tail_offset(&reader, 5).unwrap(), total);
        // A recreated (truncated) log is read from its start.
        let mut writer = File::create(&path).unwrap();
        writer.write_all(b"new boot\n").unwrap();
        let (data, _) = read_from(&mut reader, next, 100).unwrap();
        assert_eq!(data, b"new boot\n");
    }
}
