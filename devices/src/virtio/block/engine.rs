//! I/O engines: io_uring (many requests in flight, completions through an eventfd) and a synchronous
//! fallback that runs each operation in place.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::DiskImage;
use super::io::{discard_mode, finish_sync, iovecs, retry_buffered, run_sync, zero_mode, DiskOp, Route};
use super::overlay::Source;

/// Which engine a drive uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring, the default.
    #[default]
    Uring,
    /// Blocking system calls on the event loop thread.
    Sync,
}

/// A finished operation: its token and the bytes moved, or the error.
pub type Completion = (u16, io::Result<usize>);

/// Runs disk operations. Tokens identify operations; at most one operation per token is in flight.
pub enum Engine {
    /// See [`EngineKind::Uring`].
    Uring(Box<UringEngine>),
    /// See [`EngineKind::Sync`]: operations complete inside `submit`.
    Sync(Vec<Completion>),
}

impl Engine {
    /// Creates an engine for up to `depth` operations in flight (tokens `0..depth`).
    pub fn new(kind: EngineKind, depth: u16) -> io::Result<Self> {
        Ok(match kind {
            EngineKind::Uring => Engine::Uring(Box::new(UringEngine::new(depth)?)),
            EngineKind::Sync => Engine::Sync(Vec::new()),
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Sync(_) => EngineKind::Sync,
        }
    }

    /// Starts `op`. Its result is returned later by [`Engine::completions`]; an `Err` here means it
    /// never started.
    pub fn submit(&mut self, disk: &DiskImage, token: u16, op: DiskOp) -> io::Result<()> {
        match self {
            Engine::Uring(ring) => ring.submit(disk, token, op),
            Engine::Sync(done) => {
                done.push((token, run_sync(disk, &op)));
                Ok(())
            }
        }
    }

    /// Hands the operations queued since the last call to the kernel, in one system call.
    pub fn kick(&mut self) {
        if let Engine::Uring(ring) = self {
            ring.kick();
        }
    }

    /// Moves finished operations into `out`.
    pub fn completions(&mut self, disk: &DiskImage, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(ring) => ring.completions(disk, out),
            Engine::Sync(done) => out.append(done),
        }
    }

    /// Waits until nothing is in flight, moving the results into `out` (used on device reset).
    pub fn drain(&mut self, disk: &DiskImage, out: &mut Vec<Completion>) {
        match self {
            Engine::Uring(ring) => ring.drain(disk, out),
            Engine::Sync(done) => out.append(done),
        }
    }

    /// The eventfd signalled when operations complete, if completions are asynchronous.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(ring) => Some(ring.evt.as_raw_fd()),
            Engine::Sync(_) => None,
        }
    }

    /// Consumes the completion eventfd's signal.
    pub fn clear_completion_event(&self) {
        if let Engine::Uring(ring) = self {
            crate::virtio::drain_eventfd(&ring.evt);
        }
    }
}

/// An operation the kernel owns until its completion: its buffers must stay alive until then.
struct InFlight {
    op: DiskOp,
    /// The file it runs on.
    source: Source,
    /// The kernel reads this array when it starts the operation; kept with the operation.
    _iov: Vec<libc::iovec>,
}

/// The io_uring engine.
pub struct UringEngine {
    ring: IoUring,
    evt: EventFd,
    in_flight: Vec<Option<InFlight>>,
    /// Operations that finished without the kernel (see [`Route::Done`]), reported with the next
    /// completions.
    finished: Vec<Completion>,
    unsubmitted: bool,
}

// SAFETY: the iovec pointers in `InFlight` point into guest memory, which is mapped for the life of
// the process and meant to be shared across threads; the engine itself is only used by one thread at
// a time (behind the device's lock).
unsafe impl Send for UringEngine {}

impl UringEngine {
    fn new(depth: u16) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(u32::from(depth) * 2)
            .build(u32::from(depth))?;
        let evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            evt,
            in_flight: (0..depth).map(|_| None).collect(),
            finished: Vec::new(),
            unsubmitted: false,
        })
    }

    fn submit(&mut self, disk: &DiskImage, token: u16, op: DiskOp) -> io::Result<()> {
        if !matches!(self.in_flight.get(usize::from(token)), Some(None)) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let source = match disk.route(&op) {
            Route::To(source) => source,
            Route::Done(result) => {
                self.finished.push((token, result));
                return Ok(());
            }
        };
        let fd = types::Fd(disk.source_file(source).as_raw_fd());
        let iov = match &op {
            DiskOp::Read { bufs, .. } | DiskOp::Write { bufs, .. } => iovecs(bufs),
            _ => Vec::new(),
        };
        let iov_len = u32::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let entry = match &op {
            DiskOp::Read { offset, .. } => opcode::Readv::new(fd, iov.as_ptr(), iov_len)
                .offset(*offset)
                .build(),
            DiskOp::Write { offset, .. } => opcode::Writev::new(fd, iov.as_ptr(), iov_len)
                .offset(*offset)
                .build(),
            // Drained: the flush starts after every write submitted before it has finished, which is
            // stronger than virtio requires (only completed writes) and costs little, flushes being rare.
            DiskOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            DiskOp::Discard { offset, len } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(discard_mode())
                .build(),
            DiskOp::WriteZeroes { offset, len, unmap } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(zero_mode(*unmap))
                .build(),
        }
        .user_data(u64::from(token));

        // SAFETY: the entry's buffers live in guest memory, mapped for the life of the process, and
        // its iovec array moves into `in_flight` below (a Vec's heap buffer does not move with it),
        // where it stays until the kernel reports the completion of `token`.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The submission queue is as deep as the virtqueue, so it is only full when the kernel
            // has not consumed earlier entries yet: hand them over and retry once.
            self.kick();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| io::Error::from_raw_os_error(libc::EAGAIN))?;
        }
        self.in_flight[usize::from(token)] = Some(InFlight {
            op,
            source,
            _iov: iov,
        });
        self.unsubmitted = true;
        Ok(())
    }

    fn kick(&mut self) {
        if !self.unsubmitted {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = false,
            // Busy: the completion queue is full; entries stay queued and go with the next kick,
            // which comes after the completions are reaped.
            Err(e) => log::warn!("block: io_uring submit: {e}"),
        }
    }

    fn completions(&mut self, disk: &DiskImage, out: &mut Vec<Completion>) {
        out.append(&mut self.finished);
        let mut finished = Vec::new();
        for cqe in self.ring.completion() {
            finished.push((cqe.user_data(), cqe.result()));
        }
        for (token, res) in finished {
            let Some(done) = usize::try_from(token)
                .ok()
                .and_then(|t| self.in_flight.get_mut(t))
                .and_then(Option::take)
            else {
                log::error!("block: io_uring completion for unknown token {token}");
                continue;
            };
            let result = if res < 0 {
                retry_buffered(disk, &done.op, 0, Err(io::Error::from_raw_os_error(-res)))
            } else {
                let moved = res as usize;
                if moved < done.op.expected_len() {
                    // A short transfer: rare enough to finish synchronously.
                    finish_sync(disk, done.source, &done.op, moved)
                } else {
                    Ok(moved)
                }
            };
            out.push((token as u16, result));
        }
        // Entries a busy ring refused go now that completions made room.
        self.kick();
    }

    fn drain(&mut self, disk: &DiskImage, out: &mut Vec<Completion>) {
        out.append(&mut self.finished);
        self.kick();
        while self.in_flight.iter().any(Option::is_some) {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("block: waiting for io_uring completions: {e}");
                    break;
                }
            }
            self.completions(disk, out);
        }
        crate::virtio::drain_eventfd(&self.evt);
    }
}
