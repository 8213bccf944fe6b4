//! virtio-balloon (virtio 1.2, section 5.5): the host asks the guest for memory back.
//!
//! The host sets a target (`num_pages` in the configuration space); the guest's driver allocates
//! that many pages and sends their page frame numbers on the inflate queue, and the device
//! releases them on the host (`MADV_DONTNEED`: the host frees them; a later guest access faults
//! in a zero page, or the snapshot's page for file-backed memory). Pages come back on the deflate
//! queue, where there is nothing to do: the host backs them again on first touch. Optional queues
//! carry the guest's memory statistics (`VIRTIO_BALLOON_F_STATS_VQ`, polled on a timer) and free
//! page reports (`VIRTIO_BALLOON_F_REPORTING`: ranges of free guest memory, released like inflated
//! pages). `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` only changes the guest driver's behaviour.
//!
//! Every page number and range is the guest's word: each is checked against guest RAM before
//! anything is released, and whatever falls outside, is malformed or too large is counted and
//! skipped; the ring goes on working.
//!
//! `pages` validates and releases, `stats` parses statistics, `device` ties them to the queues,
//! `persist` and `metrics` are what snapshots and the control socket see.

mod device;
pub mod metrics;
pub mod pages;
pub mod persist;
pub mod stats;

pub use device::{Balloon, BalloonError, BalloonSpec, QUEUE_SIZE};
pub use metrics::BalloonMetrics;
pub use persist::BalloonState;

#[cfg(test)]
mod tests;

/// The virtio device ID of a memory balloon.
pub const TYPE_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

/// Feature bit: the guest must tell the host before reusing deflated pages (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// Feature bit: a statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit: the guest deflates the balloon rather than fail allocations.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: a free page reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// The balloon counts in 4 KiB pages, whatever the guest's page size.
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// `BALLOON_PAGE_SIZE` as a shift.
pub const BALLOON_PFN_SHIFT: u32 = 12;
