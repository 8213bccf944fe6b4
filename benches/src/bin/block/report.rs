//! What the benchmark reports: progress lines on stderr, Markdown tables on stdout and the JSON file.

use benches::{cell, host_json, ratio, unix_time, Summary};
use serde_json::{json, Value};

use crate::results::{Phase, PhaseResult, RunResult};
use crate::Bench;

/// A per-phase metric of a result.
type Metric = fn(&PhaseResult) -> Option<f64>;

/// The median of `metric` for phase `i` over the runs that measured it.
fn median(runs: &[RunResult], i: usize, metric: Metric) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.phase(i))
        .filter_map(metric)
        .collect();
    Summary::of(&values).map(|s| s.median)
}

/// One line per side: skipped, or how many runs worked and the first error.
fn status_line(name: &str, runs: &[RunResult]) -> String {
    if runs.is_empty() {
        return format!("{name}: skipped");
    }
    let ok = runs.iter().filter(|r| r.error.is_none()).count();
    let errors: u64 = runs
        .iter()
        .flat_map(|r| r.phases.iter().flatten())
        .map(|p| p.errors)
        .sum();
    let mut line = format!("{name}: {ok}/{} runs ok, {errors} I/O errors", runs.len());
    let boots: Vec<f64> = runs.iter().filter_map(|r| r.boot_complete_ms).collect();
    if let Some(b) = Summary::of(&boots) {
        line.push_str(&format!(", BOOT-COMPLETE after {:.0} ms (median)", b.median));
    }
    if let Some(e) = runs.iter().find_map(|r| r.error.as_deref()) {
        line.push_str(&format!("; FAILED: {}", e.lines().next().unwrap_or("")));
    }
    line
}

/// The Markdown tables (throughput, then CPU per I/O) and a status line per side.
pub(crate) fn markdown(bench: &Bench, ours: &[RunResult], qemu: &[RunResult], fio: &[RunResult]) -> String {
    let o = &bench.opts;
    let mut t = format!(
        "Block I/O: {} MiB file, {} s per phase, {} run(s), medians; guest: 1 vCPU, {} MiB, virtio-blk \
         (vmm engine={} cache={}, QEMU aio=io_uring cache=none); host: fio io_uring direct=1\n\n",
        o.file_mib,
        o.seconds,
        o.runs,
        o.memory_mib,
        o.engine,
        o.vmm_cache.as_str()
    );
    t.push_str("| phase | vmm IOPS | qemu IOPS | host IOPS | vmm MiB/s | qemu MiB/s | host MiB/s | vmm/qemu | vmm/host |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, p) in bench.phases.iter().enumerate() {
        let iops = |r| median(r, i, PhaseResult::iops);
        let mibps = |r| median(r, i, PhaseResult::mibps);
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.label(),
            cell(iops(ours), 0),
            cell(iops(qemu), 0),
            cell(iops(fio), 0),
            cell(mibps(ours), 2),
            cell(mibps(qemu), 2),
            cell(mibps(fio), 2),
            cell(ratio(iops(ours), iops(qemu)), 2),
            cell(ratio(iops(ours), iops(fio)), 4),
        ));
    }
    t.push_str(
        "\nHost CPU time per I/O, µs: whole VMM process (vCPU threads included, so the guest's own time \
         too), its threads other than the vCPUs, and the fio process:\n\n",
    );
    t.push_str("| phase | vmm | vmm non-vCPU | qemu | qemu non-vCPU | host fio | vmm/qemu | vmm/host |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, p) in bench.phases.iter().enumerate() {
        let cpu = |r| median(r, i, PhaseResult::cpu_us_per_io);
        let other = |r| median(r, i, PhaseResult::non_vcpu_us_per_io);
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.label(),
            cell(cpu(ours), 1),
            cell(other(ours), 1),
            cell(cpu(qemu), 1),
            cell(other(qemu), 1),
            cell(cpu(fio), 1),
            cell(ratio(cpu(ours), cpu(qemu)), 2),
            cell(ratio(cpu(ours), cpu(fio)), 2),
        ));
    }
    t.push('\n');
    for (name, runs) in [("vmm", ours), ("qemu", qemu), ("host fio", fio)] {
        t.push_str(&status_line(name, runs));
        t.push('\n');
    }
    t
}

/// The metrics summarised in the JSON report: key and accessor.
const JSON_METRICS: [(&str, Metric); 4] = [
    ("iops", PhaseResult::iops),
    ("mibps", PhaseResult::mibps),
    ("cpu_us_per_io", PhaseResult::cpu_us_per_io),
    ("other_threads_cpu_us_per_io", PhaseResult::non_vcpu_us_per_io),
];

/// The JSON report: configuration, every run, the medians and the ratios.
pub(crate) fn report_json(bench: &Bench, ours: &[RunResult], qemu: &[RunResult], fio: &[RunResult]) -> Value {
    let o = &bench.opts;
    let per_phase = |f: &dyn Fn(usize, Metric) -> Option<f64>| -> Value {
        bench
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut v = json!({ "mode": p.mode, "bs": p.bs, "qd": p.qd });
                for (key, metric) in JSON_METRICS {
                    v[key] = json!(f(i, metric));
                }
                v
            })
            .collect()
    };
    let side = |runs: &[RunResult]| -> Value {
        if runs.is_empty() {
            return Value::Null;
        }
        json!({
            "runs": runs.iter().map(|r| r.to_json(&bench.phases)).collect::<Vec<_>>(),
            "failed": runs.iter().filter(|r| r.error.is_some()).count(),
            "median": per_phase(&|i, m| median(runs, i, m)),
        })
    };
    let ratios = |other: &[RunResult]| per_phase(&|i, m| ratio(median(ours, i, m), median(other, i, m)));
    json!({
        "bench": "block",
        "unix_time": unix_time(),
        "host": host_json(),
        "config": {
            "runs": o.runs,
            "seconds": o.seconds,
            "file_mib": o.file_mib,
            "memory_mib": o.memory_mib,
            "engine": o.engine,
            "vmm_cache": o.vmm_cache.as_str(),
            "kernel": bench.kernel,
            "vmm_binary": bench.vmm_bin,
            "qemu": o.qemu,
            "fio": o.fio,
            "guest_cmdline": bench.guest_cmdline(),
        },
        "results": { "vmm": side(ours), "qemu": side(qemu), "fio": side(fio) },
        "ratios": { "vmm_over_qemu": ratios(qemu), "vmm_over_host": ratios(fio) },
    })
}

/// The progress line of one run of one side, one line per phase.
pub(crate) fn describe(name: &str, run: usize, phases: &[Phase], r: &RunResult) -> String {
    let mut text = format!("{name} run {run}:");
    for (i, p) in phases.iter().enumerate() {
        if let Some(ph) = r.phase(i) {
            text.push_str(&format!(
                "\n  {}: {} IOPS, {} MiB/s, {} errors, {} µs CPU/IO ({} non-vCPU)",
                p.label(),
                cell(ph.iops(), 0),
                cell(ph.mibps(), 2),
                ph.errors,
                cell(ph.cpu_us_per_io(), 1),
                cell(ph.non_vcpu_us_per_io(), 1),
            ));
        }
    }
    if let Some(e) = &r.error {
        text.push_str(&format!("\n  FAILED: {e}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use benches::CpuMs;

    /// A vmm run in which only seqread reported: 1000 I/Os of 1 MiB in 10 s, 2 s of CPU, half of it in
    /// the vCPU thread.
    fn seqread_only_run() -> RunResult {
        let mut r = RunResult::new(4);
        r.phases[2] = Some(PhaseResult {
            ios: 1000,
            bytes: 1000 << 20,
            elapsed_s: 10.0,
            cpu: Some(CpuMs {
                user: 2000.0,
                vcpu: Some(1000.0),
                ..CpuMs::default()
            }),
            host_wall_ms: Some(10000.0),
            ..PhaseResult::default()
        });
        r.boot_complete_ms = Some(1234.4);
        r
    }

    #[test]
    fn table_json_and_progress() {
        let bench = Bench::for_tests("", Some("/vmm"));
        let r = seqread_only_run();
        let table = markdown(&bench, std::slice::from_ref(&r), &[], &[]);
        assert!(
            table.starts_with("Block I/O: 1024 MiB file, 10 s per phase, 1 run(s), medians; guest: 1 vCPU, \
                               256 MiB, virtio-blk (vmm engine=uring cache=none, QEMU aio=io_uring cache=none)"),
            "{table}"
        );
        assert!(
            table.contains("| seqread 1M QD4 | 100 | - | - | 100.00 | - | - | - | - |"),
            "{table}"
        );
        assert!(
            table.contains("| seqread 1M QD4 | 2000.0 | 1000.0 | - | - | - | - | - |"),
            "{table}"
        );
        assert!(
            table.contains("vmm: 1/1 runs ok, 0 I/O errors, BOOT-COMPLETE after 1234 ms (median)\n"),
            "{table}"
        );
        assert!(table.contains("qemu: skipped\n"), "{table}");
        let j = report_json(&bench, &[r.clone(), r.clone()], &[], &[]);
        assert_eq!(
            j["results"]["vmm"]["runs"][1]["phases"][2]["cpu_us_per_io"],
            json!(2000.0)
        );
        assert_eq!(j["results"]["vmm"]["median"][2]["iops"], json!(100.0));
        assert_eq!(j["results"]["vmm"]["median"][0]["iops"], Value::Null);
        assert_eq!(j["results"]["qemu"], Value::Null);
        assert_eq!(j["ratios"]["vmm_over_qemu"][2]["iops"], Value::Null);
        assert_eq!(j["config"]["vmm_cache"], json!("none"));
        assert_eq!(j["config"]["engine"], json!("uring"));
        let bench = Bench::for_tests("--vmm-cache writeback", None);
        assert_eq!(
            report_json(&bench, &[], &[], &[])["config"]["vmm_cache"],
            json!("writeback")
        );
        let progress = describe("vmm", 0, &bench.phases, &r);
        assert_eq!(
            progress,
            "vmm run 0:\n  seqread 1M QD4: 100 IOPS, 100.00 MiB/s, 0 errors, 2000.0 µs CPU/IO (1000.0 non-vCPU)"
        );
    }
}
