//! What the jail costs: `vmm` memory overhead and boot time, jailed (`--jail`) against plain.
//!
//! `cargo run --release -p benches --bin jail -- --runs 3` (see benches/README.md). Must run as root
//! (the jail needs it). Each run boots the guest-images vmlinux + initramfs once plain and once jailed,
//! alternating, with the probe's `idle` action; once the probe prints `vmmprobe: idle` it samples the
//! VMM's resident memory (/proc/PID/smaps, guest RAM split off as in the boot benchmark),
//! and for the jailed run also the launcher's, then ends the VM with SIGTERM.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use benches::{cell, host_json, unix_time, wants_help, write_json, Args, Summary};
use harness::{probe_cmdline, read_smaps, GuestBuilder, GuestImages, GuestMapping, RssBreakdown, TempDir};
use serde_json::{json, Value};

const USAGE: &str = "\
usage: jail [--runs N] [--memory-mib N] [--timeout-secs S] [--out PATH]

Boots the same guest plain and jailed (--jail, as root), alternating, and prints a Markdown table of
the VMM's memory overhead (RSS minus guest RAM), the launcher's RSS and the guest boot time (medians).
JSON goes to --out (default target/bench/jail.json).";

struct Options {
    runs: usize,
    memory_mib: u32,
    timeout: Duration,
    out: PathBuf,
}

impl Options {
    fn parse<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Result<Options> {
        let mut opts = Options {
            runs: 3,
            memory_mib: 128,
            timeout: Duration::from_secs(300),
            out: harness::workspace_root().join("target/bench/jail.json"),
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--runs" => opts.runs = args.parse(&flag)?,
                "--memory-mib" => opts.memory_mib = args.parse(&flag)?,
                "--timeout-secs" => opts.timeout = args.secs(&flag)?,
                "--out" => opts.out = args.path(&flag)?,
                _ => return Err(args.unexpected(&flag)),
            }
        }
        if opts.runs == 0 || opts.memory_mib == 0 {
            bail!("--runs and --memory-mib must be at least 1");
        }
        Ok(opts)
    }
}

/// One boot's numbers.
#[derive(Debug, Default, Clone)]
struct Sample {
    vmm_overhead_kib: Option<f64>,
    guest_rss_kib: Option<f64>,
    launcher_rss_kib: Option<f64>,
    guest_booted_ms: Option<f64>,
    exit_code: Option<i32>,
}

/// The jailed VMM: the launcher's only child.
fn child_of(parent: u32) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .with_context(|| format!("cannot read the children of {parent}"))?;
        if let Some(child) = children.split_whitespace().next() {
            return child.parse().context("child pid");
        }
        if Instant::now() > deadline {
            bail!("launcher {parent} has no child");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(kib)
}

fn run_once(opts: &Options, images: &GuestImages, jailed: bool, run: usize) -> Result<Sample> {
    let tmp = TempDir::new("bench-jail")?;
    let mut builder = GuestBuilder::new(&images.vmlinux)
        .initrd(&images.initramfs)
        .memory_mib(opts.memory_mib)
        .cmdline(&probe_cmdline("idle"));
    if jailed {
        let dir = tmp.path().join(format!("vm{run}"));
        builder = builder
            .arg("--jail")
            .arg(dir)
            .arg("--jail-id")
            .arg(format!("bench-{}-{run}", std::process::id()))
            .arg("--uid")
            .arg("123456")
            .arg("--gid")
            .arg("123456");
    }
    let mut guest = builder.spawn()?;
    guest.wait_for_line("vmmprobe: idle", opts.timeout)?;
    let mut sample = Sample::default();
    let vmm = if jailed {
        child_of(guest.pid())?
    } else {
        guest.pid()
    };
    // Guest RAM: the named mappings where the host kernel names them, else (as in the boot
    // benchmark) anonymous mappings at least as large as guest memory.
    let mappings = read_smaps(vmm)?;
    let guest_ram = if mappings.iter().any(|m| m.is_guest(GuestMapping::VMM)) {
        GuestMapping::VMM
    } else {
        GuestMapping::LargestAnonAtLeast(u64::from(opts.memory_mib) << 20)
    };
    let rss = RssBreakdown::of(&mappings, guest_ram);
    sample.vmm_overhead_kib = Some(rss.overhead_kib() as f64);
    sample.guest_rss_kib = Some(rss.guest_kib as f64);
    if jailed {
        sample.launcher_rss_kib = Some(rss_kib(guest.pid())?);
    }
    let booted = guest.find_line(&["vmm: guest booted in"]);
    sample.guest_booted_ms = booted.and_then(|l| {
        l.text
            .split("booted in ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    let status = Command::new("kill")
        .args(["-TERM", &guest.pid().to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -TERM failed");
    }
    sample.exit_code = guest.wait_exit(Duration::from_secs(60))?.code();
    Ok(sample)
}

/// Reads one number of a sample.
type Metric = fn(&Sample) -> Option<f64>;

fn summary(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<Summary> {
    Summary::of(&samples.iter().filter_map(f).collect::<Vec<_>>())
}

fn main() -> Result<()> {
    if wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    let images = GuestImages::get()?;
    let (mut plain, mut jailed) = (Vec::new(), Vec::new());
    for run in 0..opts.runs {
        for (is_jailed, out) in [(false, &mut plain), (true, &mut jailed)] {
            match run_once(&opts, images, is_jailed, run) {
                Ok(s) => {
                    eprintln!("run {run} jailed={is_jailed}: {s:?}");
                    out.push(s);
                }
                Err(e) => eprintln!("run {run} jailed={is_jailed}: failed: {e:#}"),
            }
        }
    }
    let metrics: [(&str, Metric); 4] = [
        ("VMM overhead (RSS - guest RAM), KiB", |s| s.vmm_overhead_kib),
        ("launcher RSS, KiB", |s| s.launcher_rss_kib),
        ("guest RAM resident, KiB", |s| s.guest_rss_kib),
        ("guest booted, ms", |s| s.guest_booted_ms),
    ];
    let mut table = format!(
        "jail: {} runs each, {} MiB guest, vmlinux + initramfs, probe idle\n\n\
         | metric (median) | plain | jailed |\n|---|---:|---:|\n",
        opts.runs, opts.memory_mib
    );
    let mut json_metrics = serde_json::Map::new();
    for (name, f) in metrics {
        let (p, j) = (summary(&plain, f), summary(&jailed, f));
        table.push_str(&format!(
            "| {name} | {} | {} |\n",
            cell(p.as_ref().map(|s| s.median), 0),
            cell(j.as_ref().map(|s| s.median), 0)
        ));
        let as_json = |s: Option<Summary>| s.map_or(Value::Null, |s| s.to_json());
        json_metrics.insert(name.into(), json!({"plain": as_json(p), "jailed": as_json(j)}));
    }
    println!("{table}");
    let codes: Vec<_> = jailed.iter().map(|s| s.exit_code).collect();
    let report = json!({
        "benchmark": "jail",
        "time": unix_time(),
        "host": host_json(),
        "runs": opts.runs,
        "memory_mib": opts.memory_mib,
        "metrics": json_metrics,
        "jailed_exit_codes_after_sigterm": codes,
    });
    write_json(&opts.out, &report)?;
    if plain.len() < opts.runs || jailed.len() < opts.runs {
        bail!("some runs failed (see above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let o = Options::parse("--runs 2 --memory-mib 256 --out /tmp/j.json".split_whitespace()).unwrap();
        assert_eq!((o.runs, o.memory_mib), (2, 256));
        assert_eq!(o.out, PathBuf::from("/tmp/j.json"));
        assert!(Options::parse("--runs 0".split_whitespace()).is_err());
        assert!(Options::parse("--bogus".split_whitespace()).is_err());
    }
}
