//! Guest memory levers: the virtio-balloon device (`machine.balloon` in `vm.json`, or
//! `--balloon amount_mib=...`), and how guest RAM is mapped on the host (`machine.mergeable`,
//! `machine.hugepages`).

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::drive::{cli_pairs, on_off};

/// Longest statistics polling interval, in seconds.
pub const MAX_STATS_INTERVAL_S: u32 = 3600;

/// Guest pages (4 KiB) per MiB, the balloon's unit.
pub const PAGES_PER_MIB: u64 = 256;

/// A virtio-balloon device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// How much memory the guest is asked to give back at boot, in MiB (at most the guest's
    /// memory). Changed at run time with the `update-balloon` request.
    #[serde(default)]
    pub amount_mib: u64,
    /// Let the guest take pages back from the balloon when it runs out of memory
    /// (VIRTIO_BALLOON_F_DEFLATE_ON_OOM) instead of failing allocations.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deflate_on_oom: bool,
    /// How often the guest is asked for memory statistics, in seconds (1 to
    /// [`MAX_STATS_INTERVAL_S`]); 0 (the default) offers no statistics queue.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stats_interval_s: u32,
    /// Let the guest report free memory, which the host then reclaims
    /// (VIRTIO_BALLOON_F_REPORTING).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub free_page_reporting: bool,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// How guest RAM asks the host for transparent huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HugePages {
    /// `MADV_HUGEPAGE` once the kernel is loaded, where the host allows it (best effort). Note that
    /// a balloon that returns single pages of a huge page may see khugepaged collapse the range
    /// back (host `khugepaged/max_ptes_none`): use `off` where the balloon matters more.
    #[default]
    Auto,
    /// No advice: the host's THP policy alone decides (`never` or `madvise` means small pages).
    Off,
    /// Guest RAM mapped at 2 MiB-aligned host addresses and advised `MADV_HUGEPAGE` before anything
    /// is loaded; the VM fails to start if the host kernel refuses the advice.
    Thp,
}

impl HugePages {
    /// Whether this is the default (left out of serialized configs).
    pub fn is_auto(&self) -> bool {
        *self == HugePages::Auto
    }
}

impl BalloonConfig {
    /// Parses a `--balloon` value: `amount_mib=N[,deflate_on_oom=on][,stats_interval_s=N]
    /// [,free_page_reporting=on]`.
    pub fn from_cli(spec: &str) -> Result<Self, String> {
        let mut config = BalloonConfig::default();
        for (key, value) in cli_pairs(spec)? {
            let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{key}: {e}"));
            match key {
                "amount_mib" => config.amount_mib = number(value)?,
                "deflate_on_oom" => config.deflate_on_oom = on_off(key, value)?,
                "stats_interval_s" => {
                    config.stats_interval_s =
                        u32::try_from(number(value)?).map_err(|_| format!("{key}: too large"))?
                }
                "free_page_reporting" => config.free_page_reporting = on_off(key, value)?,
                _ => return Err(format!("unknown key '{key}'")),
            }
        }
        Ok(config)
    }

    /// Checks the balloon against a guest of `memory_mib`.
    pub fn validate(&self, memory_mib: u64) -> Result<(), ConfigError> {
        check_amount("machine.balloon.amount_mib", self.amount_mib, memory_mib)?;
        if self.stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(ConfigError::invalid(
                "machine.balloon.stats_interval_s",
                format!("at most {MAX_STATS_INTERVAL_S}, got {}", self.stats_interval_s),
            ));
        }
        Ok(())
    }

    /// The target in guest pages.
    pub fn target_pages(&self) -> u32 {
        mib_to_pages(self.amount_mib)
    }
}

/// `amount_mib` as guest pages; validation keeps it far below `u32::MAX` pages.
pub fn mib_to_pages(mib: u64) -> u32 {
    u32::try_from(mib.saturating_mul(PAGES_PER_MIB)).unwrap_or(u32::MAX)
}

/// A balloon may hold at most all of the guest's memory (the guest decides how much it can give).
pub fn check_amount(field: &str, amount_mib: u64, memory_mib: u64) -> Result<(), ConfigError> {
    if amount_mib > memory_mib {
        return Err(ConfigError::invalid(
            field,
            format!("{amount_mib} MiB is more than the guest's {memory_mib} MiB"),
        ));
    }
    if amount_mib.saturating_mul(PAGES_PER_MIB) > u64::from(u32::MAX) {
        return Err(ConfigError::invalid(
            field,
            format!("{amount_mib} MiB is more pages than the balloon counts (2^32 - 1)"),
        ));
    }
    Ok(())
}

/// The parameters of the `update-balloon` request; at least one is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target, in MiB (at most the guest's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_mib: Option<u64>,
    /// The new statistics polling interval, in seconds (1 to [`MAX_STATS_INTERVAL_S`]); only for a
    /// balloon configured with statistics (the queue is offered at boot or not at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_interval_s: Option<u32>,
}

/// Answer to the `balloon-stats` request, and the `balloon` part of `metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonInfo {
    /// The target the host set, in guest pages (4 KiB).
    pub target_pages: u32,
    /// The pages the guest says the balloon holds (its `actual` field).
    pub actual_pages: u32,
    /// `target_pages` in MiB (rounded down).
    pub target_mib: u64,
    /// `actual_pages` in MiB (rounded down).
    pub actual_mib: u64,
    /// The statistics polling interval, seconds (0: no statistics).
    pub stats_interval_s: u32,
    /// The guest's latest memory statistics, if it has sent any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<GuestMemoryStats>,
    /// What the device did.
    pub counters: BalloonCounters,
}

/// The guest's memory statistics (virtio 1.2, 5.5.6.3), as the guest last reported them; a field
/// is absent when the guest did not report it. Sizes in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMemoryStats {
    /// Bytes swapped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Memory not in use at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Memory the guest manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Memory available for new work without swapping (MemAvailable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Page cache that could be dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Huge page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Failed huge page allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    /// Allocation stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stalls: Option<u64>,
    /// Pages scanned by background reclaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scans: Option<u64>,
    /// Pages scanned by direct reclaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scans: Option<u64>,
    /// Pages reclaimed in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaims: Option<u64>,
    /// Pages reclaimed directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaims: Option<u64>,
}

/// The balloon device's counters since the VMM started.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonCounters {
    /// Pages the guest put in the balloon (released on the host).
    pub inflated_pages: u64,
    /// Pages the guest took back.
    pub deflated_pages: u64,
    /// Free page reports served.
    pub reports: u64,
    /// Bytes of reported free memory released on the host.
    pub reported_bytes: u64,
    /// Statistics updates received.
    pub stats_updates: u64,
    /// Page numbers or ranges outside guest RAM, ignored.
    pub invalid_pages: u64,
    /// Buffers refused as malformed (wrong direction, bad length, too large).
    pub invalid_requests: u64,
    /// Host releases (`madvise`) that failed.
    pub release_errors: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_specs_parse_and_refuse_unknown_keys() {
        let c = BalloonConfig::from_cli(
            "amount_mib=64,deflate_on_oom=on,stats_interval_s=2,free_page_reporting=on",
        )
        .unwrap();
        assert_eq!(
            c,
            BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_interval_s: 2,
                free_page_reporting: true
            }
        );
        assert_eq!(c.target_pages(), 64 * 256);
        for bad in [
            "size=64",
            "amount_mib=-1",
            "amount_mib=1,amount_mib=2",
            "deflate_on_oom=yes",
            "stats_interval_s=99999999999",
        ] {
            assert!(BalloonConfig::from_cli(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_bounds_the_amount_and_interval() {
        let c = |amount_mib, stats_interval_s| BalloonConfig {
            amount_mib,
            stats_interval_s,
            ..BalloonConfig::default()
        };
        assert!(c(128, 1).validate(128).is_ok());
        let err = c(129, 1).validate(128).unwrap_err().to_string();
        assert!(err.contains("machine.balloon.amount_mib"), "{err}");
        let err = c(0, 3601).validate(128).unwrap_err().to_string();
        assert!(err.contains("stats_interval_s"), "{err}");
    }
}
