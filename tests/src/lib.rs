//! Harness shared by the end-to-end tests (`tests/tests/*.rs`) and the benchmarks (`benches/`).
//!
//! What it gives you:
//! - [`GuestImages::get`]: the guest kernel and root filesystems, built (or found in the cache) by
//!   `guest-images/build.sh`, once per process.
//! - [`vmm_binary`] and [`require_kvm`]: where the `vmm` binary is, and a hard failure without `/dev/kvm`.
//! - [`inherit_fd`]: a descriptor a spawned `vmm` inherits, for `vmm --fd NAME=N`.
//! - [`GuestBuilder`] / [`Guest`]: spawn a `vmm` (or any VMM via [`Guest::spawn_command`]) with its
//!   stdout and stderr captured line by line, timestamped, and waited on with [`Guest::wait_for_line`].
//! - [`probe_cmdline`] and [`parse_probe_facts`]: talk to the in-kernel guest probe (`vmmprobe`).
//! - [`rss_breakdown`]: a process's resident memory split into guest RAM and VMM overhead.
//! - [`crc32`]: zlib's CRC-32, to check what the guest probe reports about data we gave it.
//! - [`Sum64`]: the probe's cheaper `sum64`, for transfers too long to CRC in an emulated guest.
//! - [`TempDir`]: a scratch directory removed on drop.
//! - [`NetNs`]: a network namespace with TAP devices for a test, removed with what is in it.
//! - [`ControlClient`]: requests and events on a VMM's control socket (file descriptors too).
//!
//! A typical end-to-end test:
//!
//! ```no_run
//! use std::time::Duration;
//! use harness::{probe_cmdline, require_kvm, GuestBuilder, GuestImages};
//!
//! # fn main() -> anyhow::Result<()> {
//! require_kvm();
//! let images = GuestImages::get()?;
//! let mut guest = GuestBuilder::new(&images.vmlinux)
//!     .initrd(&images.initramfs)
//!     .cmdline(&probe_cmdline("poweroff"))
//!     .spawn()?;
//! guest.wait_for_line("BOOT-COMPLETE", Duration::from_secs(180))?;
//! let status = guest.wait_exit(Duration::from_secs(60))?;
//! assert!(status.success());
//! # Ok(())
//! # }
//! ```

mod boot_gate;
mod control_client;
mod crc32;
mod guest;
mod images;
mod netns;
mod output;
mod probe;
mod smaps;
mod sum64;
mod temp_dir;

pub use control_client::ControlClient;
pub use crc32::{crc32, Crc32};
pub use guest::{inherit_fd, require_kvm, try_vmm_binary, vmm_binary, Guest, GuestBuilder};
pub use images::{workspace_root, GuestImages};
pub use netns::NetNs;
pub use output::{Line, LineHook, Stream};
pub use probe::{
    find_probe_fields, parse_probe_facts, probe_cmdline, probe_counters, probe_fields, ProbeFacts,
    ProbePattern,
};
pub use smaps::{parse_smaps, read_smaps, rss_breakdown, GuestMapping, Mapping, RssBreakdown};
pub use sum64::Sum64;
pub use temp_dir::TempDir;
