//! Snapshots: a paused VM's whole state written to a directory, and rebuilt from it in a new
//! process.
//!
//! A snapshot directory holds `state` (the [`SnapshotState`] in the framed format of [`format`]),
//! `memory` (guest RAM, sparse; see [`memory`]) and a `disk-ID` copy of each writable drive (see
//! [`disk`]). `state` is written last, so a directory without it is an incomplete snapshot; a failed
//! `snapshot-create` removes what it wrote.

pub mod crc64;
pub mod disk;
pub mod format;
pub mod memory;
pub mod restore;

use std::path::{Path, PathBuf};
use std::time::Instant;

use devices::virtio::balloon::BalloonState;
use devices::virtio::block::BlockState;
use devices::virtio::net::NetState;
use devices::virtio::persist::{MmioState, PersistError};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_api::control::ErrorKind;
use vmm_api::control::VmState as RunState;
use vmm_api::snapshot::{SnapshotInfo, SnapshotKind};

use crate::device_manager::LegacyState;
use crate::machine::{Machine, MachineError};
use crate::sync::lock;
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};
use crate::vstate::vm::{VmError, VmState};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// The file in a snapshot directory that holds drive `id`'s disk.
pub fn disk_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("disk-{id}"))
}

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM is not paused (or not there).
    #[error("{0}")]
    WrongState(String),
    /// The request is unusable (a relative path, an unknown drive in the overrides).
    #[error("{0}")]
    Invalid(String),
    /// The snapshot was taken somewhere it cannot be restored here.
    #[error("{0}")]
    Incompatible(String),
    /// Reading or writing a file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the file is.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The state file is damaged, truncated, or of another version.
    #[error(transparent)]
    Format(#[from] format::FormatError),
    /// Guest memory could not be saved or mapped.
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
    /// The vCPUs did not save their state.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// KVM refused VM-level state.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// KVM's dirty log could not be read.
    #[error("dirty page tracking: {0}")]
    DirtyLog(#[from] crate::vstate::memory::MemoryError),
    /// A vCPU's state is unusable here.
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    /// A device refused its saved state.
    #[error("{id}: {source}")]
    Device {
        /// The device.
        id: String,
        /// Why.
        source: PersistError,
    },
}

impl SnapshotError {
    /// How the control socket classifies it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotError::WrongState(_) => ErrorKind::WrongState,
            SnapshotError::Invalid(_)
            | SnapshotError::Incompatible(_)
            | SnapshotError::Format(_)
            | SnapshotError::Memory(memory::MemoryFileError::Length { .. })
            | SnapshotError::Device { .. } => ErrorKind::InvalidArgument,
            SnapshotError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            SnapshotError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
                ErrorKind::InvalidArgument
            }
            _ => ErrorKind::Internal,
        }
    }
}

/// Facts about a snapshot that decide where it may be restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The VMM version that wrote it.
    pub vmm_version: String,
    /// The host CPU (vendor and model name) its vCPU state comes from.
    pub cpu_model: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
}

/// A virtio drive's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// The drive's id.
    pub id: String,
    /// Transport registers and queues.
    pub transport: MmioState,
    /// The device's own state.
    pub device: BlockState,
}

/// A virtio NIC's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetSnapshot {
    /// The NIC's id.
    pub id: String,
    /// Transport registers and queues.
    pub transport: MmioState,
    /// The device's own state.
    pub device: NetState,
}

/// A virtio balloon's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    /// Transport registers and queues.
    pub transport: MmioState,
    /// The device's own state.
    pub device: BalloonState,
}

/// Every device's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// Serial console, keyboard controller, RTC.
    pub legacy: LegacyState,
    /// The drives, in guest order.
    pub blocks: Vec<BlockSnapshot>,
    /// The NICs, in guest order.
    pub nets: Vec<NetSnapshot>,
    /// The balloon, if the VM has one.
    pub balloon: Option<BalloonSnapshot>,
}

/// The body of a state file.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// Where it may be restored.
    pub meta: SnapshotMeta,
    /// The VM's configuration as JSON (its serde form needs a self-describing format).
    pub config_json: String,
    /// Guest memory regions (start, length), in memory-file order.
    pub memory_ranges: Vec<(u64, u64)>,
    /// For a diff: the snapshot it builds on (absolute path).
    pub parent: Option<PathBuf>,
    /// For a diff: the pages its memory file holds, per region (bit `n` of word `n / 64` is page
    /// `n`); a full snapshot holds every page.
    pub memory_pages: Option<Vec<Vec<u64>>>,
    /// In-kernel interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DevicesState,
}

pub use vmm_api::snapshot::host_cpu_model;

/// Writes a snapshot of `machine`, which must be paused, to the new directory `dir`: full, or a
/// diff against the previous one. On failure the directory is removed.
pub fn create(machine: &mut Machine, dir: &Path, kind: SnapshotKind) -> Result<SnapshotInfo, SnapshotError> {
    let started = Instant::now();
    if machine.state() != RunState::Paused {
        return Err(SnapshotError::WrongState(
            "pause the VM before taking a snapshot".into(),
        ));
    }
    let parent = match kind {
        SnapshotKind::Full => None,
        SnapshotKind::Diff => {
            if machine.kvm().dirty.is_none() {
                return Err(SnapshotError::WrongState(
                    "a diff snapshot needs machine.track_dirty_pages".into(),
                ));
            }
            let Some(parent) = machine.kvm().last_snapshot.clone() else {
                return Err(SnapshotError::WrongState(
                    "a diff snapshot needs a previous snapshot of this VM".into(),
                ));
            };
            Some(parent)
        }
    };
    if !dir.is_absolute() {
        return Err(SnapshotError::Invalid(format!(
            "dir: {} is not an absolute path",
            dir.display()
        )));
    }
    std::fs::create_dir(dir).map_err(|source| SnapshotError::Io {
        what: "snapshot directory",
        path: dir.display().to_string(),
        source,
    })?;
    match write_all(machine, dir, parent, started) {
        Ok(info) => {
            machine.set_last_snapshot(dir.to_path_buf());
            Ok(info)
        }
        Err(e) => {
            if let Err(rm) = std::fs::remove_dir_all(dir) {
                log::warn!("cannot remove the failed snapshot {}: {rm}", dir.display());
            }
            Err(e)
        }
    }
}

/// Per memory region, one bit per page (bit `n` of word `n / 64` is page `n`).
pub type PageBitmaps = Vec<Vec<u64>>;

/// The state of a paused VM except its memory pages (vCPUs, VM, devices, configuration), and,
/// if it tracks dirty pages, the pages written since the last time they were taken (which this
/// resets): what a snapshot writes next to its memory, and what a migration sends last.
pub fn capture(machine: &mut Machine) -> Result<(SnapshotState, Option<PageBitmaps>), SnapshotError> {
    let vcpus = machine.save_vcpus()?;
    let vm = VmState::save(&machine.kvm().vm)?;
    let devices = save_devices(machine)?;
    let kvm = machine.kvm();
    let mem = &kvm.mem;
    let memory_ranges = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let written_pages = match &kvm.dirty {
        Some(dirty) => {
            // Used rings are written by devices through the queue, not marked buffer by buffer.
            let transports = devices.blocks.iter().map(|b| &b.transport);
            let transports = transports.chain(devices.nets.iter().map(|n| &n.transport));
            let transports = transports.chain(devices.balloon.iter().map(|b| &b.transport));
            for queue in transports.filter(|t| t.activated).flat_map(|t| &t.queues) {
                dirty.mark(GuestAddress(queue.used_ring), 6 + 8 * usize::from(queue.size));
            }
            Some(crate::vstate::memory::take_dirty_pages(&kvm.vm, mem, dirty)?)
        }
        None => None,
    };
    let config_json = serde_json::to_string(machine.recorded_config())
        .map_err(|e| SnapshotError::Invalid(format!("the configuration cannot be saved: {e}")))?;
    let meta = SnapshotMeta {
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        cpu_model: host_cpu_model(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    let state = SnapshotState {
        meta,
        config_json,
        memory_ranges,
        parent: None,
        memory_pages: None,
        vm,
        vcpus,
        devices,
    };
    Ok((state, written_pages))
}

fn write_all(
    machine: &mut Machine,
    dir: &Path,
    parent: Option<PathBuf>,
    started: Instant,
) -> Result<SnapshotInfo, SnapshotError> {
    // Every snapshot starts the next diff's count, full ones included.
    let (mut state, written_pages) = capture(machine)?;
    let kvm = machine.kvm();
    let mem = &kvm.mem;
    let memory_path = dir.join(MEMORY_FILE);
    let (written, memory_pages) = match (&parent, written_pages) {
        (Some(_), Some(pages)) => (memory::save_pages(mem, &pages, &memory_path)?, Some(pages)),
        _ => (memory::save(mem, kvm.backing, &memory_path)?, None),
    };
    let disk_bytes = save_disks(machine, dir)?;
    state.parent = parent.clone();
    state.memory_pages = memory_pages;
    let state_bytes = format::write_state(&dir.join(STATE_FILE), &state)?;
    let meta = state.meta;
    Ok(SnapshotInfo {
        dir: dir.to_path_buf(),
        kind: if parent.is_some() {
            SnapshotKind::Diff
        } else {
            SnapshotKind::Full
        },
        parent,
        memory_bytes: written.data_bytes,
        memory_size: written.total_bytes,
        state_bytes,
        disk_bytes,
        duration_us: started.elapsed().as_micros() as u64,
        vmm_version: meta.vmm_version,
        cpu_model: meta.cpu_model,
        format_version: format::FORMAT_VERSION,
    })
}

fn save_devices(machine: &Machine) -> Result<DevicesState, SnapshotError> {
    let device_err = |id: &str| {
        let id = id.to_string();
        move |source| SnapshotError::Device { id, source }
    };
    let mut blocks = Vec::new();
    for handle in machine.blocks() {
        let transport = lock(handle);
        let id = transport.device().id().to_string();
        blocks.push(BlockSnapshot {
            device: transport.device().save_state().map_err(device_err(&id))?,
            transport: transport.save(),
            id,
        });
    }
    let nets = machine
        .nets()
        .iter()
        .map(|handle| {
            let transport = lock(handle);
            NetSnapshot {
                id: transport.device().id().to_string(),
                transport: transport.save(),
                device: transport.device().save_state(),
            }
        })
        .collect();
    let balloon = machine.balloon().map(|handle| {
        let transport = lock(handle);
        BalloonSnapshot {
            transport: transport.save(),
            device: transport.device().save_state(),
        }
    });
    Ok(DevicesState {
        legacy: machine.legacy().save(),
        blocks,
        nets,
        balloon,
    })
}

/// Copies every writable drive's image; returns the bytes of data copied.
fn save_disks(machine: &Machine, dir: &Path) -> Result<u64, SnapshotError> {
    let mut copied = 0;
    for handle in machine.blocks() {
        let transport = lock(handle);
        let block = transport.device();
        if block.read_only() {
            continue;
        }
        let path = disk_file(dir, block.id());
        let io = |source| SnapshotError::Io {
            what: "disk copy",
            path: path.display().to_string(),
            source,
        };
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        let (_, bytes) = disk::copy_image(block.disk_file(), &dst, true).map_err(io)?;
        copied += bytes;
    }
    Ok(copied)
}
