//! virtio-blk end to end: real guest kernels drive the drives through the in-kernel probe's block
//! actions, and the host checks what reached the image files.
//!
//! One boot per I/O engine serves every check (boots are expensive on kvm_pvm hosts): a read-only
//! ext4 root drive, a writable data drive, a read-only scratch drive and (through the page cache) a
//! copy-on-write drive over a base image.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::{
    crc32, probe_cmdline, probe_fields, require_kvm, vmm_binary, GuestBuilder, GuestImages, ProbePattern,
    TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A file of `len` deterministic, non-zero bytes (so every block is allocated) in `dir`.
fn image(dir: &TempDir, name: &str, len: usize) -> PathBuf {
    let path = dir.path().join(name);
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
    let mut f = File::create(&path).expect("create image");
    f.write_all(&data).expect("write image");
    f.sync_all().expect("sync image");
    path
}

fn read_range(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).expect("read image")[offset..offset + len].to_vec()
}

/// A copy-on-write drive: a 1 MiB base and its 2 MiB image (empty, sparse).
struct CowDrive {
    base: PathBuf,
    image: PathBuf,
}

const COW_BASE_BYTES: usize = 1 << 20;
const COW_BYTES: usize = 2 << 20;
/// Where the guest writes on the copy-on-write drive: not 4 KiB aligned, so the host copies the
/// edges of the write up from the base.
const COW_WRITE: (usize, usize) = (64 * 1024 + 512, 6 * 1024);

impl CowDrive {
    fn new(dir: &TempDir) -> CowDrive {
        let base = image(dir, "base.img", COW_BASE_BYTES);
        let image = dir.path().join("cow.img");
        File::create(&image)
            .and_then(|f| f.set_len(COW_BYTES as u64))
            .expect("create image");
        CowDrive { base, image }
    }

    /// The drive as the guest should see it after its write with seed 5.
    fn expected(&self) -> Vec<u8> {
        let mut disk = std::fs::read(&self.base).expect("read base");
        disk.resize(COW_BYTES, 0);
        let (offset, len) = COW_WRITE;
        disk[offset..offset + len].copy_from_slice(&ProbePattern::bytes(5, len));
        disk
    }

    fn actions() -> Vec<String> {
        let (offset, len) = COW_WRITE;
        vec![
            "blk-read:vdd:4k:60k".into(),
            "blk-discard:vdd:0:4k".into(),
            format!("blk-write:vdd:{offset}:{len}:5"),
            "blk-read:vdd:0:2m".into(),
        ]
    }

    /// The guest read its base, could not deallocate, and read its write back over the base; the
    /// base file is unchanged and the image holds little more than the write.
    fn check(&self, stdout: &str, base_before: &[u8]) {
        let info = probe_fields(stdout, "blk dev=vdd");
        assert_eq!(
            (
                info["size-bytes"].as_str(),
                info["discard"].as_str(),
                info["ro"].as_str()
            ),
            (COW_BYTES.to_string().as_str(), "0", "0"),
            "{stdout}"
        );
        let base = std::fs::read(&self.base).expect("read base");
        assert!(base == base_before, "the base image changed");
        assert_eq!(
            probe_fields(stdout, "blk-read dev=vdd offset=4096")["crc32"],
            format!("{:08x}", crc32(&base[4096..64 * 1024]))
        );
        assert_ne!(probe_fields(stdout, "blk-discard dev=vdd")["result"], "0");
        assert_eq!(
            probe_fields(stdout, "blk-write dev=vdd")["result"],
            "0",
            "{stdout}"
        );
        let expected = self.expected();
        assert_eq!(
            probe_fields(stdout, "blk-read dev=vdd offset=0")["crc32"],
            format!("{:08x}", crc32(&expected)),
            "{stdout}"
        );
        let (offset, len) = COW_WRITE;
        assert!(
            read_range(&self.image, offset, len) == expected[offset..offset + len],
            "the write is not in the image"
        );
        let allocated = std::fs::metadata(&self.image).expect("stat image").blocks() * 512;
        assert!(allocated <= 64 << 10, "the image holds {allocated} bytes");
    }
}

/// Boots with three drives on `engine` and `cache` (four through the page cache), runs every block
/// action, kills the VMM with SIGKILL right after a flushed write, and checks the host files.
fn block_suite(engine: &str, cache: &str) {
    require_kvm();
    let images = GuestImages::get().expect("guest images");
    let scratch = TempDir::new(&format!("vmm-block-{engine}-{cache}")).expect("temp dir");
    let data = image(&scratch, "data.img", 4 << 20);
    let readonly = image(&scratch, "readonly.img", 1 << 20);
    let readonly_before = std::fs::read(&readonly).expect("read image");
    let data_blocks_before = std::fs::metadata(&data).expect("stat image").blocks();
    // Copy-on-write drives work through the page cache only.
    let cow = (cache == "writeback").then(|| CowDrive::new(&scratch));
    let cow_base_before = cow.as_ref().map(|c| std::fs::read(&c.base).expect("read base"));

    // vda: the root file system (read-only, shared with other tests), vdb: data, vdc: read-only,
    // vdd: copy-on-write.
    let mut actions: Vec<String> = [
        "blk-info",
        "blk-root:/sbin/init",
        "blk-write:vdc:0:4096:3",
        "blk-zero:vdc:0:4096",
        "blk-discard:vdb:1m:2m",
        "blk-write:vdb:0:64k:7",
        "blk-read:vdb:0:64k",
    ]
    .map(String::from)
    .to_vec();
    if cow.is_some() {
        actions.extend(CowDrive::actions());
    }
    actions.push("idle".into());
    let actions = actions.join(",");
    let mut builder = GuestBuilder::new(&images.vmlinux)
        .memory_mib(256)
        .cmdline(&probe_cmdline(&actions))
        .arg("--drive")
        .arg(format!(
            "path={},id=data,serial=DATA-{engine},engine={engine},cache={cache}",
            data.display()
        ))
        .arg("--drive")
        .arg(format!(
            "path={},id=scratch,ro=on,engine={engine},cache={cache}",
            readonly.display()
        ))
        .arg("--drive")
        .arg(format!(
            "path={},id=root,root=on,ro=on,engine={engine}",
            images.rootfs.display()
        ));
    if let Some(cow) = &cow {
        builder = builder.arg("--drive").arg(format!(
            "path={},backing={},id=cow,engine={engine}",
            cow.image.display(),
            cow.base.display()
        ));
    }
    let mut guest = builder.spawn().expect("spawn vmm");
    if let Err(e) = guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT) {
        panic!("block actions did not finish: {e:#}");
    }
    // The guest has flushed its write: a VMM killed now must not lose it.
    guest.kill().expect("kill vmm");
    let stdout = guest.stdout_text();

    // Drive order, serials, sizes, read-only flags.
    let vda = probe_fields(&stdout, "blk dev=vda");
    let vdb = probe_fields(&stdout, "blk dev=vdb");
    let vdc = probe_fields(&stdout, "blk dev=vdc");
    assert_eq!(vda["serial"], "root", "{stdout}");
    assert_eq!(vdb["serial"], format!("DATA-{engine}"));
    assert_eq!(vdc["serial"], "scratch");
    assert_eq!(vdb["size-bytes"], (4u64 << 20).to_string());
    assert_eq!(
        (vda["ro"].as_str(), vdb["ro"].as_str(), vdc["ro"].as_str()),
        ("1", "0", "1")
    );
    assert_eq!(vdb["discard"], "1");
    let drives = if cow.is_some() { "4" } else { "3" };
    assert_eq!(probe_fields(&stdout, "blk count=")["count"], drives);

    // The ext4 root on a read-only drive mounts and a file on it reads back intact.
    let root = probe_fields(&stdout, "blk-root");
    assert_eq!(root["result"], "0", "{stdout}");
    assert_eq!(root["ro"], "1");

    // Writes to the read-only drive fail and leave the file unchanged byte for byte.
    assert_eq!(probe_fields(&stdout, "blk-write dev=vdc")["result"], "-5");
    assert_ne!(probe_fields(&stdout, "blk-zero dev=vdc")["result"], "0");
    assert!(
        std::fs::read(&readonly).expect("read image") == readonly_before,
        "read-only image changed"
    );

    // Discard punched a hole; the flushed write survived SIGKILL; the read saw it.
    assert_eq!(probe_fields(&stdout, "blk-discard dev=vdb")["result"], "0");
    let data_blocks_after = std::fs::metadata(&data).expect("stat image").blocks();
    assert!(
        data_blocks_after < data_blocks_before,
        "discard did not free blocks: {data_blocks_before} -> {data_blocks_after}"
    );
    assert_eq!(read_range(&data, 1 << 20, 4096), vec![0u8; 4096]);
    let written = probe_fields(&stdout, "blk-write dev=vdb");
    assert_eq!(written["result"], "0");
    let expected = ProbePattern::bytes(7, 64 << 10);
    assert!(
        read_range(&data, 0, 64 << 10) == expected,
        "flushed pattern missing after SIGKILL"
    );
    assert_eq!(written["crc32"], format!("{:08x}", crc32(&expected)));
    assert_eq!(
        probe_fields(&stdout, "blk-read dev=vdb")["crc32"],
        written["crc32"]
    );
    if let (Some(cow), Some(before)) = (&cow, &cow_base_before) {
        cow.check(&stdout, before);
    }
}

#[test]
fn block_suite_io_uring() {
    block_suite("uring", "writeback");
}

#[test]
fn block_suite_sync() {
    block_suite("sync", "writeback");
}

#[test]
fn block_suite_io_uring_direct_io() {
    block_suite("uring", "none");
}

/// A writable image another process has locked is refused before anything boots.
#[test]
fn locked_image_is_refused_with_a_clear_message() {
    let images = GuestImages::get().unwrap();
    let scratch = TempDir::new("vmm-block-locked").unwrap();
    let disk = image(&scratch, "disk.img", 1 << 20);
    let holder = File::options().read(true).write(true).open(&disk).unwrap();
    holder.lock().unwrap();
    let stderr = refused_drive(&images.vmlinux, &disk);
    assert!(stderr.contains("in use by another process"), "{stderr}");

    // A size that is not whole sectors is refused as clearly.
    let odd = scratch.path().join("odd.img");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let stderr = refused_drive(&images.vmlinux, &odd);
    assert!(stderr.contains("not a positive multiple of 512"), "{stderr}");
}

/// Runs the VMM with `image` as its drive, expects a setup error (exit 1), returns its stderr.
fn refused_drive(kernel: &Path, image: &Path) -> String {
    let out = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(kernel)
        .arg("--drive")
        .arg(format!("path={}", image.display()))
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// The kernel itself mounts an ext4 root from a read-only drive (the probe stays inert, so this is
/// the normal boot path up to starting init).
#[test]
fn kernel_mounts_the_ext4_root_from_a_read_only_drive() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .memory_mib(128)
        .cmdline("console=ttyS0 pci=off panic=-1 rootfstype=ext4")
        .arg("--drive")
        .arg(format!("path={},id=root,root=on,ro=on", images.rootfs.display()))
        .spawn()
        .unwrap();
    let line = guest
        .wait_for_any_line(
            &[
                "VFS: Mounted root",
                "VFS: Cannot open root device",
                "Kernel panic",
            ],
            BOOT_TIMEOUT,
        )
        .unwrap();
    guest.kill().unwrap();
    assert!(
        line.text.contains("VFS: Mounted root (ext4 filesystem) readonly"),
        "{}\n{}",
        line.text,
        guest.stdout_text()
    );
}

/// An ops limit on a real guest's load: requests are held back (and counted) yet all complete.
#[test]
fn rate_limited_drive_throttles_and_completes_everything() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let scratch = TempDir::new("vmm-block-limited").unwrap();
    let disk = image(&scratch, "disk.img", 4 << 20);
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .memory_mib(128)
        .cmdline(&probe_cmdline("blk-load:vda:randread:4096:8:2,poweroff"))
        .arg("--drive")
        .arg(format!("path={},id=limited,iops=50", disk.display()))
        .env("VMM_LOG", "info")
        .spawn()
        .unwrap();
    let status = guest.wait_exit(BOOT_TIMEOUT).unwrap();
    let (stdout, stderr) = (guest.stdout_text(), guest.stderr_text());
    assert!(status.success(), "{stdout}\n{stderr}");
    let load = probe_fields(&stdout, "blk-load dev=vda");
    assert_eq!(
        (load["result"].as_str(), load["errors"].as_str()),
        ("0", "0"),
        "{stdout}"
    );
    let counters: HashMap<String, String> = stderr
        .lines()
        .find(|l| l.contains("drive limited:"))
        .unwrap_or_else(|| panic!("no drive counters in:\n{stderr}"))
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let throttled: u64 = counters["throttled"].parse().unwrap();
    assert!(
        throttled > 0,
        "the limiter never held a request back: {counters:?}"
    );
    let ios: u64 = load["ios"].parse().unwrap();
    let reads: u64 = counters["reads"].parse().unwrap();
    assert!(
        reads >= ios,
        "guest completed {ios} reads, the drive counted {reads}"
    );
    assert_eq!(counters["io_errors"], "0");
}
