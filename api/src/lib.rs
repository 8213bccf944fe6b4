//! Data shared by the `vmm` and the tools that drive it: the VM configuration (as read from `vm.json`)
//! and the control-socket messages. Data, plus the one socket helper both ends share: no KVM.
#![forbid(unsafe_code)]

pub mod balloon;
pub mod config;
pub mod control;
pub mod drive;
pub mod migration;
pub mod net;
pub mod rate_limiter;
pub mod snapshot;
pub mod socket;

pub use balloon::{BalloonConfig, HugePages};
pub use config::{BootSource, ConfigError, MachineConfig, SerialConfig, VmConfig};
pub use drive::{CacheMode, DriveConfig, IoEngine};
pub use net::{MacAddr, NetConfig};
pub use rate_limiter::{RateLimiterConfig, RateLimiterConfigError, TokenBucketConfig};
