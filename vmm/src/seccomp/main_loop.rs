//! The main thread's allow-list, installed once every vCPU thread runs, before the event loop.
//!
//! By then KVM, guest memory, devices, irqfds and ioeventfds, the block engines and the control
//! socket exist: the loop only waits on fds, serves what they say, and ends the process. The one
//! exception is `snapshot-create`, which creates a directory and files and reads the VM's state;
//! which paths it can reach is bounded by the jail's mount namespace, not by this list.

use seccompiler::BackendError;

use super::{arg_eq, arg_in, arg_without, base_rules, ioctl, rule, Rules};

pub(super) fn rules() -> Result<Rules, BackendError> {
    let mut r = base_rules()?;
    // The pid that signals may target: this process's own threads only.
    let pid = u64::from(std::process::id());

    // event-manager: waiting for events.
    r.allow(libc::SYS_epoll_wait);
    // event-manager: waiting for events (newer glibc/libc paths).
    r.allow(libc::SYS_epoll_pwait);
    // event-manager: adding and removing fds (control clients, rate-limiter timers).
    r.allow(libc::SYS_epoll_ctl);
    // A second event loop or poller created at run time (e.g. for a migration).
    r.allow(libc::SYS_epoll_create1);
    // Draining eventfds and timerfds, reading control-socket requests.
    r.allow(libc::SYS_read);
    // Signalling eventfds, control-socket answers, log lines and the exit line on stderr/stdout.
    r.allow(libc::SYS_write);
    // Vectored writes to stdout/stderr by std's buffered writers; NICs' frames to their taps.
    r.allow(libc::SYS_writev);
    // A NIC checking whether its full tap has room again (zero timeout).
    r.allow(libc::SYS_poll);
    // The same, where libc implements poll with ppoll.
    r.allow(libc::SYS_ppoll);
    // std's vectored reads; I/O workers' tap reads (workers spawned later inherit this filter).
    r.allow(libc::SYS_readv);
    // Control socket: fds passed with SCM_RIGHTS, and std's socket reads.
    r.allow(libc::SYS_recvmsg);
    // Control socket: answers that carry fds (SCM_RIGHTS).
    r.allow(libc::SYS_sendmsg);
    // Control socket: std's UnixStream reads may use recvfrom.
    r.allow(libc::SYS_recvfrom);
    // Control socket: std's UnixStream writes may use sendto (MSG_NOSIGNAL).
    r.allow(libc::SYS_sendto);
    // Control socket: new clients (std accepts with accept4 and SOCK_CLOEXEC).
    r.allow(libc::SYS_accept4);
    // Dropping control clients, eventfds and fds received from clients.
    r.allow(libc::SYS_close);
    // Control socket: removing the socket file as the VMM exits.
    r.allow(libc::SYS_unlink);
    // Non-blocking client sockets (std's set_nonblocking) and close-on-exec for received fds.
    r.allow_if(libc::SYS_ioctl, arg_in(1, &[ioctl::FIONBIO, ioctl::FIOCLEX])?);
    // Flags of received fds (O_NONBLOCK), duplicating fds (try_clone uses F_DUPFD_CLOEXEC).
    r.allow_if(
        libc::SYS_fcntl,
        arg_in(
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        )?,
    );
    // Block io_uring engine: submitting requests and waiting for them on device reset.
    r.allow(libc::SYS_io_uring_enter);
    // Block sync engine and fallbacks: reads from images.
    r.allow(libc::SYS_preadv);
    // Block sync engine and fallbacks: writes to images.
    r.allow(libc::SYS_pwritev);
    // Metrics: re-reading /proc/self/statm, opened once before the filter.
    r.allow(libc::SYS_pread64);
    // Block: guest flushes.
    r.allow(libc::SYS_fdatasync);
    // Block: discard and write-zeroes.
    r.allow(libc::SYS_fallocate);
    // Live migration: handing the disks' locks to the destination at the switch-over, and taking
    // them back if the migration fails.
    r.allow(libc::SYS_flock);
    // Rate limiters and request timeouts: new timers at run time.
    r.allow(libc::SYS_timerfd_create);
    // Rate limiters: arming a timer.
    r.allow(libc::SYS_timerfd_settime);
    // Rate limiters: whether a timer is armed.
    r.allow(libc::SYS_timerfd_gettime);
    // New eventfds at run time (e.g. a response channel to the vCPUs).
    r.allow(libc::SYS_eventfd2);
    // Sleeping while waiting for vCPUs to acknowledge a pause or stop.
    r.allow(libc::SYS_clock_nanosleep);
    // Kicking a vCPU thread out of KVM_RUN with a signal: only threads of this process.
    r.allow_if(libc::SYS_tgkill, vec![rule(vec![arg_eq(0, pid)])?]);
    // Kicking a vCPU thread with a queued signal: only this process.
    r.allow_if(libc::SYS_rt_sigqueueinfo, vec![rule(vec![arg_eq(0, pid)])?]);
    // Kicking a single vCPU thread with a queued signal: only this process's threads.
    r.allow_if(libc::SYS_rt_tgsigqueueinfo, vec![rule(vec![arg_eq(0, pid)])?]);
    // Installing the vCPU kick handler (process-wide) if that happens after the filter.
    r.allow(libc::SYS_rt_sigaction);
    // std's HashMap seeds for a map first created on this thread after the filter.
    r.allow_if(
        libc::SYS_getrandom,
        vec![rule(vec![arg_without(2, libc::GRND_RANDOM as u64)])?],
    );
    // Snapshots (`snapshot-create` of the paused VM): the VM-level KVM_GET_* reads and FICLONE.
    r.allow_if(libc::SYS_ioctl, arg_in(1, &ioctl::VM_STATE_GETTERS)?);
    r.allow_if(libc::SYS_ioctl, arg_in(1, &[ioctl::FICLONE])?);
    // Snapshots: the new directory (the jail's mount namespace bounds where it can be).
    r.allow(libc::SYS_mkdir);
    // The same, where libc uses mkdirat.
    r.allow(libc::SYS_mkdirat);
    // Snapshots: creating the state, memory and disk files (and reading /proc/cpuinfo, /proc/swaps).
    r.allow(libc::SYS_openat);
    // Snapshots: sizes of images and files.
    r.allow(libc::SYS_fstat);
    // The same, through statx or newfstatat.
    r.allow(libc::SYS_statx);
    // The same.
    r.allow(libc::SYS_newfstatat);
    // Snapshots: which pages of guest memory are resident.
    r.allow(libc::SYS_mincore);
    // Snapshots: writing memory and state files at offsets.
    r.allow(libc::SYS_pwrite64);
    // Snapshots: the memory file's and disk copies' lengths.
    r.allow(libc::SYS_ftruncate);
    // Snapshots: finding a disk image's data extents (SEEK_DATA/SEEK_HOLE).
    r.allow(libc::SYS_lseek);
    // Snapshots: copying disk extents in the kernel.
    r.allow(libc::SYS_copy_file_range);
    // Snapshots: making files durable before answering.
    r.allow(libc::SYS_fsync);
    // Snapshots: removing a failed snapshot's directory.
    r.allow(libc::SYS_rmdir);
    // The same (remove_dir_all lists the directory and unlinks relative to it).
    r.allow(libc::SYS_getdents64);
    // The same.
    r.allow(libc::SYS_unlinkat);
    // The process's end, with the VM's exit code.
    r.allow(libc::SYS_exit_group);
    Ok(r)
}
