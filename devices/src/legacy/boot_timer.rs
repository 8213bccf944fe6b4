//! The boot-timer port: the guest writes [`BOOT_TIMER_MAGIC`] once it is up, and the VMM logs how long
//! that took since the process started. Same port and value as Firecracker's, so one guest image serves
//! both.

use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The value the guest writes to signal it has booted.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// One-byte device; the first write of the magic value records the boot time.
pub struct BootTimer {
    process_start: Instant,
    booted_after: Option<Duration>,
    on_boot: Box<dyn FnMut(Duration) + Send>,
}

impl BootTimer {
    /// A timer measuring from `process_start`; `on_boot` runs once, on the first magic write.
    pub fn new(process_start: Instant, on_boot: Box<dyn FnMut(Duration) + Send>) -> Self {
        BootTimer {
            process_start,
            booted_after: None,
            on_boot,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&BOOT_TIMER_MAGIC) && self.booted_after.is_none() {
            let elapsed = self.process_start.elapsed();
            self.booted_after = Some(elapsed);
            (self.on_boot)(elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn fires_once_on_magic_only() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut timer = BootTimer::new(Instant::now(), Box::new(move |d| sink.lock().unwrap().push(d)));
        timer.write(0, &[1]);
        timer.write(0, &[]);
        assert!(seen.lock().unwrap().is_empty());
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
