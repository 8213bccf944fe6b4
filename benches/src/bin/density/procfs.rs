//! What the benchmark reads from /proc: memory of the host and of each process, CPU times, and
//! which processes belong to a directory of ours.

use serde_json::{json, Value};

/// `/proc/PID/stat` and `/proc/stat` count in USER_HZ, 100 on every Linux ABI we run on.
pub const USER_HZ: f64 = 100.0;

/// A `/proc/meminfo` field in KiB.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn mem_available_kib() -> u64 {
    meminfo_kib("MemAvailable").unwrap_or(0)
}

/// A process's memory from `/proc/PID/smaps_rollup`, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rollup {
    pub rss: u64,
    pub pss: u64,
    pub pss_anon: u64,
    pub pss_file: u64,
}

pub fn rollup(pid: u32) -> Option<Rollup> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(parse_rollup(&text))
}

fn kib_field(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    rest.split_whitespace().next()?.parse().ok()
}

fn parse_rollup(text: &str) -> Rollup {
    let mut r = Rollup::default();
    for line in text.lines() {
        if let Some(v) = kib_field(line, "Rss") {
            r.rss = v;
        } else if let Some(v) = kib_field(line, "Pss") {
            r.pss = v;
        } else if let Some(v) = kib_field(line, "Pss_Anon") {
            r.pss_anon = v;
        } else if let Some(v) = kib_field(line, "Pss_File") {
            r.pss_file = v;
        }
    }
    r
}

/// A vmm's PSS split into guest RAM and everything else (the VMM's own cost), KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PssSplit {
    pub total: u64,
    pub guest: u64,
    pub rss: u64,
}

impl PssSplit {
    pub fn overhead(&self) -> u64 {
        self.total.saturating_sub(self.guest)
    }

    pub fn to_json(self) -> Value {
        json!({"pss_kib": self.total, "guest_pss_kib": self.guest,
               "overhead_pss_kib": self.overhead(), "rss_kib": self.rss})
    }
}

/// How guest RAM shows in a vmm's smaps: a booted VM's is anonymous memory (named
/// `[anon:vmm-guest-ram]` where the host kernel keeps names, else at least as large as the guest),
/// a clone's a private mapping of the snapshot's memory file.
#[derive(Debug, Clone)]
pub struct GuestRam {
    pub memory_bytes: u64,
    /// Mappings of files under this directory are guest RAM (clones).
    pub snapshot_dir: Option<String>,
}

impl GuestRam {
    fn is_guest(&self, start: u64, end: u64, inode: u64, name: &str) -> bool {
        if name == "[anon:vmm-guest-ram]" {
            return true;
        }
        if let Some(dir) = &self.snapshot_dir {
            if name.starts_with(dir.as_str()) {
                return true;
            }
        }
        let anonymous = inode == 0 && (name.is_empty() || name.starts_with("[anon:"));
        anonymous && end.saturating_sub(start) >= self.memory_bytes
    }

    pub fn split(&self, pid: u32) -> Option<PssSplit> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        Some(self.split_text(&text))
    }

    fn split_text(&self, text: &str) -> PssSplit {
        let mut out = PssSplit::default();
        let mut in_guest = false;
        for line in text.lines() {
            if let Some((start, end, inode, name)) = mapping_header(line) {
                in_guest = self.is_guest(start, end, inode, name);
            } else if let Some(v) = kib_field(line, "Pss") {
                out.total += v;
                if in_guest {
                    out.guest += v;
                }
            } else if let Some(v) = kib_field(line, "Rss") {
                out.rss += v;
            }
        }
        out
    }
}

/// `start-end perms offset dev inode [name]` of an smaps mapping header.
fn mapping_header(line: &str) -> Option<(u64, u64, u64, &str)> {
    let mut parts = line.splitn(6, ' ');
    let range = parts.next()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let _perms = parts.next()?;
    let _offset = parts.next()?;
    let dev = parts.next()?;
    if !dev.contains(':') {
        return None;
    }
    let inode = parts.next()?.parse().ok()?;
    Some((start, end, inode, parts.next().unwrap_or("").trim()))
}

/// utime + stime of a whole process, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The host's (busy, total) ticks over all CPUs, from the first line of `/proc/stat`.
pub fn host_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

pub use benches::procs::{alive, processes_under};

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/vmm
Rss:                 800 kB
Pss:                 400 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Rss:               20000 kB
Pss:               20000 kB
7f1000000000-7f1008000000 rw-p 00000000 08:01 99 /tmp/d/snapshots/s/memory
Rss:                3000 kB
Pss:                 100 kB
7f2000000000-7f2000021000 rw-p 00000000 00:00 0 [heap]
Rss:                 132 kB
Pss:                 132 kB
";

    #[test]
    fn splits_guest_ram_off() {
        let boot = GuestRam {
            memory_bytes: 128 << 20,
            snapshot_dir: None,
        };
        assert_eq!(
            boot.split_text(SMAPS),
            PssSplit {
                total: 20632,
                guest: 20000,
                rss: 23932
            }
        );
        let clone = GuestRam {
            memory_bytes: 1 << 40,
            snapshot_dir: Some("/tmp/d/snapshots/".into()),
        };
        let s = clone.split_text(SMAPS);
        assert_eq!((s.guest, s.overhead()), (100, 20532));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let r = rollup(me).unwrap();
        assert!(r.pss > 0 && r.rss >= r.pss_anon);
        assert!(parse_rollup("Rss: 5 kB\nPss: 3 kB\nPss_Anon: 2 kB\nPss_File: 1 kB\n").pss_file == 1);
        assert!(cpu_ticks(me).is_some());
        let (busy, total) = host_ticks().unwrap();
        assert!(total > busy);
        assert!(mem_available_kib() > 0);
        assert!(alive(me) && !alive(u32::MAX));
    }
}
