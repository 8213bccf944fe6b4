//! A built VM and what can be done to it while it lives: pause, resume, graceful shutdown, rate
//! limits, counters. The main thread owns it; vCPU threads are driven through [`VcpuSet`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_api::balloon::{BalloonInfo, BalloonUpdate};
use vmm_api::control::{DriveMetrics, NetMetrics, VmState};
use vmm_api::{RateLimiterConfig, VmConfig};

use crate::device_manager::{BalloonHandle, BlockHandle, LegacyHandles, NetHandle};
use crate::exit::ExitEvents;
use crate::persist::memory::Backing;
use crate::sync::lock;
use crate::vstate::vcpu_control::{VcpuCommand, VcpuControlError, VcpuSet};

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The vCPUs did not follow.
    #[error(transparent)]
    Vcpus(#[from] VcpuControlError),
    /// No drive has that id.
    #[error("no drive {0:?}")]
    NoSuchDrive(String),
    /// No NIC has that id.
    #[error("no NIC {0:?}")]
    NoSuchNet(String),
    /// The new limits are invalid.
    #[error("{drive}: {source}")]
    RateLimiter {
        /// The drive or NIC.
        drive: String,
        /// Why.
        source: devices::rate_limiter::RateLimiterError,
    },
    /// The shutdown deadline could not be set.
    #[error("cannot arm the shutdown timer: {0}")]
    Timer(std::io::Error),
    /// The VM has no balloon.
    #[error("the VM has no balloon (machine.balloon)")]
    NoBalloon,
    /// A balloon update the balloon cannot take.
    #[error("balloon: {0}")]
    BalloonUpdate(String),
}

/// How a graceful shutdown request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownStarted {
    /// False if the guest has disabled its keyboard, so only the deadline will end the VM.
    pub keyboard: bool,
}

/// The devices a running VM is driven through.
pub struct MachineDevices {
    /// The drives, in guest order.
    pub blocks: Vec<BlockHandle>,
    /// The NICs, in guest order.
    pub nets: Vec<NetHandle>,
    /// The balloon, if configured.
    pub balloon: Option<BalloonHandle>,
    /// The serial console, keyboard controller (graceful shutdown) and RTC.
    pub legacy: LegacyHandles,
}

/// The KVM VM and its memory.
pub struct KvmParts {
    /// The VM; closing it would tear the guest down under the vCPU threads.
    pub vm: VmFd,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// How guest memory is backed.
    pub backing: Backing,
    /// What devices wrote, if the VM tracks dirty pages.
    pub dirty: Option<Arc<devices::virtio::dirty::DirtyPages>>,
    /// The snapshot a diff would build on: the last one taken, or the one restored from.
    pub last_snapshot: Option<std::path::PathBuf>,
}

/// A VM whose devices and vCPU threads exist.
pub struct Machine {
    config: VmConfig,
    /// The configuration with host paths when `config` has in-jail ones.
    host_config: Option<VmConfig>,
    kvm: KvmParts,
    vcpus: VcpuSet,
    blocks: Vec<BlockHandle>,
    nets: Vec<NetHandle>,
    balloon: Option<BalloonHandle>,
    legacy: LegacyHandles,
    exits: Arc<ExitEvents>,
    state: VmState,
    /// When the vCPUs were first resumed.
    started_at: Option<Instant>,
}

impl Machine {
    /// A built VM whose vCPU threads wait, paused, for their first resume.
    pub fn new(
        config: VmConfig,
        kvm: KvmParts,
        vcpus: VcpuSet,
        devices: MachineDevices,
        exits: Arc<ExitEvents>,
    ) -> Self {
        Machine {
            config,
            host_config: None,
            kvm,
            vcpus,
            blocks: devices.blocks,
            nets: devices.nets,
            balloon: devices.balloon,
            legacy: devices.legacy,
            exits,
            state: VmState::Paused,
            started_at: None,
        }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The configuration that snapshots and outgoing migrations record, for a VMM outside this
    /// one's jail to restore: the one it was built from, or for a jailed VMM the one its caller
    /// gave, since the jail's own names in-jail paths (`/drives/root`) that mean nothing elsewhere.
    pub fn recorded_config(&self) -> &VmConfig {
        self.host_config.as_ref().unwrap_or(&self.config)
    }

    /// Gives a jailed VM the configuration with host paths that [`Machine::recorded_config`]
    /// returns.
    pub fn set_host_config(&mut self, host_config: Option<VmConfig>) {
        self.host_config = host_config;
    }

    /// Running or paused.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The drives, in guest order.
    pub fn blocks(&self) -> &[BlockHandle] {
        &self.blocks
    }

    /// The NICs, in guest order.
    pub fn nets(&self) -> &[NetHandle] {
        &self.nets
    }

    /// Has every NIC announce the guest's MAC on its tap (after a live migration brought the VM
    /// here, so that bridges learn where it is now). Failures are logged: the guest runs either way.
    pub fn announce_nics(&self) {
        for handle in &self.nets {
            let mut transport = lock(handle);
            let net = transport.device_mut();
            if let Err(e) = net.announce(3) {
                log::warn!("NIC {}: cannot announce the guest's MAC: {e}", net.id());
            }
        }
    }

    /// The balloon, if configured.
    pub fn balloon(&self) -> Option<&BalloonHandle> {
        self.balloon.as_ref()
    }

    /// The serial console, keyboard controller and RTC.
    pub fn legacy(&self) -> &LegacyHandles {
        &self.legacy
    }

    /// The KVM VM and guest memory.
    pub fn kvm(&self) -> &KvmParts {
        &self.kvm
    }

    /// Records the snapshot the next diff builds on.
    pub fn set_last_snapshot(&mut self, dir: std::path::PathBuf) {
        self.kvm.last_snapshot = Some(dir);
    }

    /// Kicks the running vCPUs out of the guest, for the throttle to hold them back.
    pub fn kick_vcpus(&mut self) {
        self.vcpus.kick_running();
    }

    /// The state of every vCPU (they must be paused).
    pub fn save_vcpus(&mut self) -> Result<Vec<crate::vstate::vcpu_state::VcpuState>, MachineError> {
        Ok(self.vcpus.save_states()?)
    }

    /// Stops the vCPUs, then the devices (which finish what is in flight). False if it was paused.
    pub fn pause(&mut self) -> Result<bool, MachineError> {
        if self.state == VmState::Paused {
            return Ok(false);
        }
        if let Err(e) = self.vcpus.command(VcpuCommand::Pause) {
            // Some vCPUs may have stopped: let them all run again rather than half-pause the VM.
            if let Err(again) = self.vcpus.command(VcpuCommand::Resume) {
                log::error!("pause failed ({e}), and resuming failed too: {again}");
            }
            return Err(e.into());
        }
        self.pause_devices();
        self.state = VmState::Paused;
        Ok(true)
    }

    /// Restarts the devices, then the vCPUs. False if it was running.
    pub fn resume(&mut self) -> Result<bool, MachineError> {
        if self.state == VmState::Running {
            return Ok(false);
        }
        for block in &self.blocks {
            lock(block).resume();
        }
        for net in &self.nets {
            lock(net).resume();
        }
        if let Some(balloon) = &self.balloon {
            lock(balloon).resume();
        }
        if let Err(e) = self.vcpus.command(VcpuCommand::Resume) {
            // Leave it paused: the devices stop again so that nothing moves without the vCPUs.
            if let Err(again) = self.vcpus.command(VcpuCommand::Pause) {
                log::error!("resume failed ({e}), and pausing again failed too: {again}");
            }
            self.pause_devices();
            return Err(e.into());
        }
        self.started_at.get_or_insert_with(Instant::now);
        self.state = VmState::Running;
        Ok(true)
    }

    fn pause_devices(&self) {
        for block in &self.blocks {
            lock(block).pause();
        }
        for net in &self.nets {
            lock(net).pause();
        }
        if let Some(balloon) = &self.balloon {
            lock(balloon).pause();
        }
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard (resuming a paused VM first, so that the guest
    /// can react) and stops the VM hard after `timeout` if it has not ended by then.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ShutdownStarted, MachineError> {
        self.resume()?;
        self.exits.stop_after(timeout).map_err(MachineError::Timer)?;
        let keyboard = self
            .legacy
            .keyboard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ctrl_alt_del();
        Ok(ShutdownStarted { keyboard })
    }

    /// Replaces a drive's rate limits.
    pub fn update_rate_limiter(&self, drive: &str, limits: &RateLimiterConfig) -> Result<(), MachineError> {
        let block = self
            .blocks
            .iter()
            .find(|b| lock(b).device().id() == drive)
            .ok_or_else(|| MachineError::NoSuchDrive(drive.to_string()))?;
        lock(block)
            .device_mut()
            .update_rate_limiter(limits)
            .map_err(|source| MachineError::RateLimiter {
                drive: drive.to_string(),
                source,
            })
    }

    /// Replaces a NIC's rate limits (a `None` direction keeps its limits).
    pub fn update_net_rate_limiters(
        &self,
        net: &str,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> Result<(), MachineError> {
        let nic = self
            .nets
            .iter()
            .find(|n| lock(n).device().id() == net)
            .ok_or_else(|| MachineError::NoSuchNet(net.to_string()))?;
        lock(nic)
            .device_mut()
            .update_rate_limiters(rx, tx)
            .map_err(|source| MachineError::RateLimiter {
                drive: net.to_string(),
                source,
            })
    }

    /// Changes the balloon's target and/or statistics interval, and tells the guest.
    pub fn update_balloon(&self, update: &BalloonUpdate) -> Result<(), MachineError> {
        let balloon = self.balloon.as_ref().ok_or(MachineError::NoBalloon)?;
        if update.amount_mib.is_none() && update.stats_interval_s.is_none() {
            return Err(MachineError::BalloonUpdate(
                "give amount_mib and/or stats_interval_s".into(),
            ));
        }
        let mut transport = lock(balloon);
        if let Some(seconds) = update.stats_interval_s {
            transport
                .device_mut()
                .set_stats_interval(seconds)
                .map_err(|e| MachineError::BalloonUpdate(e.to_string()))?;
        }
        if let Some(mib) = update.amount_mib {
            vmm_api::balloon::check_amount("amount_mib", mib, self.config.machine.memory_mib)
                .map_err(|e| MachineError::BalloonUpdate(e.to_string()))?;
            transport
                .device_mut()
                .set_target_pages(vmm_api::balloon::mib_to_pages(mib));
            transport.notify_config_change();
        }
        Ok(())
    }

    /// The balloon's target, size, the guest's statistics and the device's counters.
    pub fn balloon_info(&self) -> Option<BalloonInfo> {
        self.balloon.as_ref().map(|b| lock(b).device().info())
    }

    /// Counters of every NIC, in guest order.
    pub fn net_metrics(&self) -> Vec<NetMetrics> {
        self.nets
            .iter()
            .map(|n| {
                let transport = lock(n);
                let m = transport.device().metrics().snapshot();
                NetMetrics {
                    id: transport.device().id().to_string(),
                    rx_frames: m.rx_frames,
                    rx_bytes: m.rx_bytes,
                    rx_coalesced: m.rx_coalesced,
                    tx_frames: m.tx_frames,
                    tx_bytes: m.tx_bytes,
                    dropped: m.dropped(),
                    rx_no_buffers: m.rx_no_buffers,
                    throttled: m.throttled(),
                    interrupts: m.interrupts,
                }
            })
            .collect()
    }

    /// Counters of every drive, in guest order.
    pub fn drive_metrics(&self) -> Vec<DriveMetrics> {
        self.blocks
            .iter()
            .map(|b| {
                let transport = lock(b);
                let m = transport.device().metrics().snapshot();
                DriveMetrics {
                    id: transport.device().id().to_string(),
                    reads: m.reads,
                    writes: m.writes,
                    flushes: m.flushes,
                    discards: m.discards,
                    read_bytes: m.read_bytes,
                    write_bytes: m.write_bytes,
                    invalid_requests: m.invalid_requests,
                    io_errors: m.io_errors,
                    throttled: m.throttled,
                    interrupts: m.interrupts,
                }
            })
            .collect()
    }

    /// Logs each drive's counters (at `info`): what the VM did, for whoever runs the VMM by hand.
    pub fn log_device_counters(&self) {
        for block in &self.blocks {
            let transport = lock(block);
            let m = transport.device().metrics().snapshot();
            log::info!(
                "drive {}: reads={} writes={} flushes={} discards={} get_ids={} read_bytes={} \
                 write_bytes={} invalid_requests={} io_errors={} throttled={} queue_events={} interrupts={}",
                transport.device().id(),
                m.reads,
                m.writes,
                m.flushes,
                m.discards,
                m.get_ids,
                m.read_bytes,
                m.write_bytes,
                m.invalid_requests,
                m.io_errors,
                m.throttled,
                m.queue_events,
                m.interrupts
            );
        }
    }

    /// Logs each NIC's counters (at `info`).
    pub fn log_net_counters(&self) {
        for m in self.net_metrics() {
            log::info!(
                "NIC {}: rx_frames={} rx_bytes={} rx_coalesced={} tx_frames={} tx_bytes={} dropped={} \
                 rx_no_buffers={} throttled={} interrupts={}",
                m.id,
                m.rx_frames,
                m.rx_bytes,
                m.rx_coalesced,
                m.tx_frames,
                m.tx_bytes,
                m.dropped,
                m.rx_no_buffers,
                m.throttled,
                m.interrupts
            );
        }
    }

    /// Time since the vCPUs first ran.
    pub fn running_for(&self) -> Option<Duration> {
        self.started_at.map(|t| t.elapsed())
    }
}
