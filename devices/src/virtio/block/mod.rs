//! virtio-blk on a raw image file.
//!
//! `request` validates what the guest asks for, `io` turns it into host operations, `engine` runs
//! them (io_uring or synchronously), `device` ties them to the virtqueue, `disk` owns the image (and `overlay` the base of a copy-on-write one), and `written` remembers which parts
//! of it the guest wrote (for live migration).

mod device;
pub mod disk;
pub mod engine;
pub mod io;
pub mod metrics;
pub mod overlay;
pub mod request;
pub mod written;

pub use device::{Block, BlockError, BlockSpec, BlockState, MAX_DISCARD_SECTORS, QUEUE_SIZE};
pub use disk::{DiskError, DiskImage, SECTOR_SIZE};
pub use engine::EngineKind;
pub use metrics::{BlockMetrics, BlockMetricsSnapshot};
pub use written::WrittenChunks;

#[cfg(test)]
mod tests;
