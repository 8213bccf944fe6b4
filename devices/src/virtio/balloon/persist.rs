//! What a balloon keeps beyond its queues, for snapshots.

use serde::{Deserialize, Serialize};

/// The balloon's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Features the device offered (the configuration it was built from), to refuse a state
    /// saved from another kind of balloon.
    pub avail_features: u64,
    /// The host's target (`num_pages`).
    pub target_pages: u32,
    /// What the guest said the balloon holds (`actual`).
    pub actual_pages: u32,
    /// The statistics polling interval.
    pub stats_interval_s: u32,
    /// The statistics buffer the device holds until its next poll: the guest waits for it, so it
    /// must come back after a restore.
    pub stats_head: Option<u16>,
}
