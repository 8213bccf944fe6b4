//! Timers read from an event loop, which must never block on them.

use std::os::fd::AsRawFd;

use vmm_sys_util::timerfd::TimerFd;

/// A disarmed monotonic timerfd whose reads fail with `WouldBlock` instead of waiting: a wake-up
/// that went stale (the timer was re-armed or cleared since) costs nothing.
pub fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on the descriptor `timer` owns (alive for the call) only read and
    // change its status flags.
    let ret = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(timer)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reading_a_timer_that_has_not_fired_does_not_block() {
        let mut timer = super::nonblocking_timer().unwrap();
        let e = timer.wait().unwrap_err();
        assert_eq!(e.errno(), libc::EAGAIN);
    }
}
