//! Resident memory of a VMM process, split into guest RAM and the VMM's own overhead, from
//! `/proc/PID/smaps`.

use anyhow::{Context, Result};

/// How to recognise a VMM's guest RAM among its mappings.
///
/// Host kernels without `CONFIG_ANON_VMA_NAME` (such as the kvm_pvm development host) ignore the vmm's
/// mapping names: there [`GuestMapping::Named`] finds nothing, and `LargestAnonAtLeast` is the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMapping<'a> {
    /// Mappings with exactly this name, e.g. `"[anon:vmm-guest-ram]"` (our vmm names its guest RAM
    /// with `PR_SET_VMA_ANON_NAME`; see [`GuestMapping::VMM`]).
    Named(&'a str),
    /// Anonymous mappings (no backing file) at least this many bytes long: QEMU's guest RAM is one
    /// big anonymous mapping.
    LargestAnonAtLeast(u64),
}

impl GuestMapping<'static> {
    /// The guest RAM mappings of our vmm.
    pub const VMM: GuestMapping<'static> = GuestMapping::Named("[anon:vmm-guest-ram]");
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssBreakdown {
    /// Rss summed over all mappings.
    pub total_kib: u64,
    /// Rss of the guest RAM mappings.
    pub guest_kib: u64,
}

impl RssBreakdown {
    /// What the VMM itself costs: total minus guest RAM.
    pub fn overhead_kib(&self) -> u64 {
        self.total_kib.saturating_sub(self.guest_kib)
    }
}

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Permissions, e.g. `rw-p`.
    pub perms: String,
    /// Inode of the backing file; 0 for anonymous memory.
    pub inode: u64,
    /// Path or pseudo name (`[heap]`, `[anon:NAME]`); empty for unnamed anonymous memory.
    pub name: String,
    /// Its `Rss:` in KiB.
    pub rss_kib: u64,
}

impl Mapping {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Plain anonymous memory: no file, and no name other than a user-given `[anon:...]` one.
    pub fn is_anonymous(&self) -> bool {
        self.inode == 0 && (self.name.is_empty() || self.name.starts_with("[anon:"))
    }

    /// Whether `guest` selects this mapping as guest RAM.
    pub fn is_guest(&self, guest: GuestMapping<'_>) -> bool {
        match guest {
            GuestMapping::Named(name) => self.name == name,
            GuestMapping::LargestAnonAtLeast(bytes) => self.is_anonymous() && self.size() >= bytes,
        }
    }
}

/// Reads `/proc/PID/smaps` and splits its resident memory into guest RAM and the rest.
pub fn rss_breakdown(pid: u32, guest: GuestMapping<'_>) -> Result<RssBreakdown> {
    Ok(RssBreakdown::of(&read_smaps(pid)?, guest))
}

/// Reads and parses `/proc/PID/smaps`.
pub fn read_smaps(pid: u32) -> Result<Vec<Mapping>> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    Ok(parse_smaps(&text))
}

impl RssBreakdown {
    /// Splits the Rss of `mappings` (from [`read_smaps`]) into guest RAM and the rest.
    pub fn of(mappings: &[Mapping], guest: GuestMapping<'_>) -> RssBreakdown {
        RssBreakdown {
            total_kib: mappings.iter().map(|m| m.rss_kib).sum(),
            guest_kib: mappings
                .iter()
                .filter(|m| m.is_guest(guest))
                .map(|m| m.rss_kib)
                .sum(),
        }
    }
}

/// Parses the text of a `/proc/PID/smaps` file. Lines it does not understand are skipped.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(mapping) = parse_header(line) {
            mappings.push(mapping);
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let kib = rest.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if let Some(last) = mappings.last_mut() {
                last.rss_kib = kib;
            }
        }
    }
    mappings
}

/// Parses `start-end perms offset dev inode [name]`; `None` for any other line.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut fields = [""; 5];
    for field in &mut fields {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        *field = &rest[..end];
        rest = &rest[end..];
    }
    let [range, perms, _offset, dev, inode] = fields;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if perms.len() != 4 || !dev.contains(':') {
        return None;
    }
    Some(Mapping {
        start,
        end,
        perms: perms.to_string(),
        inode: inode.parse().ok()?,
        name: rest.trim().to_string(),
        rss_kib: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "\
55d0c0a00000-55d0c0a2c000 r--p 00000000 08:01 1312   /usr/bin/vmm with space
Size:                176 kB
Rss:                 172 kB
Pss:                 172 kB
VmFlags: rd mr mw me sd
55d0c2000000-55d0c2021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  40 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0                          [anon:vmm-guest-ram]
Size:             131072 kB
KernelPageSize:        4 kB
Rss:               20480 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0                          [anon:vmm-guest-ram]
Size:               1024 kB
Rss:                1000 kB
7f2000000000-7f2008200000 rw-p 00000000 00:00 0 
Size:             133120 kB
Rss:               30000 kB
7f3000000000-7f3000021000 rw-p 00000000 00:00 0 
Size:                132 kB
Rss:                   8 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  12 kB
";

    #[test]
    fn parses_mappings() {
        let maps = parse_smaps(FIXTURE);
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[0].name, "/usr/bin/vmm with space");
        assert_eq!(maps[0].inode, 1312);
        assert_eq!(maps[0].rss_kib, 172);
        assert!(!maps[0].is_anonymous());
        assert_eq!(maps[1].name, "[heap]");
        assert!(!maps[1].is_anonymous());
        assert_eq!(maps[2].size(), 128 << 20);
        assert!(maps[2].is_anonymous());
        assert_eq!(maps[4].name, "");
        assert!(maps[4].is_anonymous());
    }

    #[test]
    fn splits_named_guest_ram() {
        let b = RssBreakdown::of(&parse_smaps(FIXTURE), GuestMapping::VMM);
        assert_eq!(b.total_kib, 172 + 40 + 20480 + 1000 + 30000 + 8 + 12);
        assert_eq!(b.guest_kib, 21480);
        assert_eq!(b.overhead_kib(), 172 + 40 + 30000 + 8 + 12);
    }

    #[test]
    fn splits_large_anonymous_guest_ram() {
        let b = RssBreakdown::of(&parse_smaps(FIXTURE), GuestMapping::LargestAnonAtLeast(128 << 20));
        // Both the named 128 MiB mapping and the unnamed 130 MiB one are anonymous and large enough.
        assert_eq!(b.guest_kib, 20480 + 30000);
        let b = RssBreakdown::of(&parse_smaps(FIXTURE), GuestMapping::LargestAnonAtLeast(130 << 20));
        assert_eq!(b.guest_kib, 30000);
    }

    #[test]
    fn reads_own_smaps() {
        let b = rss_breakdown(std::process::id(), GuestMapping::LargestAnonAtLeast(u64::MAX)).unwrap();
        assert!(b.total_kib > 0);
        assert_eq!(b.guest_kib, 0);
    }
}
