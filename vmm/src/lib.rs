//! The `vmm` library: builds and runs one virtual machine on KVM.
//!
//! [`runtime::run`] is the whole life of the process: it builds the VM (at once, or when the control
//! socket says `start`) with [`builder::build_vm`], a linear recipe (KVM, memory, kernel, firmware
//! tables, devices, vCPU threads that wait paused), resumes it, and runs the main event loop until
//! the guest ends. [`machine::Machine`] is the built VM: pause, resume, shutdown.

pub mod arch;
pub mod builder;
pub mod cli;
pub mod control;
pub mod device_manager;
pub mod exit;
pub mod inherited_fds;
pub mod jail;
pub mod logger;
pub mod machine;
pub mod metrics;
pub mod migration;
pub mod persist;
pub mod runtime;
pub mod seccomp;
pub mod sync;
pub mod vstate;
