//! What the benchmark measures: the phases (loads), and per run and phase the counts, durations and CPU
//! times, with the figures derived from them (IOPS, MiB/s, CPU per I/O).

use serde_json::{json, Value};

use benches::CpuMs;

/// One load: the probe's `blk-load` mode (fio's `--rw` differs for the sequential ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Phase {
    /// `randread`, `randwrite`, `seqread` or `seqwrite`.
    pub(crate) mode: &'static str,
    /// Block size in bytes.
    pub(crate) bs: u64,
    /// Queue depth.
    pub(crate) qd: u32,
}

impl Phase {
    /// A phase of `mode` with blocks of `bs` bytes, `qd` of them in flight.
    pub(crate) fn new(mode: &'static str, bs: u64, qd: u32) -> Phase {
        Phase { mode, bs, qd }
    }

    /// How the tables name it, e.g. `randread 4k QD32`.
    pub(crate) fn label(&self) -> String {
        let size = if self.bs >= 1 << 20 {
            format!("{}M", self.bs >> 20)
        } else {
            format!("{}k", self.bs >> 10)
        };
        format!("{} {size} QD{}", self.mode, self.qd)
    }

    /// fio's `--rw=` for this load.
    pub(crate) fn fio_rw(&self) -> &'static str {
        match self.mode {
            "seqread" => "read",
            "seqwrite" => "write",
            other => other,
        }
    }

    /// Whether it writes (fio reports writes apart from reads).
    pub(crate) fn is_write(&self) -> bool {
        self.mode.ends_with("write")
    }
}

/// What one phase measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct PhaseResult {
    /// Successful I/Os.
    pub(crate) ios: u64,
    /// Bytes moved by them.
    pub(crate) bytes: u64,
    /// Failed I/Os.
    pub(crate) errors: u64,
    /// Duration of the load as measured where it ran (guest `elapsed-us`, fio's runtime), seconds.
    pub(crate) elapsed_s: f64,
    /// Host CPU time of the VMM process (or fio) during the phase.
    pub(crate) cpu: Option<CpuMs>,
    /// Host wall time between the guest's start and result lines, ms (VMMs only).
    pub(crate) host_wall_ms: Option<f64>,
    /// The probe's `result=` (0 on success).
    pub(crate) result: i64,
}

impl PhaseResult {
    /// I/Os per second.
    pub(crate) fn iops(&self) -> Option<f64> {
        (self.elapsed_s > 0.0).then(|| self.ios as f64 / self.elapsed_s)
    }

    /// MiB per second.
    pub(crate) fn mibps(&self) -> Option<f64> {
        (self.elapsed_s > 0.0).then(|| self.bytes as f64 / self.elapsed_s / f64::from(1 << 20))
    }

    /// Host CPU microseconds per successful I/O.
    pub(crate) fn cpu_us_per_io(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.ios > 0).then(|| cpu.total() * 1000.0 / self.ios as f64)
    }

    /// Host CPU microseconds of the VMM's threads other than the vCPUs, per successful I/O.
    pub(crate) fn non_vcpu_us_per_io(&self) -> Option<f64> {
        let other = self.cpu?.non_vcpu()?;
        (self.ios > 0).then(|| other * 1000.0 / self.ios as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "ios": self.ios,
            "bytes": self.bytes,
            "errors": self.errors,
            "result": self.result,
            "elapsed_s": self.elapsed_s,
            "iops": self.iops(),
            "mibps": self.mibps(),
            "cpu": self.cpu.map(CpuMs::to_json),
            "cpu_us_per_io": self.cpu_us_per_io(),
            "other_threads_cpu_us_per_io": self.non_vcpu_us_per_io(),
            "host_wall_ms": self.host_wall_ms,
        })
    }
}

/// One run of one side of the comparison: vmm, qemu or fio.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunResult {
    /// Per phase, in [`crate::options::Options::phases`] order; `None` if the phase produced no result
    /// line.
    pub(crate) phases: Vec<Option<PhaseResult>>,
    /// Process start to `BOOT-COMPLETE`, ms (VMMs only).
    pub(crate) boot_complete_ms: Option<f64>,
    /// CPU time of the whole VMM process (boot included) at the last phase's result line.
    pub(crate) process_cpu: Option<CpuMs>,
    /// Why the run failed, if it did.
    pub(crate) error: Option<String>,
}

impl RunResult {
    /// A result with room for `phases` phases and nothing measured yet.
    pub(crate) fn new(phases: usize) -> RunResult {
        RunResult {
            phases: vec![None; phases],
            ..RunResult::default()
        }
    }

    /// Phase `i`, if it produced a result.
    pub(crate) fn phase(&self, i: usize) -> Option<&PhaseResult> {
        self.phases.get(i).and_then(Option::as_ref)
    }

    /// As JSON, each phase labelled with its load.
    pub(crate) fn to_json(&self, phases: &[Phase]) -> Value {
        let total_ios: u64 = self.phases.iter().flatten().map(|p| p.ios).sum();
        json!({
            "ok": self.error.is_none(),
            "error": self.error,
            "boot_complete_ms": self.boot_complete_ms,
            "process_cpu": self.process_cpu.map(CpuMs::to_json),
            "process_cpu_us_per_io": self.process_cpu.filter(|_| total_ios > 0)
                .map(|c| c.total() * 1000.0 / total_ios as f64),
            "phases": phases.iter().enumerate().map(|(i, p)| {
                let mut v = self.phase(i).map_or(json!({}), PhaseResult::to_json);
                v["mode"] = json!(p.mode);
                v["bs"] = json!(p.bs);
                v["qd"] = json!(p.qd);
                v
            }).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_labels() {
        assert_eq!(Phase::new("seqread", 1 << 20, 4).label(), "seqread 1M QD4");
        assert_eq!(Phase::new("randread", 4096, 32).label(), "randread 4k QD32");
        assert_eq!(Phase::new("seqwrite", 1 << 20, 4).fio_rw(), "write");
        assert_eq!(Phase::new("randwrite", 4096, 4).fio_rw(), "randwrite");
        assert!(Phase::new("seqwrite", 1 << 20, 4).is_write());
        assert!(!Phase::new("randread", 4096, 4).is_write());
    }
}
