//! Talking to the in-kernel guest probe: its command line and the facts it prints.

use std::collections::HashMap;

/// The guest kernel command line that runs the probe with `actions` (e.g. `"poweroff"`):
/// `console=ttyS0 quiet pci=off vmmprobe.action=<actions>`. `pci=off` because the guest kernel has
/// PCI only for ACPI's sake and the VMM has no PCI bus to probe. The vmm appends host-specific
/// workaround arguments itself.
pub fn probe_cmdline(actions: &str) -> String {
    format!("console=ttyS0 quiet pci=off vmmprobe.action={actions}")
}

/// The `key=value` fields of the first probe line containing `vmmprobe: <prefix>` (e.g.
/// `"blk-write dev=vdb"`), or `None` if there is none.
pub fn find_probe_fields(stdout: &str, prefix: &str) -> Option<HashMap<String, String>> {
    let marker = format!("vmmprobe: {prefix}");
    let line = stdout.lines().find(|l| l.contains(&marker))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The value of every complete `vmmprobe: counter=N` line of `guest` so far, in order (the
/// probe's `counter` action: a guest that continues after a pause, restore or migration goes on
/// from where it was).
pub fn probe_counters(guest: &crate::Guest) -> Vec<u64> {
    guest
        .lines()
        .iter()
        .filter_map(|l| {
            l.text
                .split_once("vmmprobe: counter=")
                .map(|(_, n)| n.trim().parse().ok())
        })
        .flatten()
        .collect()
}

/// Like [`find_probe_fields`], for a line that must be there: panics with the output otherwise.
pub fn probe_fields(stdout: &str, prefix: &str) -> HashMap<String, String> {
    find_probe_fields(stdout, prefix)
        .unwrap_or_else(|| panic!("no probe line \"vmmprobe: {prefix}\" in:\n{stdout}"))
}

/// The block the probe's `net-send` repeats.
pub const NET_SEND_BLOCK: usize = 64 << 10;

/// The probe's data pattern (blk-write, net-send; guest-images/README.md): xorshift64 (13, 7, 17)
/// from `(seed << 32) | 0x9e3779b9`, each 64-bit state stored little-endian, as a stream.
#[derive(Debug, Clone)]
pub struct ProbePattern {
    state: u64,
    /// The last step's bytes not handed out yet.
    pending: [u8; 8],
    used: usize,
}

impl ProbePattern {
    /// The stream for `seed`.
    pub fn new(seed: u32) -> Self {
        ProbePattern {
            state: (u64::from(seed) << 32) | 0x9e37_79b9,
            pending: [0; 8],
            used: 8,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.pending = x.to_le_bytes();
                self.used = 0;
            }
            *b = self.pending[self.used];
            self.used += 1;
        }
    }

    /// The first `len` bytes of the stream for `seed`.
    pub fn bytes(seed: u32, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        ProbePattern::new(seed).fill(&mut out);
        out
    }

    /// What the probe's `net-send` sends for `seed`: the first [`NET_SEND_BLOCK`] bytes of the
    /// stream, repeated, cut at `len`.
    pub fn net_send_bytes(seed: u32, len: usize) -> Vec<u8> {
        let block = Self::bytes(seed, NET_SEND_BLOCK);
        block.iter().copied().cycle().take(len).collect()
    }
}

/// Facts the guest probe reported on the console; `None` for a fact it did not print.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeFacts {
    /// `vmmprobe: online-cpus=N`.
    pub online_cpus: Option<u32>,
    /// `vmmprobe: memory phys-kib=N ...`: the physical memory the guest found.
    pub memory_phys_kib: Option<u64>,
    /// `vmmprobe: memory ... total-kib=M`: what the kernel manages (MemTotal).
    pub memory_total_kib: Option<u64>,
    /// `vmmprobe: initrd size=N ...`.
    pub initrd_size: Option<u64>,
    /// `vmmprobe: initrd ... crc32=hex` (compare with [`crate::crc32`] of the file).
    pub initrd_crc32: Option<u32>,
    /// Whether a line containing `BOOT-COMPLETE` was printed.
    pub boot_complete: bool,
}

/// Extracts [`ProbeFacts`] from console output. A `vmmprobe: ` line may carry a printk prefix such as a
/// timestamp; if a fact is printed more than once, the last value wins.
pub fn parse_probe_facts(stdout: &str) -> ProbeFacts {
    let mut facts = ProbeFacts::default();
    for line in stdout.lines() {
        if line.contains("BOOT-COMPLETE") {
            facts.boot_complete = true;
        }
        let Some(pos) = line.find("vmmprobe: ") else {
            continue;
        };
        let rest = line[pos + "vmmprobe: ".len()..].trim();
        let first = rest.split_whitespace().next().unwrap_or("");
        let value = |key: &str| -> Option<&str> {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        match first {
            _ if first.starts_with("online-cpus=") => {
                if let Some(n) = value("online-cpus").and_then(|v| v.parse().ok()) {
                    facts.online_cpus = Some(n);
                }
            }
            "memory" => {
                if let Some(n) = value("phys-kib").and_then(|v| v.parse().ok()) {
                    facts.memory_phys_kib = Some(n);
                }
                if let Some(n) = value("total-kib").and_then(|v| v.parse().ok()) {
                    facts.memory_total_kib = Some(n);
                }
            }
            "initrd" => {
                if let Some(n) = value("size").and_then(|v| v.parse().ok()) {
                    facts.initrd_size = Some(n);
                }
                if let Some(n) = value("crc32").and_then(parse_hex_u32) {
                    facts.initrd_crc32 = Some(n);
                }
            }
            _ => {}
        }
    }
    facts
}

fn parse_hex_u32(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    u32::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        assert_eq!(
            probe_cmdline("poweroff"),
            "console=ttyS0 quiet pci=off vmmprobe.action=poweroff"
        );
    }

    #[test]
    fn parses_facts() {
        let out = "Linux version 6.1\n\
                   [    0.512345] vmmprobe: online-cpus=2\n\
                   vmmprobe: memory phys-kib=131072 total-kib=118000\r\n\
                   vmmprobe: initrd size=4096 crc32=cbf43926\n\
                   vmmprobe: BOOT-COMPLETE\n";
        let facts = parse_probe_facts(out);
        assert_eq!(
            facts,
            ProbeFacts {
                online_cpus: Some(2),
                memory_phys_kib: Some(131072),
                memory_total_kib: Some(118000),
                initrd_size: Some(4096),
                initrd_crc32: Some(0xCBF4_3926),
                boot_complete: true,
            }
        );
    }

    #[test]
    fn missing_or_garbled_facts_are_none() {
        let facts = parse_probe_facts("vmmprobe: online-cpus=x\nvmmprobe: initrd crc32=0x0000000A\nnoise\n");
        assert_eq!(facts.online_cpus, None);
        assert_eq!(facts.initrd_size, None);
        assert_eq!(facts.initrd_crc32, Some(10));
        assert!(!facts.boot_complete);
        assert_eq!(parse_probe_facts(""), ProbeFacts::default());
    }
}
