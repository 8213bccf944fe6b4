//! Reading a snapshot back: checks, overrides, disks, then the devices' saved state.
//!
//! Everything that can be refused is refused before KVM is touched: the state file's checksum and
//! version, the CPU it was taken on, the memory file's length, the overrides, and the disks (a
//! missing one, a target that exists). The snapshot directory itself is never written.

use std::fs::File;
use std::path::{Path, PathBuf};

use vm_memory::GuestMemoryMmap;
use vmm_api::snapshot::{RestoreOverrides, SnapshotInfo, SnapshotKind, SnapshotRestore};
use vmm_api::VmConfig;

use super::{disk, disk_file, format, host_cpu_model, memory, DevicesState, SnapshotError, SnapshotState};
use super::{MEMORY_FILE, STATE_FILE};
use crate::arch::layout;
use crate::device_manager::{Devices, MissingFd, PassedFds};
use crate::sync::lock;

/// A snapshot ready to be rebuilt: its state, the configuration with the overrides applied, and
/// guest memory mapped from its memory file.
pub struct Prepared {
    /// The VM's configuration, overrides applied.
    pub config: VmConfig,
    /// The saved state.
    pub state: SnapshotState,
    /// Guest memory, mapped copy-on-write from the snapshot (its chain's diffs copied in).
    pub mem: GuestMemoryMmap,
    /// The snapshot directory (the base of the restored VM's next diff).
    pub dir: PathBuf,
    /// Disk images this restore created (override paths), to remove if it fails.
    pub created_disks: Vec<PathBuf>,
}

pub use vmm_api::snapshot::MAX_CHAIN;

/// Guest memory as the snapshot at `dir` (whose state is `state`) saw it: the chain's full
/// snapshot mapped copy-on-write, then each diff's pages copied in, oldest first.
pub fn map_chain(dir: &Path, state: &SnapshotState) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut diffs: Vec<(PathBuf, Vec<Vec<u64>>)> = Vec::new();
    let mut at = dir.to_path_buf();
    let mut pages = state.memory_pages.clone();
    let mut parent = state.parent.clone();
    while let Some(p) = pages.take() {
        let Some(up) = parent.take() else {
            return Err(SnapshotError::Invalid(format!(
                "{}: a diff without a parent",
                at.display()
            )));
        };
        if diffs.len() == MAX_CHAIN {
            return Err(SnapshotError::Invalid(format!(
                "{}: more than {MAX_CHAIN} diffs in the chain",
                dir.display()
            )));
        }
        diffs.push((at, p));
        let older: SnapshotState = format::read_state(&up.join(STATE_FILE))?;
        if older.memory_ranges != state.memory_ranges {
            return Err(SnapshotError::Invalid(format!(
                "{}: its parent {} has another memory layout",
                dir.display(),
                up.display()
            )));
        }
        pages = older.memory_pages;
        parent = older.parent;
        at = up;
    }
    let mem = memory::map(&at.join(MEMORY_FILE), &state.memory_ranges)?;
    for (diff_dir, pages) in diffs.iter().rev() {
        memory::apply_pages(&mem, pages, &diff_dir.join(MEMORY_FILE))?;
    }
    Ok(mem)
}

/// Reads and checks the snapshot of `request`, applies its overrides and maps its memory; the
/// disks come next, with [`give_disks`] (which the builder overlaps with KVM's setup).
pub fn prepare(request: &SnapshotRestore) -> Result<Prepared, SnapshotError> {
    let dir = &request.dir;
    if !dir.is_absolute() {
        return Err(SnapshotError::Invalid(format!(
            "dir: {} is not an absolute path",
            dir.display()
        )));
    }
    let state: SnapshotState = format::read_state(&dir.join(STATE_FILE))?;
    check_compatible(&state)?;
    let mut config: VmConfig = serde_json::from_str(&state.config_json)
        .map_err(|e| SnapshotError::Invalid(format!("the snapshot's configuration: {e}")))?;
    check_layout(&state, &config)?;
    apply_overrides(&mut config, &request.overrides)?;
    let mem = map_chain(dir, &state)?;
    Ok(Prepared {
        config,
        state,
        mem,
        dir: dir.clone(),
        created_disks: Vec::new(),
    })
}

/// Gives every writable drive of `config` its own copy of the snapshot's disk (see
/// `prepare_disks`) and checks the resulting configuration. Files it creates are added to
/// `created`, and removed again if this fails.
pub fn give_disks(
    dir: &Path,
    config: &mut VmConfig,
    request: &SnapshotRestore,
    fds: &mut PassedFds,
    created: &mut Vec<PathBuf>,
) -> Result<(), SnapshotError> {
    let result = prepare_disks(dir, config, &request.overrides, fds, created).and_then(|()| {
        config
            .validate()
            .map_err(|e| SnapshotError::Invalid(format!("the restored configuration: {e}")))
    });
    if result.is_err() {
        remove_files(created);
    }
    result
}

fn remove_files(created: &mut Vec<PathBuf>) {
    for path in created.drain(..) {
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!("cannot remove {} after a failed restore: {e}", path.display());
        }
    }
}

impl Prepared {
    /// Removes the disk files this restore created (it failed after creating them).
    pub fn remove_created_disks(&mut self) {
        remove_files(&mut self.created_disks);
    }
}

fn check_compatible(state: &SnapshotState) -> Result<(), SnapshotError> {
    let here = host_cpu_model();
    if state.meta.cpu_model != here {
        return Err(SnapshotError::Incompatible(format!(
            "the snapshot was taken on a {:?} CPU, this host has {here:?}",
            state.meta.cpu_model
        )));
    }
    Ok(())
}

/// The saved memory map, vCPUs and devices must be the ones the configuration describes: the state
/// file is input, and a mismatch would hand KVM or a device something it was not built for.
fn check_layout(state: &SnapshotState, config: &VmConfig) -> Result<(), SnapshotError> {
    let expected: Vec<(u64, u64)> = layout::ram_ranges(config.machine.memory_mib << 20)
        .iter()
        .map(|r| (r.start, r.len))
        .collect();
    if state.memory_ranges != expected {
        return Err(SnapshotError::Invalid(format!(
            "the saved memory layout does not match {} MiB of guest memory",
            config.machine.memory_mib
        )));
    }
    if state.vcpus.len() != usize::from(config.machine.vcpus) {
        return Err(SnapshotError::Invalid(format!(
            "{} saved vCPUs for a VM of {}",
            state.vcpus.len(),
            config.machine.vcpus
        )));
    }
    let drive_ids = ordered_drive_ids(config);
    let saved_drives: Vec<&str> = state.devices.blocks.iter().map(|b| b.id.as_str()).collect();
    let net_ids: Vec<&str> = config.nets.iter().map(|n| n.id.as_str()).collect();
    let saved_nets: Vec<&str> = state.devices.nets.iter().map(|n| n.id.as_str()).collect();
    let balloons = (config.machine.balloon.is_some(), state.devices.balloon.is_some());
    if drive_ids != saved_drives || net_ids != saved_nets || balloons.0 != balloons.1 {
        return Err(SnapshotError::Invalid(
            "the saved devices do not match the snapshot's configuration".into(),
        ));
    }
    Ok(())
}

/// Drive ids in guest order (the root drive first), as the device manager attaches them.
fn ordered_drive_ids(config: &VmConfig) -> Vec<&str> {
    let drives = &config.drives;
    drives
        .iter()
        .filter(|d| d.root)
        .chain(drives.iter().filter(|d| !d.root))
        .map(|d| d.id.as_str())
        .collect()
}

/// Checks `overrides` against `config` and applies the NIC and serial ones (drives are the
/// caller's: copies for a restore, the shared image for a migration).
pub fn apply_overrides(config: &mut VmConfig, overrides: &RestoreOverrides) -> Result<(), SnapshotError> {
    for (i, o) in overrides.nets.iter().enumerate() {
        let net = config.nets.iter_mut().find(|n| n.id == o.id).ok_or_else(|| {
            SnapshotError::Invalid(format!(
                "overrides.nets[{i}].id: the snapshot has no NIC {:?}",
                o.id
            ))
        })?;
        match (&o.tap, &o.fd) {
            (Some(_), Some(_)) => {
                return Err(SnapshotError::Invalid(format!(
                    "overrides.nets[{i}]: give a tap or an fd, not both"
                )))
            }
            (Some(tap), None) => {
                net.tap = Some(tap.clone());
                net.fd = None;
            }
            (None, Some(fd)) => {
                net.fd = Some(fd.clone());
                net.tap = None;
            }
            (None, None) => {}
        }
    }
    for (i, o) in overrides.drives.iter().enumerate() {
        if !config.drives.iter().any(|d| d.id == o.id) {
            return Err(SnapshotError::Invalid(format!(
                "overrides.drives[{i}].id: the snapshot has no drive {:?}",
                o.id
            )));
        }
        if o.path.is_some() == o.fd.is_some() {
            return Err(SnapshotError::Invalid(format!(
                "overrides.drives[{i}]: give exactly one of path and fd"
            )));
        }
        if let Some(path) = o.path.as_ref().filter(|p| !p.is_absolute()) {
            return Err(SnapshotError::Invalid(format!(
                "overrides.drives[{i}].path: {} is not an absolute path",
                path.display()
            )));
        }
    }
    if let Some(serial) = &overrides.serial {
        config.serial = serial.clone();
    }
    Ok(())
}

/// Gives each writable drive the snapshot's disk: copied to the override's path (created) or into
/// the override's descriptor, or back to the drive's own path. Read-only drives are opened where
/// the configuration (or an override) says, and must still exist.
fn prepare_disks(
    dir: &Path,
    config: &mut VmConfig,
    overrides: &RestoreOverrides,
    fds: &mut PassedFds,
    created: &mut Vec<PathBuf>,
) -> Result<(), SnapshotError> {
    for drive in &mut config.drives {
        let o = overrides.drives.iter().find(|o| o.id == drive.id);
        if drive.read_only {
            if let Some(o) = o {
                drive.path = o.path.clone().unwrap_or_default();
                drive.fd = o.fd.clone();
            }
            if drive.fd.is_none() && !drive.path.exists() {
                return Err(SnapshotError::Io {
                    what: "read-only drive image",
                    path: drive.path.display().to_string(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            continue;
        }
        let saved = disk_file(dir, &drive.id);
        let io = |what, path: &Path| {
            let path = path.display().to_string();
            move |source| SnapshotError::Io { what, path, source }
        };
        let src = File::open(&saved).map_err(io("the snapshot's disk", &saved))?;
        // Not synced: the guest's own flushes make its disk durable, copied data included.
        let copy_into =
            |dst: &File, what, path: &Path| disk::copy_image(&src, dst, false).map_err(io(what, path));
        match o {
            Some(vmm_api::snapshot::DriveOverride { fd: Some(name), .. }) => {
                let fd = fds
                    .get(name)
                    .ok_or_else(|| SnapshotError::Invalid(MissingFd(name.clone()).to_string()))?;
                let dst = File::from(fd.try_clone().map_err(io("passed disk", Path::new(name)))?);
                copy_into(&dst, "passed disk", Path::new(name))?;
                drive.fd = Some(name.clone());
                drive.path = PathBuf::new();
            }
            Some(vmm_api::snapshot::DriveOverride { path: Some(path), .. }) => {
                let dst = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(io("restored disk", path))?;
                created.push(path.clone());
                copy_into(&dst, "restored disk", path)?;
                drive.path = path.clone();
                drive.fd = None;
            }
            _ => {
                if drive.fd.is_some() {
                    return Err(SnapshotError::Invalid(format!(
                        "drive {}: it was passed as a descriptor; give an override",
                        drive.id
                    )));
                }
                // Rolled back in place, under the image's lock, so a VM still using it is not hit.
                let path = &drive.path;
                let dst = File::options()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io("drive image", path))?;
                devices::virtio::block::disk::lock_exclusive(&dst).map_err(|_| {
                    SnapshotError::Invalid(format!(
                        "drive {}: image {} is in use by another process",
                        drive.id,
                        path.display()
                    ))
                })?;
                copy_into(&dst, "drive image", path)?;
            }
        }
    }
    Ok(())
}

/// Puts every device in its saved state (paused, queues as they were).
pub fn apply_device_states(devices: &Devices, saved: &DevicesState) -> Result<(), SnapshotError> {
    let device_err = |id: &str| {
        let id = id.to_string();
        move |source| SnapshotError::Device { id, source }
    };
    for (handle, s) in devices.blocks.iter().zip(&saved.blocks) {
        let mut transport = lock(handle);
        transport
            .device_mut()
            .restore_state(&s.device)
            .map_err(device_err(&s.id))?;
        transport.restore(&s.transport).map_err(device_err(&s.id))?;
    }
    for (handle, s) in devices.nets.iter().zip(&saved.nets) {
        let mut transport = lock(handle);
        transport
            .device_mut()
            .restore_state(&s.device)
            .map_err(device_err(&s.id))?;
        transport.restore(&s.transport).map_err(device_err(&s.id))?;
    }
    if let (Some(handle), Some(s)) = (&devices.balloon, &saved.balloon) {
        let mut transport = lock(handle);
        transport
            .device_mut()
            .restore_state(&s.device)
            .map_err(device_err("balloon"))?;
        transport.restore(&s.transport).map_err(device_err("balloon"))?;
    }
    Ok(())
}

/// Writes the snapshot at `from` and the chain it builds on as one full snapshot at `to` (which
/// must not exist; removed again on failure).
pub fn merge(from: &Path, to: &Path) -> Result<SnapshotInfo, SnapshotError> {
    let started = std::time::Instant::now();
    for (name, p) in [("from", from), ("to", to)] {
        if !p.is_absolute() {
            return Err(SnapshotError::Invalid(format!(
                "{name}: {} is not an absolute path",
                p.display()
            )));
        }
    }
    let mut state: SnapshotState = format::read_state(&from.join(STATE_FILE))?;
    let mem = map_chain(from, &state)?;
    std::fs::create_dir(to).map_err(|source| SnapshotError::Io {
        what: "snapshot directory",
        path: to.display().to_string(),
        source,
    })?;
    let result = (|| {
        let written = memory::save(&mem, memory::Backing::SnapshotFile, &to.join(MEMORY_FILE))?;
        let config: VmConfig = serde_json::from_str(&state.config_json)
            .map_err(|e| SnapshotError::Invalid(format!("the snapshot's configuration: {e}")))?;
        let mut disk_bytes = 0;
        for drive in config.drives.iter().filter(|d| !d.read_only) {
            let (src_path, dst_path) = (disk_file(from, &drive.id), disk_file(to, &drive.id));
            let io = |what, path: &Path| {
                let path = path.display().to_string();
                move |source| SnapshotError::Io { what, path, source }
            };
            let src = File::open(&src_path).map_err(io("the snapshot's disk", &src_path))?;
            let dst = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&dst_path)
                .map_err(io("disk copy", &dst_path))?;
            disk_bytes += disk::copy_image(&src, &dst, true)
                .map_err(io("disk copy", &dst_path))?
                .1;
        }
        state.parent = None;
        state.memory_pages = None;
        let state_bytes = format::write_state(&to.join(STATE_FILE), &state)?;
        Ok(SnapshotInfo {
            dir: to.to_path_buf(),
            kind: SnapshotKind::Full,
            parent: None,
            memory_bytes: written.data_bytes,
            memory_size: written.total_bytes,
            state_bytes,
            disk_bytes,
            duration_us: started.elapsed().as_micros() as u64,
            vmm_version: state.meta.vmm_version.clone(),
            cpu_model: state.meta.cpu_model.clone(),
            format_version: format::FORMAT_VERSION,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(to);
    }
    result
}
