//! The density report: JSON (every sample), a Markdown summary with the targets, and two
//! SVG charts (latency and memory against the number of resident VMs).

use anyhow::{Context, Result};
use benches::{cell, host_json, write_json, Summary};
use serde_json::{json, Value};

use crate::options::{Mode, Options, Workload};
use crate::svg::{Chart, Series};
use crate::{host_cores, Run};

const KIB_PER_MIB: f64 = 1024.0;

/// Targets of issue 9.
const OVERHEAD_TARGET_MIB: f64 = 5.0;
const RATE_TARGET: f64 = 10.0;
const RESIDENT_TARGET: usize = 150;
const RPC_P99_TARGET_MS: f64 = 100.0;

fn summary(v: &[f64]) -> Option<Summary> {
    Summary::of(v)
}

fn summary_json(v: &[f64]) -> Value {
    summary(v).map_or(Value::Null, |s| s.to_json())
}

/// The numbers the summary and the targets use, computed once.
struct Derived {
    count: usize,
    creation_s: f64,
    rate_per_core: Option<f64>,
    running_ms: Vec<f64>,
    ready_ms: Vec<f64>,
    pss_mib: Vec<f64>,
    guest_mib: Vec<f64>,
    overhead_mib: Vec<f64>,
    agent_pss_mib: Option<f64>,
    mem_drop_per_vm_mib: Option<f64>,
    cpu_pct_of_core: Option<f64>,
    cpu_ms_per_vm_s: Option<f64>,
    rpc_p99_max: Option<f64>,
}

fn derive(run: &Run) -> Derived {
    let count = run.waves.last().map_or(0, |w| w.count_after);
    let creation_s: f64 = run.waves.iter().map(|w| w.wall_ms).sum::<f64>() / 1000.0;
    let rate_per_core =
        (creation_s > 0.0 && count > 0).then(|| count as f64 / creation_s / host_cores() as f64);
    let all: Vec<_> = run.waves.iter().flat_map(|w| w.created.iter()).collect();
    let running_ms = all.iter().map(|c| c.running_ms).collect();
    let ready_ms = all.iter().filter_map(|c| c.ready_ms).collect();
    let splits: Vec<_> = run
        .full
        .iter()
        .flat_map(|f| f.vms.iter().filter_map(|(_, s)| *s))
        .collect();
    let mib = |kib: u64| kib as f64 / KIB_PER_MIB;
    let full = run.full.as_ref();
    let agent_pss_mib = full.and_then(|f| f.agent).map(|a| mib(a.pss));
    // Signed: other work on the host may free memory meanwhile.
    let mem_drop_per_vm_mib = full.filter(|_| count > 0).map(|f| {
        (run.baseline_mem_available_kib as f64 - f.mem_available_kib as f64) / KIB_PER_MIB / count as f64
    });
    let cpu = full.map(|f| &f.cpu).filter(|c| c.secs > 0.0);
    Derived {
        count,
        creation_s,
        rate_per_core,
        running_ms,
        ready_ms,
        pss_mib: splits.iter().map(|s| mib(s.total)).collect(),
        guest_mib: splits.iter().map(|s| mib(s.guest)).collect(),
        overhead_mib: splits.iter().map(|s| mib(s.overhead())).collect(),
        agent_pss_mib,
        mem_drop_per_vm_mib,
        cpu_pct_of_core: cpu.map(|c| c.vmm_ms / (c.secs * 1000.0) * 100.0),
        cpu_ms_per_vm_s: cpu
            .filter(|c| c.vms_measured > 0)
            .map(|c| c.vmm_ms / c.secs / c.vms_measured as f64),
        rpc_p99_max: full.and_then(|f| {
            f.rpc
                .iter()
                .filter_map(|r| summary(&r.samples_ms).map(|s| s.p99))
                .reduce(f64::max)
        }),
    }
}

pub fn to_json(opts: &Options, run: &Run) -> Value {
    let d = derive(run);
    let waves: Vec<Value> = run
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let lat: Vec<f64> = w.created.iter().map(|c| c.running_ms).collect();
            json!({
                "wave": i + 1, "started": w.created.len() + w.failures.len(),
                "count_after": w.count_after, "wall_ms": w.wall_ms,
                "vms_per_s_per_core": (w.wall_ms > 0.0).then(|| w.created.len() as f64 / (w.wall_ms / 1000.0) / host_cores() as f64),
                "create_to_running_ms": summary_json(&lat),
                "create_to_ready_ms": summary_json(&w.created.iter().filter_map(|c| c.ready_ms).collect::<Vec<_>>()),
                "mem_available_kib": w.mem_available_kib, "vmm_pss_sum_kib": w.vmm_pss_kib,
                "agent_pss_kib": w.agent_pss_kib, "failures": w.failures,
                "vms": w.created.iter().map(|c| json!({"vm_id": c.vm_id, "pid": c.pid, "running_ms": c.running_ms, "ready_ms": c.ready_ms})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let full = run.full.as_ref().map(|f| {
        json!({
            "mem_available_kib": f.mem_available_kib,
            "agent": f.agent.map(|a| json!({"pss_kib": a.pss, "rss_kib": a.rss, "pss_anon_kib": a.pss_anon, "pss_file_kib": a.pss_file})),
            "vms": f.vms.iter().map(|(c, s)| json!({"vm_id": c.vm_id, "pid": c.pid, "memory": s.map(|s| s.to_json())})).collect::<Vec<_>>(),
            "cpu_window": {
                "secs": f.cpu.secs, "vms_measured": f.cpu.vms_measured, "vmm_total_ms": f.cpu.vmm_ms,
                "vmm_vcpu_threads_ms": f.cpu.vcpu_ms, "vmm_user_ms": f.cpu.user_ms,
                "agent_ms": f.cpu.agent_ms, "host_busy_ms": f.cpu.host_busy_ms, "host_total_ms": f.cpu.host_total_ms,
            },
            "alive_after_window": f.alive_after,
            "levers": {
                "balloons_reached": f.levers.balloons_reached, "balloon_held_mib": f.levers.balloon_held_mib,
                "balloon_secs": f.levers.balloon_secs,
                "dirty_mib_per_s_per_vm": summary_json(&f.levers.dirty_mib_per_s),
                "ksm": f.levers.ksm.as_ref().map(|k| json!({
                    "pages_shared": k.pages_shared, "pages_sharing": k.pages_sharing,
                    "saved_mib": k.pages_sharing as f64 * 4096.0 / 1048576.0,
                    "full_scans": k.full_scans, "wait_secs": k.wait_secs,
                })),
            },
            "rpc": f.rpc.iter().map(|r| json!({"call": r.name, "latency_ms": summary_json(&r.samples_ms), "samples_ms": r.samples_ms})).collect::<Vec<_>>(),
        })
    });
    json!({
        "benchmark": "density",
        "unix_time": run.started_unix,
        "host": host_json(),
        "config": {
            "mode": opts.mode.name(), "driver": run.driver, "paused": opts.paused, "count": opts.count,
            "concurrency": opts.concurrency, "min_free_mib": opts.min_free_mib,
            "memory_mib": opts.memory_mib, "vcpus": opts.vcpus, "workload": opts.workload.name(),
            "cmdline": opts.workload.cmdline(), "window_secs": opts.window.as_secs(),
            "settle_secs": opts.settle.as_secs(), "rpc_samples": opts.rpc_samples,
            "agent_args": opts.agent_args, "agent_nice": opts.agent_nice, "work_dir": run.work_dir,
            "levers": {
                "balloon": opts.levers.balloon, "mergeable": opts.levers.mergeable,
                "hugepages": opts.levers.hugepages, "memory_target_mib": opts.levers.memory_target_mib,
                "describe": opts.levers.describe(),
            },
        },
        "mem_total_kib": run.mem_total_kib,
        "start_mem_available_kib": run.start_mem_available_kib,
        "baseline_mem_available_kib": run.baseline_mem_available_kib,
        "source": run.prepared.as_ref().map(|p| json!({
            "ready_ms": p.source_ready_ms, "quiet_wait_ms": p.source_quiet_ms,
            "cpu_percent_before_snapshot": p.source_cpu_pct, "snapshot_ms": p.snapshot_ms,
            "snapshot_memory_bytes": p.snapshot_memory_bytes, "snapshot_size_bytes": p.snapshot_size_bytes,
        })),
        "count_reached": d.count,
        "stop": {"reason": run.stop.key(), "detail": run.stop.describe()},
        "summary": {
            "creation_s": d.creation_s,
            "vms_per_s_per_core": d.rate_per_core,
            "create_to_running_ms": summary_json(&d.running_ms),
            "create_to_ready_ms": summary_json(&d.ready_ms),
            "vmm_pss_mib": summary_json(&d.pss_mib),
            "guest_pss_mib": summary_json(&d.guest_mib),
            "vmm_overhead_pss_mib": summary_json(&d.overhead_mib),
            "agent_pss_mib": d.agent_pss_mib,
            "agent_pss_per_vm_mib": d.agent_pss_mib.filter(|_| d.count > 0).map(|a| a / d.count as f64),
            "mem_available_drop_per_vm_mib": d.mem_drop_per_vm_mib,
            "idle_cpu_percent_of_one_core": d.cpu_pct_of_core,
            "idle_cpu_ms_per_vm_per_s": d.cpu_ms_per_vm_s,
            "rpc_p99_max_ms": d.rpc_p99_max,
        },
        "waves": waves,
        "full": full,
        "cleanup": {
            "vms_stopped": run.cleanup.vms_stopped, "strays_killed": run.cleanup.strays_killed,
            "errors": run.cleanup.errors, "leftover_pids": run.leftover_pids,
            "work_dir_left": run.work_dir_left,
        },
    })
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "n/a",
    }
}

pub fn markdown(opts: &Options, run: &Run) -> String {
    let d = derive(run);
    let mut out = format!(
        "## density: {} mode{}, {}, {} x {} MiB / {} vCPU guests ({} workload)\n\n",
        opts.mode.name(),
        if opts.paused { " (clones paused)" } else { "" },
        match run.driver {
            "agent" => "through vmm-agent",
            _ => "vmm processes directly",
        },
        opts.count,
        opts.memory_mib,
        opts.vcpus,
        opts.workload.name()
    );
    out.push_str(&format!(
        "Host: {} cores, MemTotal {:.0} MiB, MemAvailable {:.0} MiB before the first wave. Waves of {}. Stopped: {}.\n\n",
        host_cores(),
        run.mem_total_kib as f64 / KIB_PER_MIB,
        run.baseline_mem_available_kib as f64 / KIB_PER_MIB,
        opts.concurrency,
        run.stop.describe()
    ));
    out.push_str(&format!("Memory levers: {}.\n\n", opts.levers.describe()));
    if let Some(f) = &run.full {
        if let Some(reached) = f.levers.balloons_reached {
            out.push_str(&format!(
                "Memory target set once full: {reached} of {} balloons reached their size in {:.1} s, holding {} MiB in all.\n\n",
                f.vms.len(),
                f.levers.balloon_secs,
                f.levers.balloon_held_mib
            ));
        }
        if let Some(k) = &f.levers.ksm {
            out.push_str(&format!(
                "KSM: {} full scans in {:.1} s before measuring; {} shared pages stand for {} mappings ({:.1} MiB saved).\n\n",
                k.full_scans,
                k.wait_secs,
                k.pages_shared,
                k.pages_sharing,
                k.pages_sharing as f64 * 4096.0 / 1048576.0
            ));
        }
    }
    if let Some(n) = opts.agent_nice.filter(|_| run.driver == "agent") {
        out.push_str(&format!(
            "The agent's and the benchmark's (the RPC client's) threads were reniced to {n} once the host was full (before the CPU window and the RPC calls); the vmms kept nice 0.\n\n"
        ));
    }
    if let Some(p) = &run.prepared {
        out.push_str(&format!(
            "Source VM: booted to its workload in {:.1} s, left {:.1} s more to settle (then {:.1}% of a core), full snapshot in {:.0} ms ({:.1} MiB of memory written, {:.1} MiB on disk).\n\n",
            p.source_ready_ms / 1000.0,
            p.source_quiet_ms / 1000.0,
            p.source_cpu_pct,
            p.snapshot_ms,
            p.snapshot_memory_bytes as f64 / 1048576.0,
            p.snapshot_size_bytes as f64 / 1048576.0
        ));
    }
    let s = |v: &[f64]| summary(v);
    let p = |v: &[f64], f: fn(&Summary) -> f64, dec: usize| cell(s(v).map(|x| f(&x)), dec);
    out.push_str("| metric | value |\n|---|---:|\n");
    let mut row = |k: &str, v: String| out.push_str(&format!("| {k} | {v} |\n"));
    row("VMs resident", format!("{} of {}", d.count, opts.count));
    row("creation time (sum of waves), s", format!("{:.2}", d.creation_s));
    row("VMs created per second per host core", cell(d.rate_per_core, 2));
    row(
        "create to running, ms p50 / p90 / p99",
        format!(
            "{} / {} / {}",
            p(&d.running_ms, |x| x.median, 1),
            p(&d.running_ms, |x| x.p90, 1),
            p(&d.running_ms, |x| x.p99, 1)
        ),
    );
    if !d.ready_ms.is_empty() {
        row(
            "create to guest workload running, ms p50 / p99",
            format!(
                "{} / {}",
                p(&d.ready_ms, |x| x.median, 0),
                p(&d.ready_ms, |x| x.p99, 0)
            ),
        );
    }
    row("PSS per vmm, MiB (median)", p(&d.pss_mib, |x| x.median, 2));
    row(
        "  of it guest RAM, MiB (median)",
        p(&d.guest_mib, |x| x.median, 2),
    );
    row(
        "  of it VMM overhead, MiB median / p90",
        format!(
            "{} / {}",
            p(&d.overhead_mib, |x| x.median, 2),
            p(&d.overhead_mib, |x| x.p90, 2)
        ),
    );
    if let Some(a) = d.agent_pss_mib {
        row(
            "agent PSS, MiB (per VM)",
            format!("{a:.1} ({:.3})", a / d.count.max(1) as f64),
        );
    }
    row(
        "MemAvailable drop per VM, MiB (host total incl. kernel)",
        cell(d.mem_drop_per_vm_mib, 2),
    );
    if let Some(f) = run.full.as_ref().filter(|f| !f.levers.dirty_mib_per_s.is_empty()) {
        row(
            "guest mem-dirty rewrite rate, MiB/s per VM p50 / p90",
            format!(
                "{} / {}",
                p(&f.levers.dirty_mib_per_s, |x| x.median, 1),
                p(&f.levers.dirty_mib_per_s, |x| x.p90, 1)
            ),
        );
    }
    if let Some(f) = &run.full {
        row(
            &format!(
                "the VMs' host CPU ({} guests) over {:.0} s, % of one core (total)",
                opts.workload.name(),
                f.cpu.secs
            ),
            cell(d.cpu_pct_of_core, 1),
        );
        row("  per VM, ms of CPU per second", cell(d.cpu_ms_per_vm_s, 2));
        row(
            "  of it in vCPU threads, %",
            cell(
                (f.cpu.vmm_ms > 0.0).then(|| f.cpu.vcpu_ms / f.cpu.vmm_ms * 100.0),
                1,
            ),
        );
        row(
            "  of it in user space (rest: host kernel, KVM), %",
            cell(
                (f.cpu.vmm_ms > 0.0).then(|| f.cpu.user_ms / f.cpu.vmm_ms * 100.0),
                1,
            ),
        );
        if let Some(a) = f.cpu.agent_ms {
            row(
                "  agent, % of one core",
                format!("{:.1}", a / (f.cpu.secs * 10.0)),
            );
        }
        row(
            "  whole host busy, % of all cores",
            cell(
                (f.cpu.host_total_ms > 0.0).then(|| f.cpu.host_busy_ms / f.cpu.host_total_ms * 100.0),
                1,
            ),
        );
        for r in &f.rpc {
            row(
                &format!("{} while full, ms p50 / p99", r.name),
                format!(
                    "{} / {}",
                    p(&r.samples_ms, |x| x.median, 2),
                    p(&r.samples_ms, |x| x.p99, 2)
                ),
            );
        }
        row(
            "VMs alive after the window",
            format!("{} of {}", f.alive_after, f.vms.len()),
        );
    }
    let clone = opts.mode == Mode::Clone;
    let overhead = s(&d.overhead_mib).map(|x| x.median);
    out.push_str("\n| issue 9 target | measured | |\n|---|---:|---|\n");
    out.push_str(&format!(
        "| VMM overhead < {OVERHEAD_TARGET_MIB} MiB per VM (median PSS minus guest RAM) | {} | {} |\n",
        cell(overhead, 2),
        verdict(overhead.map(|o| o < OVERHEAD_TARGET_MIB))
    ));
    out.push_str(&format!(
        "| >= {RATE_TARGET} VMs/s per host core (clone mode) | {} | {} |\n",
        cell(d.rate_per_core, 2),
        verdict(d.rate_per_core.filter(|_| clone).map(|r| r >= RATE_TARGET))
    ));
    out.push_str(&format!(
        "| >= {RESIDENT_TARGET} idle VMs resident | {} | {} |\n",
        d.count,
        verdict(
            (clone && !opts.paused && opts.workload == Workload::Idle).then_some(d.count >= RESIDENT_TARGET)
        )
    ));
    out.push_str(&format!(
        "| agent RPC p99 < {RPC_P99_TARGET_MS} ms while full | {} | {} |\n",
        cell(d.rpc_p99_max, 2),
        verdict(
            d.rpc_p99_max
                .filter(|_| run.driver == "agent")
                .map(|v| v < RPC_P99_TARGET_MS)
        )
    ));
    out.push_str(
        "\n| wave | VMs after | wall ms | VMs/s/core | running p50 ms | p90 | p99 | MemAvailable MiB | vmm PSS sum MiB |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, w) in run.waves.iter().enumerate() {
        let lat: Vec<f64> = w.created.iter().map(|c| c.running_ms).collect();
        let rate = w.created.len() as f64 / (w.wall_ms / 1000.0).max(1e-9) / host_cores() as f64;
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {} | {} | {} | {:.0} | {:.1} |\n",
            i + 1,
            w.count_after,
            w.wall_ms,
            rate,
            p(&lat, |x| x.median, 1),
            p(&lat, |x| x.p90, 1),
            p(&lat, |x| x.p99, 1),
            w.mem_available_kib as f64 / KIB_PER_MIB,
            w.vmm_pss_kib as f64 / KIB_PER_MIB
        ));
    }
    out.push_str(&format!(
        "\nCleanup: {} VMs stopped, {} stray processes killed, {} errors; afterwards {} processes and {} of the work dir left.\n",
        run.cleanup.vms_stopped,
        run.cleanup.strays_killed,
        run.cleanup.errors.len(),
        run.leftover_pids.len(),
        if run.work_dir_left { "some" } else { "nothing" }
    ));
    out
}

pub fn charts(run: &Run) -> (String, String) {
    let mut p50 = Vec::new();
    let mut p90 = Vec::new();
    let mut p99 = Vec::new();
    for w in &run.waves {
        let lat: Vec<f64> = w.created.iter().map(|c| c.running_ms).collect();
        if let Some(s) = summary(&lat) {
            let x = w.count_after as f64;
            p50.push((x, s.median));
            p90.push((x, s.p90));
            p99.push((x, s.p99));
        }
    }
    let latency = Chart {
        title: "create to running, per wave".into(),
        x_label: "VMs resident after the wave".into(),
        y_label: "ms".into(),
        series: vec![
            Series {
                name: "p50".into(),
                points: p50,
            },
            Series {
                name: "p90".into(),
                points: p90,
            },
            Series {
                name: "p99".into(),
                points: p99,
            },
        ],
    };
    let base = run.baseline_mem_available_kib as f64;
    let mib = |kib: f64| kib / KIB_PER_MIB;
    let mut points = vec![(0.0, 0.0)];
    points.extend(
        run.waves
            .iter()
            .map(|w| (w.count_after as f64, mib(base - w.mem_available_kib as f64))),
    );
    let mut pss = vec![(0.0, 0.0)];
    pss.extend(run.waves.iter().map(|w| {
        let agent = w.agent_pss_kib.unwrap_or(0);
        (w.count_after as f64, mib((w.vmm_pss_kib + agent) as f64))
    }));
    let memory = Chart {
        title: "host memory used by the VMs".into(),
        x_label: "VMs resident".into(),
        y_label: "MiB".into(),
        series: vec![
            Series {
                name: "MemAvailable drop".into(),
                points,
            },
            Series {
                name: "PSS vmms + agent".into(),
                points: pss,
            },
        ],
    };
    (latency.render(), memory.render())
}

/// Writes the JSON, the Markdown and the charts; returns the Markdown.
pub fn write_all(opts: &Options, run: &Run) -> Result<String> {
    write_json(&opts.out, &to_json(opts, run))?;
    let md = markdown(opts, run);
    let (latency, memory) = charts(run);
    for (suffix, text) in [(".md", &md), ("-latency.svg", &latency), ("-memory.svg", &memory)] {
        let path = opts.sibling(suffix);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(md)
}
