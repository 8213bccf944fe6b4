//! A stand-in tap for tests and fuzzing: one end of a `SOCK_SEQPACKET` socket pair (which keeps
//! message boundaries, as a tap does), with errors that a test can inject, and the other end as
//! the "network".

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::tap::{read_fd, TapIo, TxFrame};

/// Knobs and counters shared between a [`SocketTap`] and its test.
#[derive(Debug, Default)]
pub struct TapControl {
    /// The offloads last set.
    pub offload: AtomicU32,
    /// How many `set_offload` calls there were.
    pub offload_calls: AtomicU32,
    /// The next this-many reads fail with `EIO`.
    pub read_errors: AtomicU32,
    /// The next this-many writes fail with `EIO`.
    pub write_errors: AtomicU32,
    /// The next this-many writes fail with `EAGAIN`.
    pub write_eagain: AtomicU32,
    /// The next this-many `set_offload` calls fail with `EINVAL`.
    pub offload_errors: AtomicU32,
    /// Frames read successfully.
    pub frames_read: AtomicU64,
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// The device's end of the pair.
#[derive(Debug)]
pub struct SocketTap {
    sock: OwnedFd,
    control: Arc<TapControl>,
}

/// The network's end of the pair.
#[derive(Debug)]
pub struct Peer {
    sock: OwnedFd,
}

impl SocketTap {
    /// A connected pair, both ends non-blocking.
    pub fn pair() -> (SocketTap, Peer, Arc<TapControl>) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which we then own.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&a, &b] {
            let size: libc::c_int = 4 << 20;
            // SAFETY: SO_SNDBUF reads one int from this stack frame.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        let control = Arc::new(TapControl::default());
        (
            SocketTap {
                sock: a,
                control: Arc::clone(&control),
            },
            Peer { sock: b },
            control,
        )
    }
}

impl TapIo for SocketTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if take_one(&self.control.read_errors) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // MSG_TRUNC: report the full length of a frame larger than the buffer, as a tap does.
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow mutably.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.control.frames_read.fetch_add(1, Ordering::SeqCst);
        Ok(n as usize)
    }

    fn write_frame(&mut self, frame: &TxFrame) -> io::Result<usize> {
        if take_one(&self.control.write_errors) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if take_one(&self.control.write_eagain) {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        frame.write_to(self.sock.as_raw_fd())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.control.offload_calls.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.control.offload_errors) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.control.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn name(&self) -> &str {
        "test-tap"
    }
}

impl Peer {
    /// Sends one frame (header included) towards the device.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the kernel reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", io::Error::last_os_error());
    }

    /// Sends one frame if there is room; false if the device's side is full.
    pub fn try_send(&self, frame: &[u8]) -> bool {
        // SAFETY: the kernel reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        n == frame.len() as isize
    }

    /// The next frame the device sent, if any.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; super::MAX_FRAME_LEN + 1];
        match read_fd(self.sock.as_raw_fd(), &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("peer recv: {e}"),
        }
    }

    /// Every frame the device sent so far.
    pub fn recv_all(&self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.recv()).collect()
    }
}
