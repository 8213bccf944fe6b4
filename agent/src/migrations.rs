//! The live migrations of this agent's VMs: which VM is migrating (calls that would change it are
//! refused meanwhile), its progress for `WatchMigration`, and the pure rules of a migration (the
//! destination's address, the one-time token, shared storage, the vmm's statistics as progress).

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vmm_api::migration::{MigrationPhase as VmmPhase, MigrationStats};

use crate::error::AgentError;
use crate::proto::{MigrationPhase, MigrationProgress, VmSpec};

/// How long a finished migration stays watchable.
const KEEP_FINISHED: Duration = Duration::from_secs(10 * 60);

struct Entry {
    progress: watch::Sender<MigrationProgress>,
    /// When it finished; `None` while it runs.
    ended: Option<Instant>,
}

/// The migrations that run, and those that ended lately.
#[derive(Default)]
pub struct Migrations {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Migrations {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `vm_id` as migrating to `destination` and returns where its progress goes;
    /// FAILED_PRECONDITION if it migrates already.
    pub fn begin(
        &self,
        vm_id: &str,
        destination: &str,
    ) -> Result<watch::Sender<MigrationProgress>, AgentError> {
        let mut entries = self.entries();
        entries.retain(|_, e| e.ended.is_none_or(|t| t.elapsed() < KEEP_FINISHED));
        if let Some(e) = entries.get(vm_id) {
            if e.ended.is_none() {
                return Err(migrating(vm_id, &e.progress.borrow()));
            }
        }
        let (tx, _) = watch::channel(MigrationProgress {
            vm_id: vm_id.to_string(),
            destination: destination.to_string(),
            phase: MigrationPhase::Setup as i32,
            ..Default::default()
        });
        entries.insert(
            vm_id.to_string(),
            Entry {
                progress: tx.clone(),
                ended: None,
            },
        );
        Ok(tx)
    }

    /// The migration of `vm_id` has ended (its last progress says how).
    pub fn end(&self, vm_id: &str) {
        if let Some(e) = self.entries().get_mut(vm_id) {
            e.ended = Some(Instant::now());
        }
    }

    /// FAILED_PRECONDITION while `vm_id` migrates.
    pub fn check_idle(&self, vm_id: &str) -> Result<(), AgentError> {
        match self.entries().get(vm_id) {
            Some(e) if e.ended.is_none() => Err(migrating(vm_id, &e.progress.borrow())),
            _ => Ok(()),
        }
    }

    /// The progress of the VM's running or last migration.
    pub fn watch(&self, vm_id: &str) -> Option<watch::Receiver<MigrationProgress>> {
        self.entries().get(vm_id).map(|e| e.progress.subscribe())
    }

    /// The operation of the VM's running or last migration.
    pub fn operation(&self, vm_id: &str) -> Option<String> {
        self.entries()
            .get(vm_id)
            .map(|e| e.progress.borrow().operation.clone())
            .filter(|o| !o.is_empty())
    }
}

fn migrating(vm_id: &str, progress: &MigrationProgress) -> AgentError {
    AgentError::WrongState(format!(
        "VM '{vm_id}' is migrating to {}; wait for the migration to end or cancel it",
        progress.destination
    ))
}

/// The `HOST:PORT` and the host of a destination agent `tcp://HOST:PORT`.
pub fn parse_destination(destination: &str) -> Result<(String, String), AgentError> {
    let bad = || {
        AgentError::invalid(
            "destination",
            format!("must be tcp://HOST:PORT of the destination agent's TLS listener, got '{destination}'"),
        )
    };
    let authority = destination.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if host.parse::<IpAddr>().is_err() && !valid_name {
        return Err(bad());
    }
    Ok((authority.to_string(), host.to_string()))
}

/// A new one-time token: 32 random bytes, hex.
pub fn new_token() -> Result<String, AgentError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| AgentError::Internal(format!("cannot read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Refuses (FAILED_PRECONDITION) to migrate a VM on base images: its overlays need the same
/// image at the destination, which nothing checks or provides yet.
pub fn check_no_images(vm_id: &str, spec: &VmSpec) -> Result<(), AgentError> {
    match crate::images::spec_image_ids(spec).first() {
        None => Ok(()),
        Some(image) => Err(AgentError::WrongState(format!(
            "VM '{vm_id}' runs on image '{image}': VMs on images cannot be live-migrated yet \
             (the destination would need the same image)"
        ))),
    }
}

/// Refuses (FAILED_PRECONDITION) shared storage for disks that cannot be: those in this agent's
/// state directory (which it deletes with the VM once the destination owns it). Without shared
/// storage every disk is copied, wherever it is.
pub fn check_storage(
    vm_id: &str,
    spec: &VmSpec,
    shared_storage: bool,
    state_dir: &Path,
) -> Result<(), AgentError> {
    if !shared_storage {
        return Ok(());
    }
    if let Some(disk) = spec
        .disks
        .iter()
        .find(|d| Path::new(&d.path).starts_with(state_dir))
    {
        return Err(AgentError::WrongState(format!(
            "VM '{vm_id}': disk {} is in this agent's state directory, which is not shared storage",
            disk.path
        )));
    }
    Ok(())
}

fn phase(p: VmmPhase) -> MigrationPhase {
    match p {
        VmmPhase::Setup => MigrationPhase::Setup,
        VmmPhase::PreCopy => MigrationPhase::PreCopy,
        VmmPhase::SwitchOver => MigrationPhase::SwitchOver,
        VmmPhase::Completed => MigrationPhase::Completed,
        VmmPhase::Failed => MigrationPhase::Failed,
    }
}

/// `progress` brought up to date with what the source's vmm reported.
pub fn with_stats(progress: &MigrationProgress, stats: &MigrationStats) -> MigrationProgress {
    MigrationProgress {
        phase: phase(stats.phase) as i32,
        iteration: stats.iteration,
        memory_total_bytes: stats.memory_total_bytes,
        memory_transferred_bytes: stats.memory_transferred_bytes,
        memory_remaining_bytes: stats.memory_remaining_bytes,
        dirty_rate_bytes_per_s: stats.dirty_rate_bytes_per_s,
        throughput_bytes_per_s: stats.throughput_bytes_per_s,
        expected_downtime_ms: stats.expected_downtime_ms,
        throttle_percent: stats.throttle_percent,
        disk_total_bytes: stats.disk_total_bytes,
        disk_transferred_bytes: stats.disk_transferred_bytes,
        disk_remaining_bytes: stats.disk_remaining_bytes,
        elapsed_ms: stats.elapsed_ms,
        downtime_ms: stats.downtime_ms,
        error: stats.error.clone().unwrap_or_default(),
        ..progress.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Disk;

    #[test]
    fn vms_on_images_do_not_migrate_yet() {
        let plain = VmSpec {
            disks: vec![Disk {
                path: "/srv/a.img".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        check_no_images("a", &plain).unwrap();
        let mut on_image = plain.clone();
        on_image.disks.push(Disk {
            image_id: "base".into(),
            ..Default::default()
        });
        let e = check_no_images("a", &on_image).unwrap_err();
        assert!(matches!(e, AgentError::WrongState(_)), "{e}");
        assert!(e.to_string().contains("image 'base'"), "{e}");
    }

    #[test]
    fn destinations_are_tcp_host_port() {
        assert_eq!(
            parse_destination("tcp://10.0.0.2:7000").unwrap(),
            ("10.0.0.2:7000".to_string(), "10.0.0.2".to_string())
        );
        assert_eq!(
            parse_destination("tcp://agent-2.rack1:443").unwrap().1,
            "agent-2.rack1"
        );
        assert_eq!(parse_destination("tcp://[fd00::2]:7000").unwrap().1, "fd00::2");
        for bad in [
            "10.0.0.2:7000",
            "https://10.0.0.2:7000",
            "tcp://10.0.0.2",
            "tcp://10.0.0.2:0",
            "tcp://10.0.0.2:99999",
            "tcp://:7000",
            "tcp://a b:1",
            "unix:/run/agent.sock",
        ] {
            let e = parse_destination(bad).unwrap_err();
            assert!(matches!(e, AgentError::InvalidArgument { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn shared_disks_must_be_outside_the_state_dir() {
        let state = Path::new("/var/lib/vmm-agent");
        let none = VmSpec::default();
        assert!(check_storage("vm", &none, false, state).is_ok());
        let spec = |path: &str| VmSpec {
            disks: vec![Disk {
                path: path.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let shared = spec("/mnt/shared/vm.ext4");
        assert!(check_storage("vm", &shared, true, state).is_ok());
        assert!(check_storage("vm", &shared, false, state).is_ok());
        let local = spec("/var/lib/vmm-agent/vms/vm/disk0.img");
        let e = check_storage("vm", &local, true, state).unwrap_err();
        assert!(e.to_string().contains("state directory"), "{e}");
        // Copied, it may be anywhere.
        assert!(check_storage("vm", &local, false, state).is_ok());
    }

    #[test]
    fn one_migration_per_vm_and_the_last_stays_watchable() {
        let m = Migrations::default();
        let tx = m.begin("vm", "tcp://b:1").unwrap();
        assert!(m.check_idle("other").is_ok());
        let e = m.check_idle("vm").unwrap_err();
        assert!(matches!(e, AgentError::WrongState(_)), "{e}");
        assert!(e.to_string().contains("tcp://b:1"), "{e}");
        assert!(m.begin("vm", "tcp://c:1").is_err());
        let rx = m.watch("vm").unwrap();
        tx.send_modify(|p| {
            p.operation = "operations/1".into();
            p.phase = MigrationPhase::Completed as i32;
        });
        assert_eq!(rx.borrow().phase(), MigrationPhase::Completed);
        m.end("vm");
        assert!(m.check_idle("vm").is_ok());
        assert_eq!(m.operation("vm").as_deref(), Some("operations/1"));
        assert!(m.watch("vm").is_some());
        // A new migration of the same VM replaces the finished one.
        m.begin("vm", "tcp://c:1").unwrap();
        assert_eq!(m.operation("vm"), None);
    }

    #[test]
    fn the_vmm_statistics_become_progress() {
        let base = MigrationProgress {
            vm_id: "vm".into(),
            operation: "operations/7".into(),
            destination: "tcp://b:1".into(),
            ..Default::default()
        };
        let stats = MigrationStats {
            phase: VmmPhase::Completed,
            iteration: 3,
            memory_total_bytes: 100,
            memory_transferred_bytes: 90,
            downtime_ms: Some(12),
            ..Default::default()
        };
        let p = with_stats(&base, &stats);
        assert_eq!(p.phase(), MigrationPhase::Completed);
        assert_eq!(
            (p.iteration, p.memory_transferred_bytes, p.downtime_ms),
            (3, 90, Some(12))
        );
        assert_eq!((p.vm_id.as_str(), p.operation.as_str()), ("vm", "operations/7"));
    }
}
