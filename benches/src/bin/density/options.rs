//! The command line of `density`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use benches::Args;
use vmm_api::balloon::{BalloonConfig, HugePages};

pub const USAGE: &str = "\
usage: density [--mode clone|boot] [--direct] [--paused] [--count N] [--min-free-mib N] [--concurrency N]
               [--memory-mib N] [--vcpus N] [--workload W] [--window-secs S]
               [--balloon SPEC] [--memory-target-mib N] [--mergeable] [--hugepages auto|off|thp]
               [--settle-secs S] [--rpc-samples N] [--boot-timeout-secs S]
               [--source-quiet-secs S] [--out PATH]
               [--vmm PATH] [--agent PATH] [--agent-arg ARG]... [--agent-nice N]

Fills this host with VMs in waves of --concurrency until --count VMs run, MemAvailable falls
below --min-free-mib, or a VM fails to start; then, with all of them resident, measures per-VM
host memory (PSS of each vmm from /proc/PID/smaps, guest RAM split off), the idle VMs' host CPU
over --window-secs, and the agent's RPC latency (GetHost, ListVms). Everything it started is
stopped and removed at the end, also on failure and on Ctrl-C / SIGTERM.

  --mode clone      boot ONE VM, snapshot it once, fill the host with restored clones (default)
  --mode boot       every VM boots the guest kernel (costly on kvm_pvm: ~35 s of CPU each)
  --direct          start vmm processes directly instead of through a vmm-agent of its own
  --paused          clone mode: restore the clones paused (vCPUs ready, not run), which takes
                    the guests' own CPU use out of the measurement
  --count N         VMs to reach (default 150 for clone, 3 for boot)
  --min-free-mib N  stop before a wave once MemAvailable is below this (default 2048)
  --concurrency N   VMs started at once per wave (default 10 for clone, 3 for boot)
  --memory-mib N    guest memory (default 128)
  --vcpus N         guest vCPUs (default 1)
  --workload W      what the guests run: idle (the probe's `idle`, default), counter (the
                    probe's `counter`: a console line every 100 ms), memory:MIB (holds MIB
                    MiB, every page different), freed:MIB (touched MIB MiB once, then freed
                    them), dirty:MIB (rewrites MIB MiB at full speed: CPU and TLB load)
  --balloon SPEC    give every VM a virtio-balloon: amount_mib=N[,deflate_on_oom=on]
                    [,stats_interval_s=N][,free_page_reporting=on] (as vmm --balloon)
  --memory-target-mib N  once the host is full, set every VM's memory target to N MiB
                    (UpdateVm; direct: update-balloon) and wait for the balloons to get there
                    before measuring (needs --balloon amount_mib=0)
  --mergeable       offer guest RAM to KSM (MADV_MERGEABLE); the benchmark turns the host's
                    KSM on for the run (and back as it was after) and waits for two full
                    scans before measuring
  --hugepages H     auto (default), off or thp: how guest RAM asks for transparent huge pages
  --window-secs S   CPU measurement window with all VMs resident (default 10)
  --settle-secs S   wait after the last wave before measuring (default 3)
  --rpc-samples N   GetHost and ListVms calls each (direct: control-socket pings) (default 200)
  --boot-timeout-secs S  most time a guest boot may take (default 900)
  --source-quiet-secs S  clone mode: after the source is ready, wait at most this long for it
                    to use under 5% of a core (30% for counter) before the snapshot, so that the
                    clones do not inherit the rest of its boot work (default 300; 0: at once)
  --out PATH        JSON report; the Markdown summary and SVG charts go next to it, named after
                    it (PATH.md, PATH-latency.svg, PATH-memory.svg without .json)
                    (default target/bench/density.json)
  --vmm PATH        the vmm binary (default $VMM_BIN, else target/release/vmm)
  --agent PATH      the vmm-agent binary (default $VMM_AGENT_BIN, else next to the vmm binary,
                    else next to this program)
  --agent-arg ARG   one more argument for vmm-agent (repeatable), e.g. --agent-arg
                    --reserve-memory-mib=512
  --agent-nice N    once the host is full, renice every thread of the agent and of this
                    program (the RPC client) to N (e.g. -10) before the CPU window and the RPC
                    calls; the vmms keep theirs, so this shows the agent's latency without most
                    of the run-queue wait";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Boot,
    Clone,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Boot => "boot",
            Mode::Clone => "clone",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Idle,
    Counter,
    /// Holds this many MiB, every page touched with a different word (nothing for KSM to merge).
    Memory(u64),
    /// Touched this many MiB once and freed them: what free page reporting hands back.
    Freed(u64),
    /// A kernel thread rewriting this many MiB at full speed: CPU and memory, TLB-heavy.
    Dirty(u64),
}

impl Workload {
    fn parse(text: &str) -> Result<Workload> {
        let sized = |prefix: &str| -> Result<Option<u64>> {
            let Some(n) = text.strip_prefix(prefix) else {
                return Ok(None);
            };
            match n.parse::<u64>() {
                Ok(mib) if mib > 0 => Ok(Some(mib)),
                _ => bail!("--workload {text}: the size is a number of MiB, at least 1"),
            }
        };
        Ok(match text {
            "idle" => Workload::Idle,
            "counter" => Workload::Counter,
            _ => {
                if let Some(m) = sized("memory:")? {
                    Workload::Memory(m)
                } else if let Some(m) = sized("freed:")? {
                    Workload::Freed(m)
                } else if let Some(m) = sized("dirty:")? {
                    Workload::Dirty(m)
                } else {
                    bail!("--workload: '{text}' is not idle, counter, memory:MIB, freed:MIB or dirty:MIB\n{USAGE}")
                }
            }
        })
    }

    pub fn name(self) -> String {
        match self {
            Workload::Idle => "idle".into(),
            Workload::Counter => "counter".into(),
            Workload::Memory(m) => format!("memory:{m}"),
            Workload::Freed(m) => format!("freed:{m}"),
            Workload::Dirty(m) => format!("dirty:{m}"),
        }
    }

    /// The probe's actions; `counter` is made to run for ~13 years.
    pub fn probe_args(self) -> String {
        match self {
            Workload::Idle => "vmmprobe.action=idle".into(),
            Workload::Counter => "vmmprobe.count=4000000000 vmmprobe.action=counter".into(),
            Workload::Memory(m) => format!("vmmprobe.action=mem-alloc:{m}m,idle"),
            Workload::Freed(m) => format!("vmmprobe.action=mem-alloc:{m}m,mem-free,idle"),
            Workload::Dirty(m) => format!("vmmprobe.action=mem-dirty:{m}m,idle"),
        }
    }

    /// A console line that says the guest has booted and runs the workload.
    pub fn ready_marker(self) -> &'static str {
        match self {
            Workload::Counter => "vmmprobe: counter=1",
            _ => "vmmprobe: idle",
        }
    }

    /// Below this share of one core the source VM counts as settled: `counter` keeps the
    /// emulated serial port busy (~15% of a core on kvm_pvm), so it never gets near idle, and
    /// `dirty` keeps its vCPU busy.
    pub fn quiet_percent(self) -> f64 {
        match self {
            Workload::Counter => 30.0,
            Workload::Dirty(_) => 101.0,
            _ => 5.0,
        }
    }

    pub fn cmdline(self) -> String {
        format!("console=ttyS0 quiet pci=off {}", self.probe_args())
    }
}

/// The memory levers the VMs are created with (issue 9), and what is done with them once the
/// host is full.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Levers {
    pub balloon: Option<BalloonConfig>,
    pub mergeable: bool,
    pub hugepages: HugePages,
    /// Once full: every VM's memory target (the balloon takes the rest), reached before measuring.
    pub memory_target_mib: Option<u64>,
}

impl Levers {
    /// `balloon=...,mergeable,hugepages=...,target=...` for the report.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(b) = &self.balloon {
            let mut flags = vec![format!("{} MiB", b.amount_mib)];
            if b.free_page_reporting {
                flags.push("free page reporting".into());
            }
            if b.deflate_on_oom {
                flags.push("deflate on OOM".into());
            }
            if b.stats_interval_s > 0 {
                flags.push(format!("stats every {} s", b.stats_interval_s));
            }
            parts.push(format!("balloon ({})", flags.join(", ")));
        }
        if let Some(t) = self.memory_target_mib {
            parts.push(format!("memory target {t} MiB"));
        }
        if self.mergeable {
            parts.push("KSM".into());
        }
        match self.hugepages {
            HugePages::Auto => {}
            HugePages::Off => parts.push("huge pages off".into()),
            HugePages::Thp => parts.push("THP".into()),
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub direct: bool,
    pub count: usize,
    pub min_free_mib: u64,
    pub concurrency: usize,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub workload: Workload,
    pub window: Duration,
    pub settle: Duration,
    pub rpc_samples: usize,
    pub boot_timeout: Duration,
    pub source_quiet: Duration,
    pub paused: bool,
    pub out: PathBuf,
    pub vmm: Option<PathBuf>,
    pub agent: Option<PathBuf>,
    pub agent_args: Vec<String>,
    pub agent_nice: Option<i32>,
    pub levers: Levers,
}

impl Options {
    pub fn parse<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Result<Options> {
        let mut mode = Mode::Clone;
        let mut count = None;
        let mut concurrency = None;
        let mut o = Options {
            mode,
            direct: false,
            count: 0,
            min_free_mib: 2048,
            concurrency: 0,
            memory_mib: 128,
            vcpus: 1,
            workload: Workload::Idle,
            window: Duration::from_secs(10),
            settle: Duration::from_secs(3),
            rpc_samples: 200,
            boot_timeout: Duration::from_secs(900),
            source_quiet: Duration::from_secs(300),
            paused: false,
            out: harness::workspace_root().join("target/bench/density.json"),
            vmm: None,
            agent: None,
            agent_args: Vec::new(),
            agent_nice: None,
            levers: Levers::default(),
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--mode" => {
                    mode = match args.value(&flag)?.as_str() {
                        "clone" => Mode::Clone,
                        "boot" => Mode::Boot,
                        other => bail!("--mode: '{other}' is not clone or boot\n{USAGE}"),
                    }
                }
                "--direct" => o.direct = true,
                "--paused" => o.paused = true,
                "--count" => count = Some(args.parse(&flag)?),
                "--min-free-mib" => o.min_free_mib = args.parse(&flag)?,
                "--concurrency" => concurrency = Some(args.parse(&flag)?),
                "--memory-mib" => o.memory_mib = args.parse(&flag)?,
                "--vcpus" => o.vcpus = args.parse(&flag)?,
                "--workload" => o.workload = Workload::parse(&args.value(&flag)?)?,
                "--balloon" => {
                    let spec = args.value(&flag)?;
                    o.levers.balloon = Some(
                        BalloonConfig::from_cli(&spec)
                            .map_err(|e| anyhow::anyhow!("--balloon {spec}: {e}"))?,
                    );
                }
                "--mergeable" => o.levers.mergeable = true,
                "--hugepages" => {
                    o.levers.hugepages = match args.value(&flag)?.as_str() {
                        "auto" => HugePages::Auto,
                        "off" => HugePages::Off,
                        "thp" => HugePages::Thp,
                        other => bail!("--hugepages: '{other}' is not auto, off or thp\n{USAGE}"),
                    }
                }
                "--memory-target-mib" => o.levers.memory_target_mib = Some(args.parse(&flag)?),
                "--window-secs" => o.window = args.secs(&flag)?,
                "--settle-secs" => o.settle = args.secs(&flag)?,
                "--rpc-samples" => o.rpc_samples = args.parse(&flag)?,
                "--boot-timeout-secs" => o.boot_timeout = args.secs(&flag)?,
                "--source-quiet-secs" => o.source_quiet = args.secs(&flag)?,
                "--out" => o.out = args.path(&flag)?,
                "--vmm" => o.vmm = Some(args.path(&flag)?),
                "--agent" => o.agent = Some(args.path(&flag)?),
                "--agent-arg" => o.agent_args.push(args.value(&flag)?),
                "--agent-nice" => o.agent_nice = Some(args.parse(&flag)?),
                _ => return Err(args.unexpected(&flag)),
            }
        }
        o.mode = mode;
        o.count = count.unwrap_or(match mode {
            Mode::Clone => 150,
            Mode::Boot => 3,
        });
        o.concurrency = concurrency.unwrap_or(match mode {
            Mode::Clone => 10,
            Mode::Boot => 3,
        });
        if o.count == 0 || o.concurrency == 0 {
            bail!("--count and --concurrency must be at least 1\n{USAGE}");
        }
        if o.memory_mib == 0 || o.vcpus == 0 {
            bail!("--memory-mib and --vcpus must be at least 1\n{USAGE}");
        }
        if o.paused && mode != Mode::Clone {
            bail!("--paused is for clone mode\n{USAGE}");
        }
        if let Some(t) = o.levers.memory_target_mib {
            let Some(b) = &o.levers.balloon else {
                bail!("--memory-target-mib needs --balloon\n{USAGE}");
            };
            if t == 0 || t > u64::from(o.memory_mib) {
                bail!("--memory-target-mib must be 1 to --memory-mib\n{USAGE}");
            }
            if b.amount_mib > 0 {
                bail!("--memory-target-mib sets the balloon: give --balloon amount_mib=0\n{USAGE}");
            }
        }
        if let Some(b) = &o.levers.balloon {
            b.validate(u64::from(o.memory_mib))
                .map_err(|e| anyhow::anyhow!("--balloon: {e}"))?;
        }
        if o.window.is_zero() {
            bail!("--window-secs must be at least 1\n{USAGE}");
        }
        Ok(o)
    }

    /// `<out without .json><suffix>`: where the other outputs go.
    pub fn sibling(&self, suffix: &str) -> PathBuf {
        let stem = self
            .out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "density".into());
        self.out.with_file_name(format!("{stem}{suffix}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_depend_on_the_mode() {
        let o = Options::parse(Vec::<String>::new()).unwrap();
        assert_eq!(
            (o.mode, o.count, o.concurrency, o.direct),
            (Mode::Clone, 150, 10, false)
        );
        let o = Options::parse(["--mode", "boot", "--direct"]).unwrap();
        assert_eq!(
            (o.mode, o.count, o.concurrency, o.direct),
            (Mode::Boot, 3, 3, true)
        );
        let o = Options::parse(["--count", "5", "--mode", "boot", "--concurrency", "1"]).unwrap();
        assert_eq!((o.count, o.concurrency), (5, 1));
    }

    #[test]
    fn values_and_refusals() {
        let o = Options::parse([
            "--workload",
            "counter",
            "--window-secs",
            "2",
            "--agent-arg",
            "--x=1",
            "--out",
            "/r/d-boot.json",
        ])
        .unwrap();
        assert_eq!(o.workload, Workload::Counter);
        assert_eq!(o.window, Duration::from_secs(2));
        assert_eq!(o.agent_args, vec!["--x=1".to_string()]);
        assert_eq!(o.sibling(".md"), PathBuf::from("/r/d-boot.md"));
        assert_eq!(o.sibling("-latency.svg"), PathBuf::from("/r/d-boot-latency.svg"));
        assert!(o.workload.cmdline().contains("vmmprobe.action=counter"));
        let o = Options::parse([
            "--workload",
            "freed:64",
            "--balloon",
            "amount_mib=0,free_page_reporting=on",
            "--memory-target-mib",
            "64",
            "--mergeable",
            "--hugepages",
            "off",
        ])
        .unwrap();
        assert_eq!(o.workload, Workload::Freed(64));
        assert!(o.workload.cmdline().contains("mem-alloc:64m,mem-free,idle"));
        assert_eq!(o.levers.memory_target_mib, Some(64));
        assert!(o.levers.mergeable && o.levers.balloon.as_ref().is_some_and(|b| b.free_page_reporting));
        assert_eq!(o.levers.hugepages, HugePages::Off);
        assert!(
            o.levers.describe().contains("free page reporting"),
            "{}",
            o.levers.describe()
        );
        let o = Options::parse(["--agent-nice", "-10", "--paused"]).unwrap();
        assert_eq!((o.agent_nice, o.paused), (Some(-10), true));
        for bad in [
            vec!["--mode", "boot", "--paused"],
            vec!["--agent-nice", "x"],
            vec!["--count", "0"],
            vec!["--mode", "x"],
            vec!["--workload", "memory"],
            vec!["--workload", "memory:0"],
            vec!["--memory-target-mib", "64"],
            vec!["--balloon", "amount_mib=999"],
            vec!["--balloon", "amount_mib=0", "--memory-target-mib", "200"],
            vec!["--hugepages", "always"],
            vec!["--window-secs", "0"],
            vec!["--vcpus", "0"],
            vec!["--bogus"],
        ] {
            assert!(Options::parse(bad.clone()).is_err(), "{bad:?}");
        }
    }
}
