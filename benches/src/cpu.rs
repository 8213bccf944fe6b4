//! Host CPU accounting of a VMM process from `/proc/PID/stat` and its threads' `/proc/PID/task/*/stat`.

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

/// Clock ticks per second of `/proc/PID/stat` times: USER_HZ, 100 on every Linux ABI we run on.
const USER_HZ: f64 = 100.0;

/// CPU times of a process from `/proc/PID/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// utime of the whole process (all threads, exited ones included).
    pub user: u64,
    /// stime of the whole process.
    pub system: u64,
    /// Time spent running a guest (also counted in `user`), where the host kernel accounts it (not on
    /// kvm_pvm hosts, where it is 0 and the guest's time shows up as `system`).
    pub guest: u64,
    /// utime + stime of the live vCPU threads: threads whose name contains "cpu" in any case (vmm's
    /// `vcpu0`, QEMU's `CPU 0/KVM`).
    pub vcpu: u64,
}

/// The command name (field 2) of a `/proc/.../stat` text.
fn stat_comm(stat: &str) -> &str {
    match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => &stat[a + 1..b],
        _ => "",
    }
}

impl CpuTicks {
    /// Parses the text of `/proc/PID/stat`: fields 14 (utime), 15 (stime) and 43 (guest_time).
    /// `vcpu` is left 0.
    fn parse(stat: &str) -> Result<CpuTicks> {
        // The command name (field 2) is in parentheses and may contain spaces: count from after it.
        let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("no ')' in stat"))? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `fields[0]` is field 3 (state).
        let field = |n: usize| -> Result<u64> {
            fields
                .get(n - 3)
                .ok_or_else(|| anyhow!("stat has no field {n}"))?
                .parse()
                .with_context(|| format!("stat field {n}"))
        };
        Ok(CpuTicks {
            user: field(14)?,
            system: field(15)?,
            guest: field(43).unwrap_or(0),
            vcpu: 0,
        })
    }

    /// The process's times plus those of its vCPU threads (`/proc/PID/task/*/stat`).
    pub fn read(pid: u32) -> Result<CpuTicks> {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let mut ticks = Self::parse(&text)?;
        let tasks = format!("/proc/{pid}/task");
        for entry in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
            // A thread may exit between listing and reading: skip it.
            let Ok(text) = std::fs::read_to_string(entry?.path().join("stat")) else {
                continue;
            };
            if stat_comm(&text).to_ascii_lowercase().contains("cpu") {
                let t = Self::parse(&text)?;
                ticks.vcpu += t.user + t.system;
            }
        }
        Ok(ticks)
    }

    /// `self - earlier` as milliseconds.
    pub fn since(&self, earlier: &CpuTicks) -> CpuMs {
        let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 * 1000.0 / USER_HZ;
        CpuMs {
            user: ms(self.user, earlier.user),
            system: ms(self.system, earlier.system),
            guest: ms(self.guest, earlier.guest),
            vcpu: Some(ms(self.vcpu, earlier.vcpu)),
        }
    }
}

/// CPU time in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuMs {
    /// User time.
    pub user: f64,
    /// System time.
    pub system: f64,
    /// Guest time (part of `user`).
    pub guest: f64,
    /// The vCPU threads' part of `user + system` (VMMs only).
    pub vcpu: Option<f64>,
}

impl CpuMs {
    /// User plus system time.
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// What the VMM's other threads (device emulation, I/O, main loop) used.
    pub fn non_vcpu(&self) -> Option<f64> {
        self.vcpu.map(|v| (self.total() - v).max(0.0))
    }

    /// As JSON, every part in milliseconds.
    pub fn to_json(self) -> Value {
        json!({
            "user_ms": self.user,
            "system_ms": self.system,
            "guest_ms": self.guest,
            "total_ms": self.total(),
            "vcpu_threads_ms": self.vcpu,
            "other_threads_ms": self.non_vcpu(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "S".into();
        let stat = format!("1234 (qemu system) {}", fields.join(" "));
        let t = CpuTicks::parse(&stat).unwrap();
        assert_eq!(
            t,
            CpuTicks {
                user: 14,
                system: 15,
                guest: 43,
                vcpu: 0
            }
        );
        assert_eq!(stat_comm(&stat), "qemu system");
        assert_eq!(stat_comm("1 (CPU 0/KVM) S"), "CPU 0/KVM");
        let later = CpuTicks {
            user: 114,
            system: 65,
            guest: 43,
            vcpu: 100,
        };
        let d = later.since(&t);
        assert_eq!(
            (d.user, d.system, d.guest, d.total()),
            (1000.0, 500.0, 0.0, 1500.0)
        );
        assert_eq!((d.vcpu, d.non_vcpu()), (Some(1000.0), Some(500.0)));
        assert!(CpuTicks::parse("1 (x) S 1 2").is_err());
        // A process without vCPU threads (not this one: test threads are named after their test, and
        // this module's name contains "cpu").
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let ticks = CpuTicks::read(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(ticks.unwrap().vcpu, 0);
        assert!(CpuTicks::read(u32::MAX).is_err());
    }
}
