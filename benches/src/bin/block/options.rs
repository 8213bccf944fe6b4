//! The block benchmark's command line, and the phases it asks for.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use benches::Args;
use harness::workspace_root;

use crate::results::Phase;

pub const USAGE: &str = "\
usage: block [--runs N] [--seconds S] [--file-mib N] [--dir DIR] [--rand-qd N] [--seq-qd N] [--memory-mib N]
             [--boot-timeout-secs S] [--engine uring|sync] [--vmm-cache none|writeback] [--out PATH]
             [--kernel PATH] [--no-vmm] [--no-qemu] [--no-fio] [--qemu PATH] [--fio PATH]

Creates a file of N MiB (default 1024) filled with data in a temporary directory under DIR (default
$TMPDIR or /tmp), then runs four phases of S seconds (default 10) each: 4 KiB randread and randwrite at
QD --rand-qd (32), 1 MiB seqread and seqwrite at QD --seq-qd (4). With vmm and QEMU the guest probe's
blk-load runs all four in one boot against the file as virtio-blk disk vda; fio runs them on the host.
vmm opens the file with --vmm-cache none (default: O_DIRECT, like QEMU's cache=none) or writeback
(through the host page cache).
With --runs N (default 1) this repeats N times (vmm, QEMU, fio, vmm, ...) and reports medians.
Prints Markdown tables; writes JSON to --out (default target/bench/block.json). The file is removed at
the end, also on errors (not when the benchmark is killed).
The vmm binary is $VMM_BIN, else target/release/vmm, else target/debug/vmm.";

/// How vmm opens the disk image: its `--drive` key `cache=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmmCache {
    /// `cache=none`: `O_DIRECT`, bypassing the host page cache, as QEMU does with the bench's
    /// `cache=none`, so that both VMMs do the same kind of host I/O.
    None,
    /// `cache=writeback`: buffered I/O through the host page cache.
    Writeback,
}

impl VmmCache {
    /// The value of vmm's `cache=` key (and of the option).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            VmmCache::None => "none",
            VmmCache::Writeback => "writeback",
        }
    }

    fn parse(value: &str) -> Result<VmmCache> {
        match value {
            "none" => Ok(VmmCache::None),
            "writeback" => Ok(VmmCache::Writeback),
            _ => bail!("--vmm-cache must be none or writeback"),
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// How often the whole sequence (vmm, QEMU, fio) repeats.
    pub(crate) runs: usize,
    /// Duration of each phase.
    pub(crate) seconds: u32,
    /// Size of the backing file.
    pub(crate) file_mib: u64,
    /// Where the temporary directory with the backing file goes.
    pub(crate) dir: PathBuf,
    /// Queue depth of the 4 KiB random phases.
    pub(crate) rand_qd: u32,
    /// Queue depth of the 1 MiB sequential phases.
    pub(crate) seq_qd: u32,
    /// Guest memory for both VMMs.
    pub(crate) memory_mib: u32,
    /// From spawning a VMM to `BOOT-COMPLETE`.
    pub(crate) boot_timeout: Duration,
    /// vmm's `--drive engine=`: `uring` or `sync`.
    pub(crate) engine: String,
    /// vmm's `--drive cache=`.
    pub(crate) vmm_cache: VmmCache,
    /// The JSON report.
    pub(crate) out: PathBuf,
    /// The guest kernel; the guest-images one when `None`.
    pub(crate) kernel: Option<PathBuf>,
    /// Whether to run vmm.
    pub(crate) vmm: bool,
    /// The QEMU binary; `None` skips QEMU.
    pub(crate) qemu: Option<String>,
    /// The fio binary; `None` skips fio.
    pub(crate) fio: Option<String>,
}

impl Options {
    /// Parses the arguments (without the program name); `--help` is an error carrying the usage.
    pub(crate) fn parse<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Result<Options> {
        let mut opts = Options {
            runs: 1,
            seconds: 10,
            file_mib: 1024,
            dir: std::env::temp_dir(),
            rand_qd: 32,
            seq_qd: 4,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(300),
            engine: "uring".to_string(),
            vmm_cache: VmmCache::None,
            out: workspace_root().join("target/bench/block.json"),
            kernel: None,
            vmm: true,
            qemu: Some("qemu-system-x86_64".to_string()),
            fio: Some("fio".to_string()),
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--runs" => opts.runs = args.parse(&flag)?,
                "--seconds" => opts.seconds = args.parse(&flag)?,
                "--file-mib" => opts.file_mib = args.parse(&flag)?,
                "--dir" => opts.dir = args.path(&flag)?,
                "--rand-qd" => opts.rand_qd = args.parse(&flag)?,
                "--seq-qd" => opts.seq_qd = args.parse(&flag)?,
                "--memory-mib" => opts.memory_mib = args.parse(&flag)?,
                "--boot-timeout-secs" => opts.boot_timeout = args.secs(&flag)?,
                "--engine" => opts.engine = args.value(&flag)?,
                "--vmm-cache" => opts.vmm_cache = VmmCache::parse(&args.value(&flag)?)?,
                "--out" => opts.out = args.path(&flag)?,
                "--kernel" => opts.kernel = Some(args.path(&flag)?),
                "--no-vmm" => opts.vmm = false,
                "--no-qemu" => opts.qemu = None,
                "--no-fio" => opts.fio = None,
                "--qemu" => opts.qemu = Some(args.value(&flag)?),
                "--fio" => opts.fio = Some(args.value(&flag)?),
                _ => return Err(args.unexpected(&flag)),
            }
        }
        if opts.runs == 0 || opts.seconds == 0 || opts.memory_mib == 0 {
            bail!("--runs, --seconds and --memory-mib must be at least 1");
        }
        // The probe's limits (QD 1..256) and the largest block size (1 MiB).
        for qd in [opts.rand_qd, opts.seq_qd] {
            if !(1..=256).contains(&qd) {
                bail!("queue depths must be 1..=256");
            }
        }
        if opts.file_mib < 1 {
            bail!("--file-mib must be at least 1");
        }
        if !matches!(opts.engine.as_str(), "uring" | "sync") {
            bail!("--engine must be uring or sync");
        }
        if !opts.vmm && opts.qemu.is_none() && opts.fio.is_none() {
            bail!("--no-vmm, --no-qemu and --no-fio leave nothing to run");
        }
        Ok(opts)
    }

    /// The four loads, in the order they run.
    pub(crate) fn phases(&self) -> Vec<Phase> {
        vec![
            Phase::new("randread", 4096, self.rand_qd),
            Phase::new("randwrite", 4096, self.rand_qd),
            Phase::new("seqread", 1 << 20, self.seq_qd),
            Phase::new("seqwrite", 1 << 20, self.seq_qd),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Options> {
        Options::parse(args.split_whitespace())
    }

    #[test]
    fn parses_options() {
        let o = parse("").unwrap();
        assert_eq!(
            (o.seconds, o.file_mib, o.rand_qd, o.seq_qd, o.memory_mib),
            (10, 1024, 32, 4, 256)
        );
        assert!(o.vmm && o.qemu.is_some() && o.fio.is_some());
        assert_eq!(o.vmm_cache, VmmCache::None);
        let o = parse("--seconds 3 --file-mib 64 --no-vmm --no-fio --seq-qd 8").unwrap();
        assert_eq!((o.seconds, o.file_mib, o.seq_qd), (3, 64, 8));
        assert!(!o.vmm && o.qemu.is_some() && o.fio.is_none());
        assert_eq!(parse("--runs 3").unwrap().runs, 3);
        assert_eq!(
            parse("--vmm-cache writeback").unwrap().vmm_cache,
            VmmCache::Writeback
        );
        assert!(parse("--vmm-cache directsync").is_err());
        assert!(parse("--vmm-cache").is_err());
        assert!(parse("--runs 0").is_err());
        assert!(parse("--rand-qd 0").is_err());
        assert!(parse("--rand-qd 300").is_err());
        assert!(parse("--engine aio").is_err());
        assert!(parse("--no-vmm --no-qemu --no-fio").is_err());
        assert!(parse("--bogus").is_err());
    }
}
