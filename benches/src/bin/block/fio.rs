//! The host side of the comparison: fio running the same phases against the same file, what the host's
//! disk can do without a guest in between.

use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::results::{Phase, PhaseResult, RunResult};
use crate::Bench;
use benches::CpuMs;

impl Bench {
    /// Runs every phase with fio on the host against the same file; stops at the first failure.
    pub(crate) fn run_fio(&self) -> RunResult {
        let mut result = RunResult::new(self.phases.len());
        for (i, phase) in self.phases.iter().enumerate() {
            match self.fio_phase(phase) {
                Ok(p) => result.phases[i] = Some(p),
                Err(e) => {
                    result.error = Some(format!("{}: {e:#}", phase.label()));
                    break;
                }
            }
        }
        result
    }

    fn fio_phase(&self, phase: &Phase) -> Result<PhaseResult> {
        let fio = self.opts.fio.as_deref().ok_or_else(|| anyhow!("fio disabled"))?;
        let output = Command::new(fio)
            .arg("--name=block")
            .arg(format!("--filename={}", self.file.display()))
            .arg(format!("--rw={}", phase.fio_rw()))
            .arg(format!("--bs={}", phase.bs))
            .arg(format!("--iodepth={}", phase.qd))
            .args([
                "--ioengine=io_uring",
                "--direct=1",
                "--numjobs=1",
                "--time_based=1",
            ])
            .arg(format!("--runtime={}", self.opts.seconds))
            .arg(format!("--size={}", self.opts.file_mib << 20))
            .arg("--output-format=json")
            .output()
            .with_context(|| format!("cannot run {fio} (apt-get install fio, or pass --no-fio)"))?;
        if !output.status.success() {
            bail!(
                "fio exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        // fio may print notes before the JSON document.
        let json_text = &text[text.find('{').ok_or_else(|| anyhow!("no JSON in fio output"))?..];
        let report: Value = serde_json::from_str(json_text).context("parsing fio JSON")?;
        parse_fio(&report, phase.is_write())
    }
}

/// Extracts a phase result from fio's JSON report (first job).
fn parse_fio(report: &Value, write: bool) -> Result<PhaseResult> {
    let job = &report["jobs"][0];
    let side = &job[if write { "write" } else { "read" }];
    let num = |v: &Value, what: &str| v.as_f64().ok_or_else(|| anyhow!("fio JSON has no {what}"));
    let runtime_ms = num(&side["runtime"], "runtime")?;
    let job_runtime_ms = num(&job["job_runtime"], "job_runtime")?;
    // usr_cpu and sys_cpu are percentages of one CPU over the job's runtime.
    let pct_ms = |pct: f64| pct / 100.0 * job_runtime_ms;
    Ok(PhaseResult {
        ios: num(&side["total_ios"], "total_ios")? as u64,
        bytes: num(&side["io_bytes"], "io_bytes")? as u64,
        errors: num(&job["error"], "error")? as u64,
        elapsed_s: runtime_ms / 1000.0,
        cpu: Some(CpuMs {
            user: pct_ms(num(&job["usr_cpu"], "usr_cpu")?),
            system: pct_ms(num(&job["sys_cpu"], "sys_cpu")?),
            guest: 0.0,
            vcpu: None,
        }),
        host_wall_ms: None,
        result: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_fio_json() {
        let report = json!({"jobs": [{
            "job_runtime": 10000, "usr_cpu": 10.0, "sys_cpu": 30.0, "error": 0,
            "read": {"runtime": 10000, "total_ios": 200000, "io_bytes": 819200000u64},
            "write": {"runtime": 0, "total_ios": 0, "io_bytes": 0}
        }]});
        let p = parse_fio(&report, false).unwrap();
        assert_eq!(p.iops(), Some(20000.0));
        assert_eq!(p.cpu.unwrap().total(), 4000.0);
        assert_eq!(p.cpu_us_per_io(), Some(20.0));
        assert!(parse_fio(&json!({}), true).is_err());
    }
}
