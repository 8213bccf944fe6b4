//! Guest memory levers in the agent's API: the balloon, KSM and huge pages of a `VmSpec`, the
//! memory target of `UpdateVm`, and the vmm's balloon report as a `BalloonStatus`.

use vmm_api::balloon::{
    check_amount, BalloonConfig, BalloonInfo, BalloonUpdate, HugePages, MAX_STATS_INTERVAL_S,
};

use vmm_api::config::ConfigError;

use crate::error::AgentError;
use crate::proto::{BalloonSpec, BalloonStatus, HugePages as ProtoHugePages, UpdateVmRequest, VmSpec};

/// Checks the memory options of a spec, naming the offending field.
pub fn check_memory_options(spec: &VmSpec) -> Result<(), AgentError> {
    if ProtoHugePages::try_from(spec.hugepages).is_err() {
        return Err(AgentError::invalid(
            "spec.hugepages",
            format!("unknown value {}", spec.hugepages),
        ));
    }
    if let Some(b) = &spec.balloon {
        let field = "spec.balloon.amount_mib";
        check_amount(field, b.amount_mib, spec.memory_mib).map_err(|e| match e {
            ConfigError::Invalid { reason, .. } => AgentError::invalid(field, reason),
            other => AgentError::invalid(field, other.to_string()),
        })?;
        check_stats_interval("spec.balloon.stats_interval_s", b.stats_interval_s, true)?;
    }
    Ok(())
}

fn check_stats_interval(field: &str, seconds: u32, zero_ok: bool) -> Result<(), AgentError> {
    if seconds > MAX_STATS_INTERVAL_S || (seconds == 0 && !zero_ok) {
        let low = u32::from(!zero_ok);
        return Err(AgentError::invalid(
            field,
            format!("must be {low} to {MAX_STATS_INTERVAL_S} seconds, got {seconds}"),
        ));
    }
    Ok(())
}

/// The vmm's `machine.hugepages` for a checked spec.
pub fn hugepages(spec: &VmSpec) -> HugePages {
    match ProtoHugePages::try_from(spec.hugepages) {
        Ok(ProtoHugePages::Off) => HugePages::Off,
        Ok(ProtoHugePages::Thp) => HugePages::Thp,
        Ok(ProtoHugePages::Auto) | Err(_) => HugePages::Auto,
    }
}

/// The vmm's `machine.balloon` for a spec's balloon.
pub fn balloon_config(balloon: &BalloonSpec) -> BalloonConfig {
    BalloonConfig {
        amount_mib: balloon.amount_mib,
        deflate_on_oom: balloon.deflate_on_oom,
        stats_interval_s: balloon.stats_interval_s,
        free_page_reporting: balloon.free_page_reporting,
    }
}

/// What an `UpdateVm` asks of a VM whose spec is `spec`: the balloon update for its vmm, and the
/// spec as it is to be stored.
pub fn plan_update(
    vm_id: &str,
    spec: &VmSpec,
    req: &UpdateVmRequest,
) -> Result<(BalloonUpdate, VmSpec), AgentError> {
    if req.memory_target_mib.is_none() && req.balloon_stats_interval_s.is_none() {
        return Err(AgentError::invalid(
            "memory_target_mib",
            "nothing to update: set memory_target_mib or balloon_stats_interval_s",
        ));
    }
    let Some(balloon) = &spec.balloon else {
        return Err(AgentError::WrongState(format!(
            "VM '{vm_id}' has no balloon (spec.balloon), so its memory cannot change"
        )));
    };
    let mut update = BalloonUpdate::default();
    let mut new_spec = spec.clone();
    if let Some(target) = req.memory_target_mib {
        if target == 0 || target > spec.memory_mib {
            return Err(AgentError::invalid(
                "memory_target_mib",
                format!("must be 1 to the VM's {} MiB, got {target}", spec.memory_mib),
            ));
        }
        let amount = spec.memory_mib - target;
        update.amount_mib = Some(amount);
        if let Some(b) = new_spec.balloon.as_mut() {
            b.amount_mib = amount;
        }
    }
    if let Some(seconds) = req.balloon_stats_interval_s {
        if balloon.stats_interval_s == 0 {
            return Err(AgentError::WrongState(format!(
                "VM '{vm_id}' has a balloon without statistics (spec.balloon.stats_interval_s is 0)"
            )));
        }
        check_stats_interval("balloon_stats_interval_s", seconds, false)?;
        update.stats_interval_s = Some(seconds);
        if let Some(b) = new_spec.balloon.as_mut() {
            b.stats_interval_s = seconds;
        }
    }
    Ok((update, new_spec))
}

/// A vmm's balloon report in the API's terms.
pub fn balloon_status(info: &BalloonInfo, memory_mib: u64) -> BalloonStatus {
    let stats = info.stats.clone().unwrap_or_default();
    BalloonStatus {
        target_mib: info.target_mib,
        actual_mib: info.actual_mib,
        guest_memory_mib: memory_mib.saturating_sub(info.actual_mib),
        stats_interval_s: info.stats_interval_s,
        free_memory_bytes: stats.free_memory,
        available_memory_bytes: stats.available_memory,
        total_memory_bytes: stats.total_memory,
        disk_caches_bytes: stats.disk_caches,
        major_faults: stats.major_faults,
        minor_faults: stats.minor_faults,
        oom_kills: stats.oom_kills,
        inflated_pages: info.counters.inflated_pages,
        deflated_pages: info.counters.deflated_pages,
        free_page_reports: info.counters.reports,
        free_page_reported_bytes: info.counters.reported_bytes,
        invalid_pages: info.counters.invalid_pages,
        invalid_requests: info.counters.invalid_requests,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(balloon: Option<BalloonSpec>) -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_mib: 256,
            balloon,
            ..Default::default()
        }
    }

    fn update(target: Option<u64>, stats: Option<u32>) -> UpdateVmRequest {
        UpdateVmRequest {
            vm_id: "a".into(),
            memory_target_mib: target,
            balloon_stats_interval_s: stats,
            ..Default::default()
        }
    }

    #[test]
    fn a_memory_target_becomes_the_balloon_amount() {
        let spec = spec_with(Some(BalloonSpec {
            stats_interval_s: 5,
            ..Default::default()
        }));
        let (u, new_spec) = plan_update("a", &spec, &update(Some(192), Some(1))).unwrap();
        assert_eq!(u.amount_mib, Some(64));
        assert_eq!(u.stats_interval_s, Some(1));
        let b = new_spec.balloon.unwrap();
        assert_eq!((b.amount_mib, b.stats_interval_s), (64, 1));
        let (u, _) = plan_update("a", &spec, &update(Some(256), None)).unwrap();
        assert_eq!(u.amount_mib, Some(0));
    }

    #[test]
    fn bad_updates_name_their_field_or_the_missing_balloon() {
        let with = spec_with(Some(BalloonSpec::default()));
        for (req, field) in [
            (update(None, None), "memory_target_mib"),
            (update(Some(0), None), "memory_target_mib"),
            (update(Some(257), None), "memory_target_mib"),
        ] {
            let e = plan_update("a", &with, &req).unwrap_err();
            assert!(matches!(e, AgentError::InvalidArgument { .. }), "{e:?}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
        // Statistics were not offered at boot, so they cannot be turned on now.
        let e = plan_update("a", &with, &update(None, Some(1))).unwrap_err();
        assert!(matches!(e, AgentError::WrongState(_)), "{e:?}");
        let stats = spec_with(Some(BalloonSpec {
            stats_interval_s: 5,
            ..Default::default()
        }));
        let e = plan_update("a", &stats, &update(None, Some(3601))).unwrap_err();
        assert!(e.to_string().starts_with("balloon_stats_interval_s"), "{e}");
        let e = plan_update("a", &spec_with(None), &update(Some(128), None)).unwrap_err();
        assert!(matches!(e, AgentError::WrongState(_)), "{e:?}");
    }

    #[test]
    fn spec_options_are_checked() {
        let mut spec = spec_with(Some(BalloonSpec {
            amount_mib: 300,
            ..Default::default()
        }));
        let e = check_memory_options(&spec).unwrap_err();
        assert!(e.to_string().starts_with("spec.balloon.amount_mib"), "{e}");
        spec.balloon = Some(BalloonSpec {
            stats_interval_s: 4000,
            ..Default::default()
        });
        let e = check_memory_options(&spec).unwrap_err();
        assert!(e.to_string().starts_with("spec.balloon.stats_interval_s"), "{e}");
        spec.balloon = None;
        spec.hugepages = 7;
        let e = check_memory_options(&spec).unwrap_err();
        assert!(e.to_string().starts_with("spec.hugepages"), "{e}");
        spec.hugepages = ProtoHugePages::Thp as i32;
        check_memory_options(&spec).unwrap();
        assert_eq!(hugepages(&spec), HugePages::Thp);
    }
}
