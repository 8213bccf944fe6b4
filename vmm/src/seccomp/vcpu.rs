//! A vCPU thread's allow-list, installed as the first act of its thread body, before KVM_RUN.
//!
//! The thread runs its vCPU and serves the exits KVM hands it: port and MMIO accesses to the
//! legacy devices and virtio-mmio registers. Those run device code on this thread, with the
//! device's lock held: the serial console writes its output; the exit devices, irqs and the boot
//! timer signal eventfds; and a virtio status or reset write activates or resets a device, which
//! for a block device processes its queue in place (io_uring submissions, or the synchronous
//! engine's reads and writes), arms its rate limiter, and on reset waits for requests in flight.
//! A virtio-net status write sets the tap's offloads and may move frames (read, writev, a
//! zero-timeout poll of the tap). It opens nothing, creates no socket and no fd of any kind, and
//! ioctls only `KVM_RUN`, `TUNSETOFFLOAD`, and the `KVM_GET_*` reads of its state
//! when a snapshot asks. While a migration throttles the guest, it sleeps.

use seccompiler::BackendError;

use super::{arg_in, base_rules, ioctl, Rules};

pub(super) fn rules() -> Result<Rules, BackendError> {
    let mut r = base_rules()?;
    // KVM_RUN on this thread's vCPU fd (the vCPU was configured before); a NIC's activation
    // setting the offloads the guest accepted on its tap.
    r.allow_if(
        libc::SYS_ioctl,
        arg_in(1, &[ioctl::KVM_RUN, ioctl::TUNSETOFFLOAD])?,
    );
    // A paused vCPU saving its state for a snapshot: the KVM_GET_* reads of its own fd.
    r.allow_if(libc::SYS_ioctl, arg_in(1, &ioctl::VCPU_STATE_GETTERS)?);
    // NIC activation: frames the guest queued before DRIVER_OK go to the tap, one writev each.
    r.allow(libc::SYS_writev);
    // NIC activation: whether a full tap has room again (zero timeout).
    r.allow(libc::SYS_poll);
    // The same, where libc implements poll with ppoll.
    r.allow(libc::SYS_ppoll);
    // Serial output (stdout or file), eventfd signals (irqs, exits, boot), log lines on stderr.
    r.allow(libc::SYS_write);
    // Block device reset: consuming its io_uring completion eventfd; NIC activation: frames from
    // the tap.
    r.allow(libc::SYS_read);
    // Block device activate/reset (MMIO write): submitting queued requests, waiting for them.
    r.allow(libc::SYS_io_uring_enter);
    // Block device activate (sync engine, O_DIRECT fallback): image reads.
    r.allow(libc::SYS_preadv);
    // Block device activate (sync engine, O_DIRECT fallback): image writes.
    r.allow(libc::SYS_pwritev);
    // Block device activate (sync engine): a flush already queued by the driver.
    r.allow(libc::SYS_fdatasync);
    // Block device activate (sync engine): discard or write-zeroes already queued.
    r.allow(libc::SYS_fallocate);
    // Block device activate: a throttled queue arms its rate limiter's timerfd.
    r.allow(libc::SYS_timerfd_settime);
    // Auto-converge during a migration: a kicked vCPU sits out its share of the throttle period.
    r.allow(libc::SYS_clock_nanosleep);
    r.allow(libc::SYS_nanosleep);
    Ok(r)
}
