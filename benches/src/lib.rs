//! Helpers shared by the benchmark programs in `src/bin/`: summary statistics, report output, option
//! parsing, and what both benchmarks do the same way with vmm and QEMU (guest command line, QEMU's base
//! command, waiting for the guest probe's `BOOT-COMPLETE`).

mod args;
mod cpu;
mod json_report;
pub mod procs;
mod qmp;
mod signals;
mod stats;
mod vmms;

pub use args::{wants_help, Args};
pub use cpu::{CpuMs, CpuTicks};
pub use json_report::{host_json, unix_time, write_json};
pub use qmp::Qmp;
pub use signals::clean_up_on_signals;
pub use stats::{cell, ratio, Summary};
pub use vmms::{
    bench_cmdline, ms_since, qemu_cpu, qemu_microvm, sample_memory, wait_boot_complete, Vmm, BOOT_COMPLETE,
    FAILURE_MARKERS, GUEST_CMDLINE_BASE,
};
