//! KVM state owned by the VMM: the VM, its guest memory and its vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vcpu_control;
pub mod vcpu_state;
pub mod vm;
