//! Running the guest probe's `blk-load` phases under vmm or QEMU: the commands, watching the console,
//! and pairing each phase's start and result lines with the VMM's CPU times at those moments.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use benches::{bench_cmdline, ms_since, qemu_microvm, wait_boot_complete, Vmm, FAILURE_MARKERS};
use harness::{Guest, GuestBuilder, Line, LineHook, Stream};

use crate::results::{PhaseResult, RunResult};
use crate::Bench;
use benches::CpuTicks;

/// The probe's line when a phase starts.
const LOAD_START: &str = "vmmprobe: blk-load-start ";
/// The probe's line with a phase's results.
const LOAD_END: &str = "vmmprobe: blk-load ";

/// The `key=value` words of a probe line.
fn kv<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn kv_num<T: std::str::FromStr>(text: &str, key: &str) -> Result<T> {
    kv(text, key)
        .ok_or_else(|| anyhow!("no {key}= in {text:?}"))?
        .parse()
        .map_err(|_| anyhow!("bad {key}= in {text:?}"))
}

/// Parses a `vmmprobe: blk-load ...` result line into (mode, result).
fn parse_load_line(text: &str) -> Result<(String, PhaseResult)> {
    let mode = kv(text, "mode").ok_or_else(|| anyhow!("no mode= in {text:?}"))?;
    let elapsed_us: f64 = kv_num(text, "elapsed-us")?;
    Ok((
        mode.to_string(),
        PhaseResult {
            ios: kv_num(text, "ios")?,
            bytes: kv_num(text, "bytes")?,
            errors: kv_num(text, "errors")?,
            elapsed_s: elapsed_us / 1e6,
            result: kv_num(text, "result")?,
            ..PhaseResult::default()
        },
    ))
}

/// A probe line seen by the output hook, with the VMM's CPU times read the moment it arrived.
#[derive(Debug, Clone)]
struct Event {
    text: String,
    at: Instant,
    cpu: Result<CpuTicks, String>,
}

impl Bench {
    /// `vmmprobe.action=` list: every phase on vda, then power off.
    pub(crate) fn guest_cmdline(&self) -> String {
        let loads: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("blk-load:vda:{}:{}:{}:{}", p.mode, p.bs, p.qd, self.opts.seconds))
            .collect();
        bench_cmdline(&format!("{},poweroff", loads.join(",")))
    }

    fn command(&self, vmm: Vmm) -> Result<Command> {
        let cmdline = self.guest_cmdline();
        match vmm {
            Vmm::Ours => {
                let drive = format!(
                    "path={},id=bench,engine={},cache={}",
                    self.file.display(),
                    self.opts.engine,
                    self.opts.vmm_cache.as_str()
                );
                GuestBuilder::new(&self.kernel)
                    .binary(self.vmm_bin.as_deref().ok_or_else(|| anyhow!("vmm disabled"))?)
                    .cmdline(&cmdline)
                    .memory_mib(self.opts.memory_mib)
                    .arg("--drive")
                    .arg(drive)
                    .command()
            }
            Vmm::Qemu => {
                let qemu = self
                    .opts
                    .qemu
                    .as_deref()
                    .ok_or_else(|| anyhow!("QEMU disabled"))?;
                let drive = format!(
                    "id=bench,file={},format=raw,if=none,cache=none,aio=io_uring",
                    self.file.display()
                );
                let machine = "microvm,x-option-roms=off,rtc=on,isa-serial=on";
                let mut cmd = qemu_microvm(qemu, machine, self.opts.memory_mib, 1);
                // Names the vCPU thread `CPU 0/KVM`, so its CPU time can be told apart.
                cmd.args(["-name", "block-bench,debug-threads=on"])
                    .arg("-kernel")
                    .arg(&self.kernel)
                    .args(["-append", &cmdline])
                    .args(["-drive", &drive])
                    .args(["-device", "virtio-blk-device,drive=bench"]);
                Ok(cmd)
            }
        }
    }

    /// Boots once and runs every phase; failures end up in `RunResult::error`.
    pub(crate) fn run_vmm(&self, vmm: Vmm) -> RunResult {
        let mut result = RunResult::new(self.phases.len());
        if let Err(e) = self.measure_vmm(vmm, &mut result) {
            result.error = Some(format!("{e:#}"));
        }
        result
    }

    fn measure_vmm(&self, vmm: Vmm, result: &mut RunResult) -> Result<()> {
        let cmd = self.command(vmm)?;
        // Read the CPU times from the reader thread the moment a phase starts or ends.
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let sink = Arc::clone(&events);
        let hook: LineHook = Arc::new(move |pid, line: &Line| {
            let t = &line.text;
            if line.stream == Stream::Stdout && (t.contains(LOAD_START) || t.contains(LOAD_END)) {
                let cpu = CpuTicks::read(pid).map_err(|e| format!("{e:#}"));
                let mut events = sink.lock().unwrap_or_else(|p| p.into_inner());
                events.push(Event {
                    text: t.clone(),
                    at: line.at,
                    cpu,
                });
            }
        });
        let mut guest = Guest::spawn_command(cmd, Some(hook))?;
        let outcome = self.wait_guest(&mut guest, result);
        let events = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.collect_phases(&events, result);
        outcome
    }

    fn wait_guest(&self, guest: &mut Guest, result: &mut RunResult) -> Result<()> {
        let line = wait_boot_complete(guest, self.opts.boot_timeout)?;
        result.boot_complete_ms = Some(ms_since(guest.started_at(), line.at));
        // Each phase runs for its duration plus the time the last I/Os take; allow a minute extra each.
        let per_phase = Duration::from_secs(u64::from(self.opts.seconds) + 60);
        let deadline = Instant::now() + per_phase * u32::try_from(self.phases.len()).unwrap_or(u32::MAX);
        // Wait for every phase's result line (the guest powers off right after the last one).
        loop {
            let done = guest
                .lines()
                .iter()
                .filter(|l| l.stream == Stream::Stdout && l.text.contains(LOAD_END))
                .count();
            if done >= self.phases.len() {
                break;
            }
            if let Some(line) = guest.find_line(&FAILURE_MARKERS) {
                bail!(
                    "guest failed: {:?}; last output:\n{}",
                    line.text,
                    guest.output_tail()
                );
            }
            if let Some(status) = guest.try_exit_status()? {
                bail!(
                    "exited with {status} after {done} of {} phases; last output:\n{}",
                    self.phases.len(),
                    guest.output_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {done} of {} phases done in time; last output:\n{}",
                    self.phases.len(),
                    guest.output_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = guest.wait_exit(Duration::from_secs(60))?;
        if !status.success() {
            bail!("exited with {status}; last output:\n{}", guest.output_tail());
        }
        Ok(())
    }

    /// Pairs each phase's start and result lines and takes the CPU time between them.
    fn collect_phases(&self, events: &[Event], result: &mut RunResult) {
        let mut start: Option<&Event> = None;
        for event in events {
            if event.text.contains(LOAD_START) {
                start = Some(event);
            } else if let Some(pos) = event.text.find(LOAD_END) {
                // The whole process so far: boot and the phases up to here (a new process starts at 0).
                result.process_cpu = event.cpu.as_ref().ok().map(|c| c.since(&CpuTicks::default()));
                let text = &event.text[pos..];
                let (mode, mut phase) = match parse_load_line(text) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        eprintln!("  ignoring line: {e:#}");
                        continue;
                    }
                };
                if let Some(s) = start
                    .take()
                    .filter(|s| kv(&s.text, "mode") == Some(mode.as_str()))
                {
                    if let (Ok(a), Ok(b)) = (&s.cpu, &event.cpu) {
                        phase.cpu = Some(b.since(a));
                    }
                    phase.host_wall_ms = Some(ms_since(s.at, event.at));
                }
                if phase.result != 0 && result.error.is_none() {
                    result.error = Some(format!("probe reported {text:?}"));
                }
                if let Some(i) = self.phases.iter().position(|p| p.mode == mode) {
                    result.phases[i] = Some(phase);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(args: &str, vmm_bin: Option<&str>) -> Bench {
        Bench::for_tests(args, vmm_bin)
    }

    fn args_of(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn phases_and_cmdline() {
        let bench = bench("--seconds 5", None);
        assert_eq!(
            bench.guest_cmdline(),
            "console=ttyS0 quiet pci=off noxsave clearcpuid=popcnt,smap \
             vmmprobe.action=blk-load:vda:randread:4096:32:5,blk-load:vda:randwrite:4096:32:5,\
             blk-load:vda:seqread:1048576:4:5,blk-load:vda:seqwrite:1048576:4:5,poweroff"
        );
        let args = args_of(&bench.command(Vmm::Qemu).unwrap());
        assert_eq!(
            args[..16].join(" "),
            format!(
                "-M microvm,x-option-roms=off,rtc=on,isa-serial=on -enable-kvm -cpu {} -m 256 -smp 1 \
                 -nodefaults -no-user-config -nographic -serial stdio -name block-bench,debug-threads=on",
                benches::qemu_cpu()
            )
        );
        assert!(
            args.contains(&"id=bench,file=/tmp/d.img,format=raw,if=none,cache=none,aio=io_uring".to_string())
        );
        assert!(bench.command(Vmm::Ours).is_err());
    }

    #[test]
    fn vmm_drive_has_engine_and_cache() {
        let args = args_of(&bench("", Some("/vmm")).command(Vmm::Ours).unwrap());
        assert_eq!(
            args[args.len() - 2..],
            ["--drive", "path=/tmp/d.img,id=bench,engine=uring,cache=none"]
        );
        let bench = bench("--engine sync --vmm-cache writeback", Some("/vmm"));
        let args = args_of(&bench.command(Vmm::Ours).unwrap());
        assert_eq!(
            args[args.len() - 1],
            "path=/tmp/d.img,id=bench,engine=sync,cache=writeback"
        );
    }

    #[test]
    fn parses_probe_load_line() {
        let line = "vmmprobe: blk-load dev=vda mode=randread bs=4096 qd=32 seconds=3 ios=928 bytes=3801088 \
                    iops=307 mibps=1.20 errors=0 elapsed-us=3013177 result=0";
        let (mode, p) = parse_load_line(line).unwrap();
        assert_eq!(mode, "randread");
        assert_eq!((p.ios, p.bytes, p.errors, p.result), (928, 3801088, 0, 0));
        assert!((p.iops().unwrap() - 307.98).abs() < 0.01);
        assert!(parse_load_line("vmmprobe: blk-load dev=vda mode=x").is_err());
    }

    fn event(text: &str, secs: u64, user: u64) -> Event {
        Event {
            text: text.into(),
            at: Instant::now() + Duration::from_secs(secs),
            cpu: Ok(CpuTicks {
                user,
                system: 0,
                guest: 0,
                vcpu: user / 2,
            }),
        }
    }

    #[test]
    fn pairs_phase_events() {
        let bench = bench("", None);
        let events = [
            event("vmmprobe: blk-load-start dev=vda mode=seqread bs=1048576 qd=4", 0, 100),
            event(
                "vmmprobe: blk-load dev=vda mode=seqread bs=1048576 qd=4 seconds=10 ios=1000 bytes=1048576000 \
                 iops=100 mibps=100.00 errors=0 elapsed-us=10000000 result=0",
                10,
                300,
            ),
        ];
        let mut r = RunResult::new(bench.phases.len());
        bench.collect_phases(&events, &mut r);
        assert!(r.phase(0).is_none() && r.error.is_none());
        let p = r.phase(2).unwrap();
        assert_eq!(p.cpu.unwrap().total(), 2000.0);
        assert_eq!(p.cpu_us_per_io(), Some(2000.0));
        assert_eq!(p.non_vcpu_us_per_io(), Some(1000.0));
        assert_eq!(p.mibps(), Some(100.0));
        assert!((p.host_wall_ms.unwrap() - 10000.0).abs() < 1.0);
        assert_eq!(r.process_cpu.unwrap().total(), 3000.0);
    }
}
