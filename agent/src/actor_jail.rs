//! Jailed launches (`--jail-vms`): the vmm runs `vmm --jail` (docs/jail.md), as a uid of the
//! VM's own, in a root that holds only its kernel, disks and socket, in new namespaces (an
//! empty network namespace among them) and in the cgroup `vmm/<vm id>` with CPU and memory
//! limits. What it cannot open from in there, the agent opens and passes down: every tap (made
//! by the agent, or the operator's attached), inherited as `--fd nic<i>=N`; its console goes to
//! its standard output, the VM's `console.log`.
//!
//! The agent supervises the launcher (what it signals, waits for and finds again after a
//! restart) and talks to the jailed vmm over the socket in the jail's `run/`, checking that the
//! process serving it runs as the VM's uid.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use vmm_api::config::{SerialConfig, VmConfig};
use vmm_api::snapshot::{DriveOverride, NetOverride, RestoreOverrides};

use super::launch::{JailLaunch, VmmLaunch};
use super::{NewVmm, VmActor};
use crate::error::{AgentError, ErrorChain};
use crate::nics::{fd_name, is_agent_made};
use crate::proto::{Vm, VmSpec};
use crate::spec::to_vm_config;
use crate::state::JailUids;

/// Memory a jailed vmm may use beyond its guest's: the vmm itself (a few MiB), and the page
/// cache of its disks, which the kernel charges to its cgroup and reclaims at the limit.
const JAIL_MEMORY_OVERHEAD_MIB: u64 = 64;

impl VmActor {
    /// Launches the VM's vmm jailed. `Some` when the start is over (the VM recorded as failed,
    /// with no vmm and no tap left), `None` when the vmm is on its way to running the VM.
    pub(super) async fn launch_jailed(
        &mut self,
        spec: &VmSpec,
        uids: JailUids,
    ) -> Option<Result<Vm, AgentError>> {
        if let Err(why) = self.take_jail_uid(uids).await {
            return Some(self.fail_start(why).await);
        }
        let fds = match self.jailed_taps(spec).await {
            Ok(fds) => fds,
            Err(why) => return Some(self.fail_start(why).await),
        };
        let mut config = to_vm_config(
            spec,
            &self.ctx.config.console_log(&self.vm.vm_id),
            &self.ctx.config.images_dir(),
        );
        config.serial = SerialConfig::Stdout;
        for (i, net) in config.nets.iter_mut().enumerate() {
            net.tap = None;
            net.fd = Some(fd_name(i));
        }
        let launch = VmmLaunch {
            config: Some(config),
            jail: Some(self.jail_launch(spec, Vec::new())),
            fds,
        };
        if let Err(e) = self.spawn_vmm_with(launch).await {
            return Some(self.fail_start(format!("cannot start the vmm: {e}")).await);
        }
        match self.connect_new_vmm().await {
            NewVmm::Connected => None,
            NewVmm::Exited => {
                self.finish().await;
                Some(Ok(self.vm.clone()))
            }
            NewVmm::Silent => Some(
                self.give_up("the jailed vmm did not open its control socket")
                    .await,
            ),
        }
    }

    /// Gives the VM its jail uid: the one it holds, or the lowest free one of `uids`. Err: why.
    async fn take_jail_uid(&mut self, uids: JailUids) -> Result<(), String> {
        let id = self.vm.vm_id.clone();
        self.vm = self
            .ctx
            .store
            .call(move |s| s.assign_jail_uid(&id, uids.range()))
            .await
            .map_err(|e| format!("cannot give it a jail uid: {e}"))?;
        Ok(())
    }

    /// The jail settings of this VM's vmm (its uid must be assigned).
    fn jail_launch(&self, spec: &VmSpec, mirrors: Vec<PathBuf>) -> JailLaunch {
        JailLaunch {
            uid: self.vm.jail_uid,
            // The vCPUs, and room for the vmm's device and I/O threads.
            cpu_limit: f64::from(spec.vcpus) + 0.5,
            memory_limit_mib: spec.memory_mib + JAIL_MEMORY_OVERHEAD_MIB + spec.memory_mib / 8,
            mirrors,
        }
    }

    /// Starts a jailed vmm without a configuration, for a VM that arrives from a snapshot or by
    /// live migration, and connects to it; on failure it is gone and the error says why.
    ///
    /// The arriving VM's files are named by host paths, which the jailed vmm cannot open: each
    /// drive `overrides` gives a path (the file a restore or a migration fills: created here when
    /// `disks` says so) and each writable drive it does not (an image both hosts share) goes to it
    /// as a descriptor; read-only images, base images and the snapshots `chain` (its directories)
    /// are shown at their own paths in the jail, so the VM records host paths. Taps come as
    /// descriptors too, and the console goes to the vmm's standard output (`console.log`).
    pub(super) async fn start_empty_jailed(
        &mut self,
        uids: JailUids,
        overrides: &mut RestoreOverrides,
        chain: Vec<PathBuf>,
        disks: ArrivingDisks,
    ) -> Result<(), String> {
        self.take_jail_uid(uids).await?;
        let spec = self.vm.spec.clone().unwrap_or_default();
        let config = to_vm_config(
            &spec,
            &self.ctx.config.console_log(&self.vm.vm_id),
            &self.ctx.config.images_dir(),
        );
        // A restore's disk copies go in the VM's directory, new with the VM.
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("cannot make {}: {e}", self.dir.display()))?;
        let DriveFiles { mut fds, mut mirrors } = arriving_drives(&config, overrides, disks)?;
        fds.extend(self.jailed_taps(&spec).await?);
        jailed_nets(&spec, overrides);
        overrides.serial = Some(SerialConfig::Stdout);
        mirrors.extend(chain);
        // Two copy-on-write drives on one image share a base; the vmm refuses a mirror twice.
        mirrors.sort();
        mirrors.dedup();
        let launch = VmmLaunch {
            config: None,
            jail: Some(self.jail_launch(&spec, mirrors)),
            fds,
        };
        self.start_empty_vmm(launch).await
    }

    /// Every tap of `spec` as a descriptor named for `nets[i].fd`: the agent's made now, the
    /// operator's attached (a jailed vmm can do neither). On failure none is left.
    async fn jailed_taps(&mut self, spec: &VmSpec) -> Result<Vec<(String, OwnedFd)>, String> {
        // Also records every NIC's tap in `Vm.nic_taps` (none made when no NIC asks for one).
        let made = self.make_agent_taps(spec).await?;
        let mut fds: Vec<(String, OwnedFd)> = made.into_iter().map(|t| (t.fd_name, t.fd)).collect();
        for (i, nic) in spec.nics.iter().enumerate().filter(|(_, n)| !is_agent_made(n)) {
            let fd = hostnet::tap::attach_tap(&nic.tap).map_err(|e| {
                format!(
                    "cannot attach NIC '{}' to its tap '{}' for the jailed vmm: {}",
                    nic.id,
                    nic.tap,
                    ErrorChain(&e)
                )
            })?;
            fds.push((fd_name(i), fd));
        }
        Ok(fds)
    }

    /// Removes what a jailed vmm's launcher leaves when it is killed before its own clean-up:
    /// the jail's directory and its empty cgroups.
    pub(super) fn remove_jail_leftovers(&self) {
        if self.ctx.config.jail.is_none() {
            return;
        }
        let dir = self.ctx.config.jail_dir(&self.vm.vm_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %self.vm.vm_id, error = %e, dir = %dir.display(), "cannot remove the jail");
            }
        }
        crate::cgroups::remove_jail_groups(&self.vm.vm_id);
    }
}

/// Whether the files the drive overrides name exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ArrivingDisks {
    /// A restore: the vmm copies each writable drive's saved image into a new file, made here.
    Create,
    /// A migration: the files are there (made empty for the copies, or the shared images).
    Existing,
}

/// What a jailed vmm gets of an arriving VM's drives.
#[derive(Debug, Default)]
struct DriveFiles {
    /// Writable images, named for their drive ids.
    fds: Vec<(String, OwnedFd)>,
    /// Read-only images and base images, shown at their own paths.
    mirrors: Vec<PathBuf>,
}

/// The descriptors and mirrors of `config`'s drives for a jailed vmm, with `overrides` rewritten
/// to the descriptors. Err: why, with nothing left open.
fn arriving_drives(
    config: &VmConfig,
    overrides: &mut RestoreOverrides,
    disks: ArrivingDisks,
) -> Result<DriveFiles, String> {
    let mut files = DriveFiles::default();
    for drive in &config.drives {
        if let Some(base) = &drive.backing {
            files.mirrors.push(base.clone());
        }
        let at = overrides.drives.iter().position(|o| o.id == drive.id);
        let (path, create) = match at.and_then(|i| overrides.drives[i].path.clone()) {
            Some(path) => (path, disks == ArrivingDisks::Create),
            None if drive.read_only => {
                files.mirrors.push(drive.path.clone());
                continue;
            }
            None => (drive.path.clone(), false),
        };
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(create)
            .open(&path)
            .map_err(|e| format!("drive {}: {}: {e}", drive.id, path.display()))?;
        let named = DriveOverride {
            id: drive.id.clone(),
            path: None,
            fd: Some(drive.id.clone()),
        };
        match at {
            Some(i) => overrides.drives[i] = named,
            None => overrides.drives.push(named),
        }
        files.fds.push((drive.id.clone(), OwnedFd::from(file)));
    }
    Ok(files)
}

/// Points every NIC override at the descriptor [`VmActor::jailed_taps`] names for it.
fn jailed_nets(spec: &VmSpec, overrides: &mut RestoreOverrides) {
    for (i, nic) in spec.nics.iter().enumerate() {
        let named = NetOverride {
            id: nic.id.clone(),
            tap: None,
            fd: Some(fd_name(i)),
        };
        match overrides.nets.iter_mut().find(|o| o.id == nic.id) {
            Some(o) => *o = named,
            None => overrides.nets.push(named),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agent-arriving-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn drive_override(id: &str, path: Option<&std::path::Path>) -> DriveOverride {
        DriveOverride {
            id: id.into(),
            path: path.map(PathBuf::from),
            fd: None,
        }
    }

    #[test]
    fn writable_disks_become_descriptors_and_the_rest_mirrors() {
        let dir = scratch("drives");
        let shared = dir.join("shared.img");
        std::fs::write(&shared, b"shared").unwrap();
        let config = VmConfig::from_json(
            &serde_json::json!({
                "boot": {"kernel": "/k"},
                "drives": [
                    {"id": "disk0", "path": "/old/disk0.img", "root": true},
                    {"id": "disk1", "path": "/images/ro.img", "read_only": true},
                    {"id": "disk2", "path": shared, "backing": "/images/base.img"},
                ],
            })
            .to_string(),
        )
        .unwrap();
        let copy = dir.join("disk0.img");
        let mut overrides = RestoreOverrides {
            drives: vec![drive_override("disk0", Some(&copy))],
            ..Default::default()
        };
        let DriveFiles { fds, mirrors } =
            arriving_drives(&config, &mut overrides, ArrivingDisks::Create).unwrap();
        let names: Vec<_> = fds.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["disk0", "disk2"]);
        assert!(copy.is_file(), "the restore's copy is created");
        assert_eq!(
            mirrors,
            [PathBuf::from("/images/ro.img"), PathBuf::from("/images/base.img")]
        );
        let named: Vec<_> = overrides
            .drives
            .iter()
            .map(|o| (o.id.as_str(), o.path.is_none(), o.fd.as_deref()))
            .collect();
        assert_eq!(
            named,
            [("disk0", true, Some("disk0")), ("disk2", true, Some("disk2"))]
        );
        drop(fds);

        // A restore never writes into a file that is there; a migration's files must be there.
        let mut again = RestoreOverrides {
            drives: vec![drive_override("disk0", Some(&copy))],
            ..Default::default()
        };
        let err = arriving_drives(&config, &mut again, ArrivingDisks::Create).unwrap_err();
        assert!(
            err.starts_with(&format!("drive disk0: {}:", copy.display())),
            "{err}"
        );
        let missing = dir.join("missing.img");
        let mut migration = RestoreOverrides {
            drives: vec![drive_override("disk0", Some(&missing))],
            ..Default::default()
        };
        let err = arriving_drives(&config, &mut migration, ArrivingDisks::Existing).unwrap_err();
        assert!(err.contains("missing.img"), "{err}");
        assert!(!missing.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_nic_takes_its_tap_descriptor() {
        let spec = VmSpec {
            nics: vec![
                crate::proto::NicSpec {
                    id: "eth0".into(),
                    ..Default::default()
                },
                crate::proto::NicSpec {
                    id: "eth1".into(),
                    tap: "op0".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut overrides = RestoreOverrides {
            nets: vec![NetOverride {
                id: "eth1".into(),
                tap: Some("op0".into()),
                fd: None,
            }],
            ..Default::default()
        };
        jailed_nets(&spec, &mut overrides);
        let nets: Vec<_> = overrides
            .nets
            .iter()
            .map(|o| (o.id.as_str(), o.tap.as_deref(), o.fd.as_deref()))
            .collect();
        assert_eq!(nets, [("eth1", None, Some("nic1")), ("eth0", None, Some("nic0"))]);
    }
}
