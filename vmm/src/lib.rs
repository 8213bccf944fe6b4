//! The `vmm` library: builds and runs one virtual machine on KVM.
//!
//! [`builder::run_vm`] is the whole life of a VM: a linear recipe (KVM, memory, kernel, firmware
//! tables, devices, vCPUs) followed by the main event loop, which waits for the guest to end.

pub mod arch;
pub mod builder;
pub mod cli;
pub mod control;
pub mod device_manager;
pub mod exit;
pub mod jail;
pub mod logger;
pub mod vstate;
