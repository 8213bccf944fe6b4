//! Numbers about the VMM process itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// `/proc/self/statm`, opened once: later reads need no `open` (which the main loop's seccomp
/// filter does not allow) and work in a jail without `/proc`, as long as the first read came first.
fn statm() -> Option<&'static File> {
    static STATM: OnceLock<Option<File>> = OnceLock::new();
    STATM.get_or_init(|| File::open("/proc/self/statm").ok()).as_ref()
}

/// Opens what later reads need; call before the process is sandboxed.
pub fn init() {
    let _ = statm();
}

/// Resident set size of this process in KiB, guest memory included.
pub fn rss_kib() -> Option<u64> {
    let mut buf = [0u8; 128];
    let n = statm()?.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_kib())
}

fn page_kib() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).map_or(4, |s| s / 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rss_is_read_repeatedly() {
        let a = super::rss_kib().unwrap();
        let b = super::rss_kib().unwrap();
        assert!(a > 0 && b > 0);
    }
}
