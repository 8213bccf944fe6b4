//! One control-socket connection: bounded input and output buffers, and the file descriptors that
//! arrive with its bytes (SCM_RIGHTS).

use std::io::{ErrorKind as IoErrorKind, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_api::control::{MAX_LINE_BYTES, MAX_PASSED_FDS};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Unsent answers and events a client may accumulate before it is dropped.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;

/// What reading from a client found.
pub enum ReadOutcome {
    /// Nothing more for now.
    Drained,
    /// The client closed its side (its complete lines are still answered).
    Eof,
    /// The connection failed.
    Failed,
}

/// A connected client.
pub struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Descriptors received and not yet claimed by a complete line.
    fds: Vec<OwnedFd>,
    /// Stop reading: drop the client once its answers are out.
    pub closing: bool,
    /// A write failed: the client is gone and is removed at the next chance.
    pub dead: bool,
}

impl Client {
    /// Wraps an accepted, non-blocking stream.
    pub fn new(stream: UnixStream) -> Self {
        Client {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            fds: Vec::new(),
            closing: false,
            dead: false,
        }
    }

    /// Reads until the socket would block, the input passes [`MAX_LINE_BYTES`] without a newline, or
    /// the client closes.
    pub fn read_available(&mut self) -> ReadOutcome {
        let mut buf = [0u8; 4096];
        let mut fds = [0 as RawFd; MAX_PASSED_FDS];
        loop {
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points at `buf`, a local array the kernel may fill with any bytes;
            // `fds` likewise receives plain integers.
            let received = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) };
            match received {
                Ok((n, nfds)) => {
                    for &fd in &fds[..nfds] {
                        // SAFETY: recvmsg just created this descriptor in our table for us; nothing
                        // else owns it, so wrapping it gives it exactly one owner that closes it.
                        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                        // Beyond the bound they are simply closed (by the drop).
                        if self.fds.len() < MAX_PASSED_FDS {
                            self.fds.push(owned);
                        }
                    }
                    if n == 0 {
                        return ReadOutcome::Eof;
                    }
                    self.input.extend_from_slice(&buf[..n]);
                    if self.input.len() > MAX_LINE_BYTES && !self.input.contains(&b'\n') {
                        return ReadOutcome::Drained;
                    }
                }
                Err(e) if e.errno() == libc::EAGAIN => return ReadOutcome::Drained,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(_) => return ReadOutcome::Failed,
            }
        }
    }

    /// The next complete line (without its newline) and the descriptors that came before its end.
    pub fn next_line(&mut self) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        let end = self.input.iter().position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.input.drain(..=end).collect();
        line.pop();
        Some((line, std::mem::take(&mut self.fds)))
    }

    /// Whether the unfinished line is already too long.
    pub fn line_too_long(&self) -> bool {
        self.input.len() > MAX_LINE_BYTES
    }

    /// Forgets the unfinished line and any descriptors waiting with it.
    pub fn discard_input(&mut self) {
        self.input.clear();
        self.fds.clear();
    }

    /// Queues `line` (a newline is added) and writes what the socket takes now.
    pub fn send(&mut self, line: &[u8]) {
        if self.dead {
            return;
        }
        self.output.extend_from_slice(line);
        self.output.push(b'\n');
        self.flush();
    }

    /// Writes what the socket takes now; marks the client dead if it is gone or too far behind.
    pub fn flush(&mut self) {
        while !self.output.is_empty() && !self.dead {
            match self.stream.write(&self.output) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
                Err(e) if e.kind() == IoErrorKind::Interrupted => {}
                Err(_) => self.dead = true,
            }
        }
        if self.output.len() > MAX_PENDING_OUTPUT {
            self.dead = true;
        }
    }

    /// Whether everything queued has been written.
    pub fn flushed(&self) -> bool {
        self.output.is_empty()
    }
}
