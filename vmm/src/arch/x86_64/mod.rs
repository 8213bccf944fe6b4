//! x86_64: guest physical layout, firmware tables, boot protocols and vCPU setup.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod host_quirks;
pub mod layout;
pub mod regs;
