//! Control-plane latency: round trips of `describe`, `pause` and `resume` on a booted guest's
//! control socket, against QEMU microvm's QMP (`query-status`, `stop`, `cont`) side by side, and the
//! VMM's memory overhead while it idles, for each vmm variant (e.g. with and without seccomp).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use benches::{
    bench_cmdline, cell, host_json, qemu_microvm, ratio, sample_memory, unix_time, wait_boot_complete,
    write_json, Args, Qmp, Summary, Vmm,
};
use harness::{try_vmm_binary, ControlClient, Guest, GuestBuilder, GuestImages, TempDir};
use serde_json::{json, Value};
use vmm_api::control::{Outcome, ResponseLine};

const USAGE: &str = "\
usage: control [--calls N] [--memory-mib N] [--out PATH] [--no-qemu] [--qemu PATH]
               [--variant NAME=ARG[,ARG...]]...

Boots one idle guest per VMM (and per vmm variant), then times N round trips each of describe,
pause and resume on the vmm control socket, and of query-status, stop and cont on QEMU microvm's
QMP socket. Reports medians and p99 in microseconds, the ratio vmm/QEMU, and each VMM's memory
overhead (RSS minus guest RAM). Variants add arguments to vmm, e.g. --variant seccomp-off=--seccomp,off.

  --calls N         round trips per operation (default 1000)
  --memory-mib N    guest memory (default 128)
  --out PATH        JSON report (default target/bench/control.json)
  --qemu PATH       QEMU binary (default qemu-system-x86_64); --no-qemu skips it
  --variant V       a vmm variant NAME=ARGS (comma-separated extra vmm arguments); repeatable.
                    Without any, one variant \"vmm\" with no extra arguments";

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

struct Options {
    calls: usize,
    memory_mib: u32,
    out: PathBuf,
    qemu: Option<String>,
    variants: Vec<(String, Vec<String>)>,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options> {
        let mut opts = Options {
            calls: 1000,
            memory_mib: 128,
            out: PathBuf::from("target/bench/control.json"),
            qemu: Some("qemu-system-x86_64".into()),
            variants: Vec::new(),
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--calls" => opts.calls = args.parse(&flag)?,
                "--memory-mib" => opts.memory_mib = args.parse(&flag)?,
                "--out" => opts.out = PathBuf::from(args.value(&flag)?),
                "--qemu" => opts.qemu = Some(args.value(&flag)?),
                "--no-qemu" => opts.qemu = None,
                "--variant" => {
                    let spec = args.value(&flag)?;
                    let (name, rest) = spec.split_once('=').unwrap_or((spec.as_str(), ""));
                    let extra = rest
                        .split(',')
                        .filter(|a| !a.is_empty())
                        .map(String::from)
                        .collect();
                    opts.variants.push((name.to_string(), extra));
                }
                _ => return Err(args.unexpected(&flag)),
            }
        }
        if opts.calls == 0 {
            bail!("--calls must be at least 1\n{USAGE}");
        }
        if opts.variants.is_empty() {
            opts.variants.push(("vmm".into(), Vec::new()));
        }
        Ok(opts)
    }
}

/// The three operations every VMM is timed on, in table order.
const OPERATIONS: [&str; 3] = ["describe", "pause", "resume"];

/// What one VMM measured.
struct Measured {
    name: String,
    /// Microseconds per round trip, per operation in [`OPERATIONS`] order.
    latencies_us: [Vec<f64>; 3],
    overhead_kib: Option<u64>,
}

/// Something that answers the three operations, one round trip each.
trait ControlPeer {
    fn round_trip(&mut self, operation: usize) -> Result<()>;
}

struct VmmPeer(ControlClient);

impl ControlPeer for VmmPeer {
    fn round_trip(&mut self, operation: usize) -> Result<()> {
        let line = format!(r#"{{"id": 1, "request": "{}"}}"#, OPERATIONS[operation]);
        let answer: ResponseLine = self.0.call(&line)?;
        match answer.result {
            Outcome::Ok(_) => Ok(()),
            Outcome::Error(e) => Err(anyhow!("{}: {}", OPERATIONS[operation], e.message)),
        }
    }
}

impl ControlPeer for Qmp {
    fn round_trip(&mut self, operation: usize) -> Result<()> {
        self.execute(["query-status", "stop", "cont"][operation])
            .map(|_| ())
    }
}

/// `calls` round trips of each operation; pause and resume alternate so each finds work to do.
fn time_operations(peer: &mut dyn ControlPeer, calls: usize) -> Result<[Vec<f64>; 3]> {
    let mut out: [Vec<f64>; 3] = Default::default();
    let timed = |peer: &mut dyn ControlPeer, op: usize, out: &mut [Vec<f64>; 3]| -> Result<()> {
        let start = Instant::now();
        peer.round_trip(op)?;
        out[op].push(start.elapsed().as_secs_f64() * 1e6);
        Ok(())
    };
    for _ in 0..calls {
        timed(peer, 0, &mut out)?;
    }
    for _ in 0..calls {
        timed(peer, 1, &mut out)?;
        timed(peer, 2, &mut out)?;
    }
    Ok(out)
}

fn overhead_kib(vmm: Vmm, pid: u32, memory_mib: u32) -> Option<u64> {
    sample_memory(vmm, memory_mib, pid)
        .ok()
        .map(|(b, _)| b.overhead_kib())
}

fn measure_vmm(opts: &Options, kernel: &Path, name: &str, extra: &[String]) -> Result<Measured> {
    let dir = TempDir::new("bench-control")?;
    let sock = dir.path().join("api.sock");
    let mut builder = GuestBuilder::new(kernel)
        .binary(&try_vmm_binary()?)
        .cmdline(&bench_cmdline("idle"))
        .memory_mib(opts.memory_mib)
        .arg("--api-sock")
        .arg(&sock);
    for arg in extra {
        builder = builder.arg(arg);
    }
    let mut guest = builder.spawn()?;
    let result = (|| {
        wait_boot_complete(&guest, BOOT_TIMEOUT)?;
        guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT)?;
        let mut peer = VmmPeer(ControlClient::connect(&sock)?);
        let latencies_us = time_operations(&mut peer, opts.calls)?;
        Ok(Measured {
            name: name.to_string(),
            latencies_us,
            overhead_kib: overhead_kib(Vmm::Ours, guest.pid(), opts.memory_mib),
        })
    })();
    let _ = guest.kill();
    result
}

fn measure_qemu(opts: &Options, qemu: &str, kernel: &Path) -> Result<Measured> {
    let dir = TempDir::new("bench-control-qemu")?;
    let sock = dir.path().join("qmp.sock");
    let mut cmd: Command = qemu_microvm(qemu, "microvm", opts.memory_mib, 1);
    cmd.arg("-kernel")
        .arg(kernel)
        .args(["-append", &bench_cmdline("idle")])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    let mut guest = Guest::spawn_command(cmd, None)?;
    let result = (|| {
        wait_boot_complete(&guest, BOOT_TIMEOUT)?;
        guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT)?;
        let mut peer = Qmp::connect(&sock)?;
        let latencies_us = time_operations(&mut peer, opts.calls)?;
        Ok(Measured {
            name: "qemu".into(),
            latencies_us,
            overhead_kib: overhead_kib(Vmm::Qemu, guest.pid(), opts.memory_mib),
        })
    })();
    let _ = guest.kill();
    result
}

fn markdown(results: &[Measured]) -> String {
    let qemu = results.iter().find(|m| m.name == "qemu");
    let mut t = String::from(
        "| VMM | operation | median µs | p99 µs | median / QEMU's |\n|---|---|---:|---:|---:|\n",
    );
    for m in results {
        for (i, op) in OPERATIONS.iter().enumerate() {
            let s = Summary::of(&m.latencies_us[i]);
            let peer = qemu.and_then(|q| Summary::of(&q.latencies_us[i]));
            let r = ratio(s.map(|s| s.median), peer.map(|s| s.median));
            t.push_str(&format!(
                "| {} | {op} | {} | {} | {} |\n",
                m.name,
                cell(s.map(|s| s.median), 1),
                cell(s.map(|s| s.p99), 1),
                cell(r, 2)
            ));
        }
    }
    t.push_str("\n| VMM | memory overhead (RSS minus guest RAM), KiB |\n|---|---:|\n");
    for m in results {
        t.push_str(&format!(
            "| {} | {} |\n",
            m.name,
            m.overhead_kib.map_or("-".into(), |k| k.to_string())
        ));
    }
    t
}

fn report(opts: &Options, results: &[Measured]) -> Value {
    let vmms: Vec<Value> = results
        .iter()
        .map(|m| {
            let ops: serde_json::Map<String, Value> = OPERATIONS
                .iter()
                .enumerate()
                .map(|(i, op)| {
                    let s = Summary::of(&m.latencies_us[i]).map(|s| s.to_json());
                    (op.to_string(), s.unwrap_or(Value::Null))
                })
                .collect();
            json!({"name": m.name, "latency_us": ops, "overhead_kib": m.overhead_kib})
        })
        .collect();
    json!({
        "bench": "control",
        "time": unix_time(),
        "host": host_json(),
        "calls": opts.calls,
        "memory_mib": opts.memory_mib,
        "qemu_operations": ["query-status", "stop", "cont"],
        "vmms": vmms,
    })
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    let kernel = GuestImages::get()?.vmlinux.clone();
    let mut results = Vec::new();
    for (name, extra) in &opts.variants {
        eprintln!("booting {name} ({})", extra.join(" "));
        results.push(measure_vmm(&opts, &kernel, name, extra)?);
    }
    if let Some(qemu) = &opts.qemu {
        eprintln!("booting qemu");
        results.push(measure_qemu(&opts, qemu, &kernel)?);
    }
    println!("{}", markdown(&results));
    write_json(&opts.out, &report(&opts, &results))?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_variants() {
        let o =
            Options::parse(["--calls", "5", "--variant", "off=--seccomp,off", "--no-qemu"].map(String::from))
                .unwrap();
        assert_eq!(o.calls, 5);
        assert_eq!(
            o.variants,
            vec![(
                "off".to_string(),
                vec!["--seccomp".to_string(), "off".to_string()]
            )]
        );
        assert!(o.qemu.is_none());
        let o = Options::parse(Vec::<String>::new()).unwrap();
        assert_eq!(o.variants, vec![("vmm".to_string(), Vec::<String>::new())]);
        assert!(Options::parse(["--calls", "0"].map(String::from)).is_err());
    }
}
