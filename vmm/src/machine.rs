//! A built VM and what can be done to it while it lives: pause, resume, graceful shutdown, rate
//! limits, counters. The main thread owns it; vCPU threads are driven through [`VcpuSet`].

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use kvm_ioctls::VmFd;
use vmm_api::control::{DriveMetrics, VmState};
use vmm_api::{RateLimiterConfig, VmConfig};

use crate::device_manager::{BlockHandle, KeyboardHandle};
use crate::exit::ExitEvents;
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
    /// The new limits are invalid.
    #[error("drive {drive}: {source}")]
    RateLimiter {
        /// The drive.
        drive: String,
        /// Why.
        source: devices::rate_limiter::RateLimiterError,
    },
    /// The shutdown deadline could not be set.
    #[error("cannot arm the shutdown timer: {0}")]
    Timer(std::io::Error),
}

/// How a graceful shutdown request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownStarted {
    /// False if the guest has disabled its keyboard, so only the deadline will end the VM.
    pub keyboard: bool,
}

/// A VM whose devices and vCPU threads exist.
pub struct Machine {
    config: VmConfig,
    /// The KVM VM; closing it would tear the guest down under the vCPU threads.
    _vm: VmFd,
    vcpus: VcpuSet,
    blocks: Vec<BlockHandle>,
    keyboard: KeyboardHandle,
    exits: Arc<ExitEvents>,
    state: VmState,
    /// When the vCPUs were first resumed.
    started_at: Option<Instant>,
}

impl Machine {
    /// A built VM whose vCPU threads wait, paused, for their first resume.
    pub fn new(
        config: VmConfig,
        vm: VmFd,
        vcpus: VcpuSet,
        blocks: Vec<BlockHandle>,
        keyboard: KeyboardHandle,
        exits: Arc<ExitEvents>,
    ) -> Self {
        Machine {
            config,
            _vm: vm,
            vcpus,
            blocks,
            keyboard,
            exits,
            state: VmState::Paused,
            started_at: None,
        }
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Running or paused.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The drives, in guest order.
    pub fn blocks(&self) -> &[BlockHandle] {
        &self.blocks
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
        for block in &self.blocks {
            lock(block).pause();
        }
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
        if let Err(e) = self.vcpus.command(VcpuCommand::Resume) {
            // Leave it paused: the devices stop again so that nothing moves without the vCPUs.
            if let Err(again) = self.vcpus.command(VcpuCommand::Pause) {
                log::error!("resume failed ({e}), and pausing again failed too: {again}");
            }
            for block in &self.blocks {
                lock(block).pause();
            }
            return Err(e.into());
        }
        self.started_at.get_or_insert_with(Instant::now);
        self.state = VmState::Running;
        Ok(true)
    }

    /// Types Ctrl-Alt-Del on the guest's keyboard (resuming a paused VM first, so that the guest
    /// can react) and stops the VM hard after `timeout` if it has not ended by then.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ShutdownStarted, MachineError> {
        self.resume()?;
        self.exits.stop_after(timeout).map_err(MachineError::Timer)?;
        let keyboard = self
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

    /// Time since the vCPUs first ran.
    pub fn running_for(&self) -> Option<Duration> {
        self.started_at.map(|t| t.elapsed())
    }
}

fn lock(block: &BlockHandle) -> MutexGuard<'_, MmioTransport<Block>> {
    block.lock().unwrap_or_else(|p| p.into_inner())
}
