//! What SnapshotService decides without I/O to a vmm: snapshot ids and kinds, whether this host
//! can restore a snapshot, the spec and the vmm overrides of a restored VM, and how much of a
//! snapshot's files are written (for progress).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_api::snapshot::{DriveOverride, NetOverride, RestoreOverrides, SnapshotKind as VmmKind};
use vmm_api::SerialConfig;

use crate::error::AgentError;
use crate::operations::OperationHandle;
use crate::proto::{NicOverride, Snapshot, SnapshotKind, VmSpec};
use crate::spec::check_vm_id;

/// How often progress is measured while a vmm writes or copies.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Checks a snapshot id: the rules of VM ids (it names a directory).
pub fn check_snapshot_id(field: &str, id: &str) -> Result<(), AgentError> {
    check_vm_id(field, id)
}

/// The vmm's kind for a requested one (UNSPECIFIED is FULL).
pub fn vmm_kind(field: &str, kind: i32) -> Result<VmmKind, AgentError> {
    match SnapshotKind::try_from(kind) {
        Ok(SnapshotKind::Unspecified | SnapshotKind::Full) => Ok(VmmKind::Full),
        Ok(SnapshotKind::Diff) => Ok(VmmKind::Diff),
        Err(_) => Err(AgentError::invalid(field, "unknown snapshot kind")),
    }
}

/// The API's kind for the vmm's.
pub fn proto_kind(kind: VmmKind) -> SnapshotKind {
    match kind {
        VmmKind::Full => SnapshotKind::Full,
        VmmKind::Diff => SnapshotKind::Diff,
    }
}

/// What this host offers a restore: its CPU model and the snapshot format its vmm reads (None
/// when the vmm did not say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCompat {
    /// See [`vmm_api::snapshot::host_cpu_model`].
    pub cpu_model: String,
    /// From `vmm --version`.
    pub format_version: Option<u32>,
    /// The migration protocol this host's vmm speaks, from `vmm --version`.
    pub migration_protocol: Option<u32>,
}

/// Refuses (FAILED_PRECONDITION) a snapshot this host cannot restore: taken on another CPU model
/// (its vCPU state would not fit), or in a format this host's vmm does not read.
pub fn check_compatible(snapshot: &Snapshot, host: &HostCompat) -> Result<(), AgentError> {
    if snapshot.cpu_model != host.cpu_model {
        return Err(AgentError::WrongState(format!(
            "snapshot '{}' was taken on a {:?} CPU; this host has {:?}",
            snapshot.snapshot_id, snapshot.cpu_model, host.cpu_model
        )));
    }
    if let Some(format) = host.format_version {
        if snapshot.format_version != format {
            return Err(AgentError::WrongState(format!(
                "snapshot '{}' is in snapshot format {} (vmm {}); this host's vmm reads format {format}",
                snapshot.snapshot_id, snapshot.format_version, snapshot.vmm_version
            )));
        }
    }
    Ok(())
}

/// Where a restored VM's copy of writable disk `index` goes.
pub fn restored_disk_path(vm_dir: &Path, index: usize) -> PathBuf {
    vm_dir.join(format!("disk{index}.img"))
}

/// The spec of a VM restored from `snapshot`: the snapshot's, with the writable disks in the new
/// VM's directory, the NICs on the taps of `nics`, and `labels` (the snapshot's VM's when empty).
pub fn restored_spec(
    snapshot: &Snapshot,
    vm_dir: &Path,
    nics: &[NicOverride],
    labels: HashMap<String, String>,
) -> Result<VmSpec, AgentError> {
    let mut spec = snapshot.spec.clone().unwrap_or_default();
    for (i, disk) in spec.disks.iter_mut().enumerate() {
        if !disk.read_only {
            disk.path = restored_disk_path(vm_dir, i).display().to_string();
        }
    }
    move_nics(&mut spec, nics, "the snapshot's VM")?;
    if !labels.is_empty() {
        spec.labels = labels;
    }
    Ok(spec)
}

/// Puts the NICs `nics` names on their new taps (restores, migrations); `whose` names the VM in
/// errors. The others keep what they were on: the same existing tap, or a tap the agent makes
/// for the new VM on the same bridge.
pub fn move_nics(spec: &mut VmSpec, nics: &[NicOverride], whose: &str) -> Result<(), AgentError> {
    for (i, o) in nics.iter().enumerate() {
        if nics[..i].iter().any(|earlier| earlier.id == o.id) {
            return Err(AgentError::invalid(
                format!("nics[{i}].id"),
                format!("NIC '{}' is named twice", o.id),
            ));
        }
        let Some(nic) = spec.nics.iter_mut().find(|n| n.id == o.id) else {
            return Err(AgentError::invalid(
                format!("nics[{i}].id"),
                format!("{whose} has no NIC '{}'", o.id),
            ));
        };
        nic.tap = o.tap.clone();
        // Now on a tap that exists: nothing of the agent's tap applies.
        nic.bridge.clear();
        nic.mtu = 0;
    }
    Ok(())
}

/// What the vmm must change to run `spec` (from [`restored_spec`]) from its snapshot: the disk
/// copies' paths, the taps and the console log.
pub fn restore_overrides(spec: &VmSpec, console_log: &Path) -> RestoreOverrides {
    RestoreOverrides {
        drives: spec
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only)
            .map(|(i, d)| DriveOverride {
                // The ids `spec::to_vm_config` gives drives.
                id: format!("disk{i}"),
                path: Some(PathBuf::from(&d.path)),
                fd: None,
            })
            .collect(),
        nets: spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                // The agent's taps are handed over under the names `nics::to_net_config` uses.
                let fd = crate::nics::to_net_config(i, n).fd;
                NetOverride {
                    id: n.id.clone(),
                    tap: fd.is_none().then(|| n.tap.clone()),
                    fd,
                }
            })
            .collect(),
        serial: Some(SerialConfig::File(console_log.to_path_buf())),
    }
}

/// Disk space taken by the regular files directly in `dir` (0 if it cannot be read).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Runs `work`, reporting `measure()` of `total` bytes on `handle` meanwhile.
pub async fn with_progress<T>(
    handle: &mut OperationHandle,
    total: u64,
    measure: impl Fn() -> u64,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                let done = measure();
                handle.progress(done.min(total), total).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Disk, NicSpec};

    fn snapshot() -> Snapshot {
        Snapshot {
            snapshot_id: "s1".into(),
            cpu_model: "GenuineIntel Xeon".into(),
            format_version: 1,
            vmm_version: "0.1.0".into(),
            spec: Some(VmSpec {
                disks: vec![
                    Disk {
                        path: "/images/root.img".into(),
                        read_only: true,
                        root: true,
                        ..Default::default()
                    },
                    Disk {
                        path: "/vms/a/data.img".into(),
                        ..Default::default()
                    },
                ],
                nics: vec![NicSpec {
                    id: "eth0".into(),
                    tap: "tap-a".into(),
                    mac: "02:00:00:00:00:01".into(),
                    ..Default::default()
                }],
                labels: HashMap::from([("app".to_string(), "web".to_string())]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn another_cpu_or_format_is_refused() {
        let host = HostCompat {
            cpu_model: "GenuineIntel Xeon".into(),
            format_version: Some(1),
            migration_protocol: None,
        };
        assert!(check_compatible(&snapshot(), &host).is_ok());
        let other_cpu = HostCompat {
            cpu_model: "AuthenticAMD EPYC".into(),
            ..host.clone()
        };
        let e = check_compatible(&snapshot(), &other_cpu).unwrap_err();
        assert!(matches!(e, AgentError::WrongState(_)), "{e}");
        assert!(e.to_string().contains("EPYC"), "{e}");
        let newer = HostCompat {
            format_version: Some(2),
            ..host.clone()
        };
        let e = check_compatible(&snapshot(), &newer).unwrap_err();
        assert!(e.to_string().contains("format 1"), "{e}");
        let unknown = HostCompat {
            format_version: None,
            ..host
        };
        assert!(check_compatible(&snapshot(), &unknown).is_ok());
    }

    #[test]
    fn a_restored_spec_has_its_own_disks_and_the_taps_asked_for() {
        let dir = Path::new("/state/vms/b");
        let taps = [NicOverride {
            id: "eth0".into(),
            tap: "tap-b".into(),
        }];
        let spec = restored_spec(&snapshot(), dir, &taps, HashMap::new()).unwrap();
        assert_eq!(
            spec.disks[0].path, "/images/root.img",
            "read-only disks are shared"
        );
        assert_eq!(spec.disks[1].path, "/state/vms/b/disk1.img");
        assert_eq!(spec.nics[0].tap, "tap-b");
        assert_eq!(spec.nics[0].mac, "02:00:00:00:00:01", "the guest keeps its MAC");
        assert_eq!(spec.labels["app"], "web");
        let o = restore_overrides(&spec, &dir.join("console.log"));
        assert_eq!(o.drives.len(), 1);
        assert_eq!(o.drives[0].id, "disk1");
        assert_eq!(
            o.drives[0].path.as_deref(),
            Some(Path::new("/state/vms/b/disk1.img"))
        );
        assert_eq!(o.nets[0].tap.as_deref(), Some("tap-b"));
        let labels = HashMap::from([("clone".to_string(), "1".to_string())]);
        let spec = restored_spec(&snapshot(), dir, &[], labels).unwrap();
        assert_eq!(spec.labels.len(), 1);
        assert_eq!(spec.nics[0].tap, "tap-a");
    }

    #[test]
    fn a_nic_on_an_agent_made_tap_stays_on_one_unless_moved() {
        let mut spec = snapshot().spec.unwrap_or_default();
        spec.nics[0].tap.clear();
        spec.nics[0].bridge = "br0".into();
        spec.nics[0].mtu = 1400;
        // Not named: the new VM gets a tap of the agent's on the same bridge.
        let mut kept = spec.clone();
        move_nics(&mut kept, &[], "the snapshot's VM").unwrap();
        let nic = &kept.nics[0];
        assert_eq!(
            (nic.tap.as_str(), nic.bridge.as_str(), nic.mtu),
            ("", "br0", 1400)
        );
        let taps = [NicOverride {
            id: "eth0".into(),
            tap: "tap-b".into(),
        }];
        move_nics(&mut spec, &taps, "the snapshot's VM").unwrap();
        let nic = &spec.nics[0];
        assert_eq!((nic.tap.as_str(), nic.bridge.as_str(), nic.mtu), ("tap-b", "", 0));
    }

    #[test]
    fn unknown_or_repeated_nics_are_refused() {
        let dir = Path::new("/state/vms/b");
        let nic = |id: &str| NicOverride {
            id: id.into(),
            tap: "t".into(),
        };
        let e = restored_spec(&snapshot(), dir, &[nic("eth9")], HashMap::new()).unwrap_err();
        assert!(e.to_string().starts_with("nics[0].id:"), "{e}");
        let e = restored_spec(&snapshot(), dir, &[nic("eth0"), nic("eth0")], HashMap::new()).unwrap_err();
        assert!(e.to_string().starts_with("nics[1].id:"), "{e}");
    }

    #[test]
    fn kinds() {
        assert_eq!(vmm_kind("kind", 0).unwrap(), VmmKind::Full);
        assert_eq!(vmm_kind("kind", 2).unwrap(), VmmKind::Diff);
        assert!(vmm_kind("kind", 7).is_err());
        assert_eq!(proto_kind(VmmKind::Diff), SnapshotKind::Diff);
    }
}
