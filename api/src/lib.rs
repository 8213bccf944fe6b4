//! Data shared by the `vmm` and the tools that drive it: the VM configuration (as read from `vm.json`)
//! and the control-socket messages. Pure data: no KVM, no I/O beyond parsing.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod drive;
pub mod net;
pub mod rate_limiter;

pub use config::{BootSource, ConfigError, MachineConfig, SerialConfig, VmConfig};
pub use drive::{CacheMode, DriveConfig, IoEngine};
pub use net::{MacAddr, NetConfig};
pub use rate_limiter::{RateLimiterConfig, RateLimiterConfigError, TokenBucketConfig};
