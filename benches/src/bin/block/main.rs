//! Block I/O benchmark: the in-kernel guest probe's load generator (`blk-load`) against a virtio-blk disk
//! backed by a file on the host, under `vmm` and under QEMU microvm, next to `fio` on the host against the
//! same file. Reports IOPS, MiB/s and host CPU time per I/O.
//!
//! `cargo run --release -p benches --bin block` (see benches/README.md).

mod backing_file;
mod fio;
mod guests;
mod options;
mod report;
mod results;

use std::path::PathBuf;

use anyhow::{bail, Result};
use benches::{write_json, Vmm};
use harness::{try_vmm_binary, GuestImages, TempDir};

use backing_file::{create_backing_file, drop_page_cache};
use options::Options;
use report::{describe, markdown, report_json};
use results::Phase;

/// One benchmark session: what to run, on which file, with which binaries. The sides are run by
/// `guests` (vmm, QEMU) and `fio` (host).
struct Bench {
    opts: Options,
    phases: Vec<Phase>,
    kernel: PathBuf,
    vmm_bin: Option<PathBuf>,
    file: PathBuf,
}

#[cfg(test)]
impl Bench {
    /// A session with options `args`, kernel `/k` and file `/tmp/d.img`, for unit tests.
    fn for_tests(args: &str, vmm_bin: Option<&str>) -> Bench {
        let opts = Options::parse(args.split_whitespace()).unwrap();
        Bench {
            phases: opts.phases(),
            opts,
            kernel: "/k".into(),
            vmm_bin: vmm_bin.map(Into::into),
            file: "/tmp/d.img".into(),
        }
    }
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{}", options::USAGE);
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None if opts.vmm || opts.qemu.is_some() => GuestImages::get()?.vmlinux.clone(),
        None => PathBuf::new(),
    };
    let vmm_bin = if opts.vmm { Some(try_vmm_binary()?) } else { None };
    // The path goes into comma-separated `--drive` / `-drive` option lists.
    if opts.dir.to_string_lossy().contains(',') {
        bail!("--dir must not contain ','");
    }
    let dir = TempDir::new_in(&opts.dir, "vmm-bench-block")?;
    let file = dir.path().join("disk.img");
    eprintln!("writing {} MiB to {}", opts.file_mib, file.display());
    create_backing_file(&file, opts.file_mib)?;
    let bench = Bench {
        phases: opts.phases(),
        opts: opts.clone(),
        kernel,
        vmm_bin,
        file,
    };
    eprintln!("guest cmdline: {}", bench.guest_cmdline());

    let (mut ours, mut qemu, mut fio) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..opts.runs {
        if opts.vmm {
            drop_page_cache(&bench.file);
            let r = bench.run_vmm(Vmm::Ours);
            eprintln!("{}", describe(Vmm::Ours.name(), run, &bench.phases, &r));
            ours.push(r);
        }
        if opts.qemu.is_some() {
            drop_page_cache(&bench.file);
            let r = bench.run_vmm(Vmm::Qemu);
            eprintln!("{}", describe(Vmm::Qemu.name(), run, &bench.phases, &r));
            qemu.push(r);
        }
        if opts.fio.is_some() {
            drop_page_cache(&bench.file);
            let r = bench.run_fio();
            eprintln!("{}", describe("fio", run, &bench.phases, &r));
            fio.push(r);
        }
    }

    println!("{}", markdown(&bench, &ours, &qemu, &fio));
    write_json(&opts.out, &report_json(&bench, &ours, &qemu, &fio))?;
    eprintln!("wrote {}", opts.out.display());
    drop(dir);
    Ok(())
}
