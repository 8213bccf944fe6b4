//! How a VM ends, and the main-loop subscriber that learns it.
//!
//! Devices (i8042, ACPI power management, pvpanic) and vCPUs raise eventfds; the main thread's
//! event-manager loop watches them and decides the outcome. When several arrive together the most
//! severe wins: a panic is reported even if the guest then reboots (`panic=1`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// Why the VM stopped. Ordered by severity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmExit {
    /// The VM moved to another VMM (live migration committed).
    Migrated,
    /// A control-socket client stopped the VM.
    Stopped,
    /// A graceful shutdown was asked for and the guest did not end in time: stopped hard.
    ShutdownTimedOut,
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot); the VMM exits like on power off.
    Reset,
    /// The guest kernel panicked.
    GuestPanic,
    /// A vCPU hit something it cannot continue from (triple fault, emulation failure, KVM error).
    VcpuFault(String),
}

impl VmExit {
    /// The process exit code: 0 for a guest that shut down cleanly, non-zero for a failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Migrated
            | VmExit::Stopped
            | VmExit::ShutdownTimedOut
            | VmExit::PowerOff
            | VmExit::Reset => 0,
            VmExit::GuestPanic => 2,
            VmExit::VcpuFault(_) => 3,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Migrated => write!(f, "migrated to another VMM"),
            VmExit::Stopped => write!(f, "stopped by a control request"),
            VmExit::ShutdownTimedOut => write!(f, "the guest did not shut down in time: stopped"),
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest requested a reset"),
            VmExit::GuestPanic => write!(f, "guest kernel panicked"),
            VmExit::VcpuFault(why) => write!(f, "{why}"),
        }
    }
}

/// The eventfds through which a VM's end is signalled, shared by devices, vCPUs and the main loop.
pub struct ExitEvents {
    /// Raised by the ACPI sleep control register (S5) or a KVM shutdown system event.
    pub power_off: EventFd,
    /// Raised by the i8042 CPU reset line, the ACPI reset register or a KVM reset system event.
    pub reset: EventFd,
    /// Raised by pvpanic or a KVM crash system event.
    pub panic: EventFd,
    /// Raised by the control socket's `stop`.
    pub stop: EventFd,
    /// Raised once a live migration has handed the VM over.
    pub migrated: EventFd,
    /// Fires when a graceful shutdown has taken too long.
    shutdown_timer: Mutex<TimerFd>,
    shutdown_timer_fd: RawFd,
    fault: EventFd,
    fault_reasons: Mutex<Vec<String>>,
}

impl ExitEvents {
    /// Fresh, unsignalled events.
    pub fn new() -> std::io::Result<Arc<Self>> {
        let shutdown_timer = TimerFd::new().map_err(std::io::Error::from)?;
        Ok(Arc::new(ExitEvents {
            power_off: EventFd::new(EFD_NONBLOCK)?,
            reset: EventFd::new(EFD_NONBLOCK)?,
            panic: EventFd::new(EFD_NONBLOCK)?,
            stop: EventFd::new(EFD_NONBLOCK)?,
            migrated: EventFd::new(EFD_NONBLOCK)?,
            shutdown_timer_fd: shutdown_timer.as_raw_fd(),
            shutdown_timer: Mutex::new(shutdown_timer),
            fault: EventFd::new(EFD_NONBLOCK)?,
            fault_reasons: Mutex::new(Vec::new()),
        }))
    }

    /// Stops the VM hard after `timeout` unless it ends before (a graceful shutdown's deadline).
    /// A later call moves the deadline.
    pub fn stop_after(&self, timeout: Duration) -> std::io::Result<()> {
        let mut timer = self.shutdown_timer.lock().unwrap_or_else(|p| p.into_inner());
        // A zero duration would disarm the timer.
        timer
            .reset(timeout.max(Duration::from_nanos(1)), None)
            .map_err(std::io::Error::from)
    }

    /// Reports a vCPU failure.
    pub fn vcpu_fault(&self, reason: String) {
        self.fault_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reason);
        if let Err(e) = self.fault.write(1) {
            log::error!("cannot signal vCPU fault: {e}");
        }
    }

    /// Raises `evt`, logging (only) if that fails: the counter can only be saturated, which still
    /// leaves it readable, so the loop wakes anyway.
    pub fn raise(evt: &EventFd) {
        if let Err(e) = evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }
}

/// Main-loop subscriber recording the most severe exit seen.
pub struct ExitWatcher {
    events: Arc<ExitEvents>,
    outcome: Option<VmExit>,
}

impl ExitWatcher {
    /// Watches `events`.
    pub fn new(events: Arc<ExitEvents>) -> Self {
        ExitWatcher {
            events,
            outcome: None,
        }
    }

    /// The outcome so far, if the VM has ended.
    pub fn outcome(&self) -> Option<&VmExit> {
        self.outcome.as_ref()
    }

    fn record(&mut self, exit: VmExit) {
        if self.outcome.as_ref().is_none_or(|current| exit > *current) {
            self.outcome = Some(exit);
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let ev = Arc::clone(&self.events);
        let drained = |evt: &EventFd| evt.read().is_ok();
        if fd == ev.power_off.as_raw_fd() && drained(&ev.power_off) {
            self.record(VmExit::PowerOff);
        } else if fd == ev.reset.as_raw_fd() && drained(&ev.reset) {
            self.record(VmExit::Reset);
        } else if fd == ev.panic.as_raw_fd() && drained(&ev.panic) {
            self.record(VmExit::GuestPanic);
        } else if fd == ev.stop.as_raw_fd() && drained(&ev.stop) {
            self.record(VmExit::Stopped);
        } else if fd == ev.migrated.as_raw_fd() && drained(&ev.migrated) {
            self.record(VmExit::Migrated);
        } else if fd == ev.shutdown_timer_fd {
            let expired = ev
                .shutdown_timer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .wait()
                .is_ok_and(|n| n > 0);
            if expired {
                self.record(VmExit::ShutdownTimedOut);
            }
        } else if fd == ev.fault.as_raw_fd() && drained(&ev.fault) {
            let reasons = std::mem::take(&mut *ev.fault_reasons.lock().unwrap_or_else(|p| p.into_inner()));
            for reason in reasons {
                self.record(VmExit::VcpuFault(reason));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in [
            &self.events.power_off,
            &self.events.reset,
            &self.events.panic,
            &self.events.stop,
            &self.events.migrated,
            &self.events.fault,
        ] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("cannot watch exit event: {e:?}");
            }
        }
        let timer = self.events.shutdown_timer_fd;
        if let Err(e) = ops.add(Events::with_data_raw(timer, timer as u32, EventSet::IN)) {
            log::error!("cannot watch the shutdown timer: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_severe_exit_wins() {
        let mut w = ExitWatcher::new(ExitEvents::new().unwrap());
        w.record(VmExit::Reset);
        w.record(VmExit::GuestPanic);
        w.record(VmExit::PowerOff);
        assert_eq!(w.outcome(), Some(&VmExit::GuestPanic));
        assert_eq!(VmExit::PowerOff.exit_code(), 0);
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_ne!(VmExit::GuestPanic.exit_code(), 0);
        assert_ne!(VmExit::VcpuFault("x".into()).exit_code(), 0);
        assert_eq!(VmExit::ShutdownTimedOut.exit_code(), 0);
    }

    #[test]
    fn a_shutdown_that_takes_too_long_ends_in_a_hard_stop() {
        use event_manager::{EventManager, SubscriberOps};
        let events = ExitEvents::new().unwrap();
        let watcher = Arc::new(Mutex::new(ExitWatcher::new(Arc::clone(&events))));
        let mut manager = EventManager::<Arc<Mutex<ExitWatcher>>>::new().unwrap();
        manager.add_subscriber(watcher.clone());
        events.stop_after(Duration::from_secs(3600)).unwrap();
        // A later deadline replaces the first.
        events.stop_after(Duration::from_millis(20)).unwrap();
        while watcher.lock().unwrap().outcome().is_none() {
            manager.run_with_timeout(5000).unwrap();
        }
        assert_eq!(watcher.lock().unwrap().outcome(), Some(&VmExit::ShutdownTimedOut));
        // A more severe outcome arriving later still wins.
        ExitEvents::raise(&events.panic);
        manager.run_with_timeout(5000).unwrap();
        assert_eq!(watcher.lock().unwrap().outcome(), Some(&VmExit::GuestPanic));
    }
}
