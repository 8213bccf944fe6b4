//! Snapshot requests of the control protocol: what `snapshot-create` writes and what
//! `snapshot-restore` may change about the VM it rebuilds.
//!
//! A snapshot is a directory: `state` (vCPUs, VM, devices and the configuration, checksummed),
//! `memory` (guest RAM, sparse: only pages that hold data) and one `disk-ID` per writable drive,
//! copied at the instant of the snapshot.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The state-file format this VMM writes and the only one it reads (2: devices include the
/// balloon). `vmm --version` names it, so that a host agent can refuse to restore an unreadable
/// snapshot before starting anything.
pub const FORMAT_VERSION: u32 = 2;

/// The most diff snapshots a chain may hold above its full snapshot.
pub const MAX_CHAIN: usize = 64;

/// The host CPU's vendor and model name, from `/proc/cpuinfo`: the vCPU state of a snapshot belongs
/// to it, and a restore on another model is refused. Read once per process, so that a caller
/// that reads it before it loses sight of `/proc` (a jailed vmm) keeps it.
pub fn host_cpu_model() -> String {
    static MODEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MODEL.get_or_init(read_cpu_model).clone()
}

fn read_cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    format!("{} {}", field("vendor_id"), field("model name"))
}

/// The `vmm --version` line: the version and the snapshot format.
pub fn version_line(version: &str) -> String {
    format!(
        "vmm {version} (snapshot format {FORMAT_VERSION}, migration protocol {})",
        crate::migration::PROTOCOL_VERSION
    )
}

/// The number a `vmm --version` line gives after `name` in its parentheses, if any.
fn version_field(line: &str, name: &str) -> Option<u32> {
    let (_, inside) = line.split_once('(')?;
    let inside = inside.split_once(')')?.0;
    inside
        .split(',')
        .find_map(|part| part.trim().strip_prefix(name))
        .and_then(|n| n.trim().parse().ok())
}

/// The snapshot format a `vmm --version` line names, if it names one.
pub fn format_of_version_line(line: &str) -> Option<u32> {
    version_field(line, "snapshot format ")
}

/// The migration protocol a `vmm --version` line names, if it names one.
pub fn migration_protocol_of_version_line(line: &str) -> Option<u32> {
    version_field(line, "migration protocol ")
}

/// The parameters of `snapshot-create`. The VM must be paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// An absolute path that does not exist yet; the VMM creates it (its parent must exist).
    pub dir: PathBuf,
    /// A full snapshot, or a diff holding only the pages written since the previous snapshot of
    /// this VM (or the one it was restored from), which must stay where it is.
    #[serde(default)]
    pub kind: SnapshotKind,
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// All of guest memory.
    #[default]
    Full,
    /// Pages written since the previous snapshot (needs `machine.track_dirty_pages`).
    Diff,
}

/// The parameters of `snapshot-merge`: turns a diff snapshot and the chain it builds on into one
/// full snapshot. Any VMM serves it, with or without a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMerge {
    /// The newest snapshot of the chain.
    pub from: PathBuf,
    /// The full snapshot to write (must not exist).
    pub to: PathBuf,
}

/// Answer to `snapshot-create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    /// Where it is.
    pub dir: PathBuf,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The snapshot a diff builds on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
    /// Bytes of guest memory written (pages that hold data); the memory file's apparent size is
    /// the guest's whole memory.
    pub memory_bytes: u64,
    /// Size of the guest's memory.
    pub memory_size: u64,
    /// Size of the state file.
    pub state_bytes: u64,
    /// Bytes of disk data copied (allocated extents of the writable drives).
    pub disk_bytes: u64,
    /// Time taken, in microseconds.
    pub duration_us: u64,
    /// Version of the VMM that wrote it.
    pub vmm_version: String,
    /// The host CPU model (vendor and brand string) the vCPU state belongs to.
    pub cpu_model: String,
    /// The state file's format version.
    #[serde(default)]
    pub format_version: u32,
}

/// The parameters of `snapshot-restore`, sent to a VMM started without a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRestore {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// What to change about the VM's devices.
    #[serde(default)]
    pub overrides: RestoreOverrides,
    /// Run the vCPUs once restored (else the VM stays paused until `resume`).
    #[serde(default)]
    pub resume: bool,
    /// Ask the kernel to read the whole memory file into the page cache in the background
    /// (`MADV_WILLNEED`), so later first touches find their pages there; restore does not wait.
    #[serde(default)]
    pub prefault: bool,
}

/// Changes a restored VM may make to its snapshot's devices, so that clones run side by side.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreOverrides {
    /// Per drive, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveOverride>,
    /// Per NIC, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetOverride>,
    /// Where the serial console goes (`stdout`, `off`, or a file path), if not where it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<crate::SerialConfig>,
}

/// Where a restored drive's image is.
///
/// A writable drive gets the snapshot's copy of its disk: written to `path` (which must not exist)
/// or into the file behind `fd`. Without an override it is written back to the drive's original
/// path, rolling that disk back to the snapshot. A read-only drive is opened where it says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive's id.
    pub id: String,
    /// A new image path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The name of a descriptor passed with `add-fds`, instead of a path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<String>,
}

/// Which tap a restored NIC uses. The MAC stays: the guest has read it, and clones on taps of
/// their own do not see each other's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetOverride {
    /// The NIC's id.
    pub id: String,
    /// A tap device name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The name of a tap descriptor passed with `add-fds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_names_the_snapshot_format_and_migration_protocol() {
        let line = version_line("1.2.3");
        let protocol = crate::migration::PROTOCOL_VERSION;
        assert_eq!(
            line,
            format!("vmm 1.2.3 (snapshot format {FORMAT_VERSION}, migration protocol {protocol})")
        );
        assert_eq!(format_of_version_line(&line), Some(FORMAT_VERSION));
        assert_eq!(migration_protocol_of_version_line(&line), Some(protocol));
        // What an earlier vmm printed.
        assert_eq!(format_of_version_line("vmm 0.1.0 (snapshot format 2)"), Some(2));
        assert_eq!(
            migration_protocol_of_version_line("vmm 0.1.0 (snapshot format 2)"),
            None
        );
        assert_eq!(format_of_version_line("vmm 0.0.1"), None);
        assert_eq!(format_of_version_line("vmm 1 (snapshot format x)"), None);
    }

    #[test]
    fn the_cpu_model_names_vendor_and_model() {
        let model = host_cpu_model();
        assert!(model.len() > 1 && !model.starts_with(' '), "{model:?}");
    }
}
