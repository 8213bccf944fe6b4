//! The allow-list of a future I/O worker thread: file or tap I/O on fds it is handed, woken by
//! eventfds through its own epoll. The VMM has no such thread yet (block I/O runs on the main
//! loop); the list is kept and tested so a worker can be added without widening the others.
//!
//! Spawned by the main loop after the main-loop filter, a worker would run under both filters,
//! so everything here is on the main loop's list too.

use seccompiler::BackendError;

use super::{base_rules, Rules};

pub(super) fn rules() -> Result<Rules, BackendError> {
    let mut r = base_rules()?;
    // Draining its eventfds and timerfds; reading a tap device.
    r.allow(libc::SYS_read);
    // Signalling completion eventfds and irqfds; writing a tap device; log lines on stderr.
    r.allow(libc::SYS_write);
    // Tap reads of a frame into guest buffers.
    r.allow(libc::SYS_readv);
    // Tap writes of a frame from guest buffers.
    r.allow(libc::SYS_writev);
    // Image reads.
    r.allow(libc::SYS_preadv);
    // Image writes.
    r.allow(libc::SYS_pwritev);
    // Guest flushes.
    r.allow(libc::SYS_fdatasync);
    // Discard and write-zeroes.
    r.allow(libc::SYS_fallocate);
    // Waiting for work on its own epoll fd.
    r.allow(libc::SYS_epoll_wait);
    // Waiting for work (newer glibc paths).
    r.allow(libc::SYS_epoll_pwait);
    // Watching and unwatching the fds it serves.
    r.allow(libc::SYS_epoll_ctl);
    Ok(r)
}
