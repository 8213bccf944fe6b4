//! Limits how many guest vCPUs boot at once in one test process.
//!
//! Under `kvm_pvm` a boot with more runnable vCPUs than host cores does not just share the cores: a
//! vCPU that spins on a lock whose holder is descheduled burns its whole time slice, so boots slow
//! down far more than proportionally (RCU stalls, and in one CI run a 4-vCPU and a 1-vCPU boot
//! side by side both missed a 600 s deadline that each meets alone in well under a minute). So
//! [`crate::GuestBuilder::spawn`] takes a permit here, weighted by the guest's vCPUs (at most all
//! cores, so any guest can boot), and the guest gives it back once it has booted.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// A boot that cannot start within this long means permits leak (or a test spawns boots that wait
/// for each other): an error says so instead of hanging the suite.
const MAX_WAIT: Duration = Duration::from_secs(20 * 60);

struct Gate {
    /// vCPUs of the guests booting now.
    booting: Mutex<usize>,
    released: Condvar,
}

static GATE: Gate = Gate {
    booting: Mutex::new(0),
    released: Condvar::new(),
};

fn capacity() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn lock() -> MutexGuard<'static, usize> {
    // The counter is a plain integer, always valid: a panic elsewhere poisons nothing it needs.
    GATE.booting
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The right to boot a guest of some vCPUs; released on drop.
#[derive(Debug)]
pub(crate) struct BootPermit {
    weight: usize,
}

impl BootPermit {
    /// Waits until `vcpus` more booting vCPUs fit on the host's cores.
    pub(crate) fn acquire(vcpus: u32) -> Result<BootPermit> {
        let capacity = capacity();
        let weight = usize::try_from(vcpus).unwrap_or(capacity).clamp(1, capacity);
        let deadline = Instant::now() + MAX_WAIT;
        let mut booting = lock();
        while *booting + weight > capacity {
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "waited {MAX_WAIT:?} for {weight} of {capacity} boot slots ({} in use): \
                     a guest that booted never released its slot",
                    *booting
                );
            }
            booting = GATE
                .released
                .wait_timeout(booting, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        *booting += weight;
        Ok(BootPermit { weight })
    }
}

impl Drop for BootPermit {
    fn drop(&mut self) {
        let mut booting = lock();
        *booting = booting.saturating_sub(self.weight);
        GATE.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    #[test]
    fn a_boot_waits_while_the_cores_are_taken_and_starts_when_a_slot_frees() {
        let all = BootPermit::acquire(u32::MAX).unwrap();
        let (started, observed) = mpsc::channel();
        let waiter = thread::spawn(move || {
            let permit = BootPermit::acquire(1).unwrap();
            started.send(()).unwrap();
            drop(permit);
        });
        assert!(
            observed.recv_timeout(Duration::from_millis(200)).is_err(),
            "booted past a full gate"
        );
        drop(all);
        observed
            .recv_timeout(Duration::from_secs(10))
            .expect("never started");
        waiter.join().unwrap();
        assert_eq!(*lock(), 0);
    }
}
