//! `vmmctl` memory commands and options: the balloon, KSM and huge pages of `create`, `update`
//! (a new memory target) and `balloon` (the balloon's report).

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use serde_json::{json, Value};
use tonic::transport::Channel;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{BalloonSpec, BalloonStatus, GetBalloonRequest, HugePages, UpdateVmRequest, VmSpec};

use crate::{print_vm, status};

/// The memory options of `create`.
#[derive(ClapArgs, Debug)]
pub struct MemoryOptions {
    /// A virtio-balloon: amount_mib=N[,deflate_on_oom][,stats_interval_s=N][,free_page_reporting]
    /// (amount_mib=0 for an empty one).
    #[arg(long)]
    balloon: Option<String>,
    /// Offer guest RAM to the host's KSM (same-page merging).
    #[arg(long)]
    mergeable: bool,
    /// Transparent huge pages for guest RAM: auto, off or thp.
    #[arg(long, default_value = "auto")]
    hugepages: String,
}

impl MemoryOptions {
    /// Sets the spec's memory options.
    pub fn apply(&self, spec: &mut VmSpec) -> Result<()> {
        spec.balloon = self.balloon.as_deref().map(parse_balloon).transpose()?;
        spec.mergeable = self.mergeable;
        spec.hugepages = match self.hugepages.as_str() {
            "auto" => HugePages::Auto,
            "off" => HugePages::Off,
            "thp" => HugePages::Thp,
            other => bail!("--hugepages takes auto, off or thp, got '{other}'"),
        } as i32;
        Ok(())
    }
}

fn parse_balloon(spec: &str) -> Result<BalloonSpec> {
    let mut b = BalloonSpec::default();
    let usage = || {
        anyhow::anyhow!(
            "--balloon takes amount_mib=N[,deflate_on_oom][,stats_interval_s=N][,free_page_reporting], got '{spec}'"
        )
    };
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some(("amount_mib", n)) => b.amount_mib = n.parse().map_err(|_| usage())?,
            Some(("stats_interval_s", n)) => b.stats_interval_s = n.parse().map_err(|_| usage())?,
            None if item == "deflate_on_oom" => b.deflate_on_oom = true,
            None if item == "free_page_reporting" => b.free_page_reporting = true,
            _ => return Err(usage()),
        }
    }
    Ok(b)
}

/// The memory part of a spec, for `--json`.
pub fn spec_json(spec: &VmSpec) -> Value {
    let hugepages = HugePages::try_from(spec.hugepages)
        .map(|h| {
            h.as_str_name()
                .trim_start_matches("HUGE_PAGES_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    json!({
        "balloon": spec.balloon.as_ref().map(|b| json!({
            "amount_mib": b.amount_mib, "deflate_on_oom": b.deflate_on_oom,
            "stats_interval_s": b.stats_interval_s, "free_page_reporting": b.free_page_reporting,
        })),
        "mergeable": spec.mergeable,
        "hugepages": hugepages,
    })
}

/// `vmmctl update VM --memory-target-mib N [--balloon-stats-interval-s N]`.
#[derive(ClapArgs, Debug)]
pub struct UpdateArgs {
    vm_id: String,
    /// Memory the guest may keep, in MiB (the balloon holds the rest).
    #[arg(long)]
    memory_target_mib: Option<u64>,
    /// A new balloon statistics interval, in seconds.
    #[arg(long)]
    balloon_stats_interval_s: Option<u32>,
    #[arg(long, default_value = "")]
    request_id: String,
}

/// Runs `update`.
pub async fn update(channel: Channel, args: UpdateArgs, as_json: bool) -> Result<()> {
    let vm = VmServiceClient::new(channel)
        .update_vm(UpdateVmRequest {
            vm_id: args.vm_id,
            request_id: args.request_id,
            memory_target_mib: args.memory_target_mib,
            balloon_stats_interval_s: args.balloon_stats_interval_s,
        })
        .await
        .map_err(status)?;
    print_vm(vm.get_ref(), as_json);
    Ok(())
}

fn balloon_json(b: &BalloonStatus) -> Value {
    json!({
        "target_mib": b.target_mib, "actual_mib": b.actual_mib,
        "guest_memory_mib": b.guest_memory_mib, "stats_interval_s": b.stats_interval_s,
        "free_memory_bytes": b.free_memory_bytes, "available_memory_bytes": b.available_memory_bytes,
        "total_memory_bytes": b.total_memory_bytes, "disk_caches_bytes": b.disk_caches_bytes,
        "major_faults": b.major_faults, "minor_faults": b.minor_faults, "oom_kills": b.oom_kills,
        "inflated_pages": b.inflated_pages, "deflated_pages": b.deflated_pages,
        "free_page_reports": b.free_page_reports, "free_page_reported_bytes": b.free_page_reported_bytes,
        "invalid_pages": b.invalid_pages, "invalid_requests": b.invalid_requests,
    })
}

/// Runs `balloon VM`: the balloon's report, as `KEY VALUE` lines or JSON.
pub async fn balloon(channel: Channel, vm_id: String, as_json: bool) -> Result<()> {
    let b = VmServiceClient::new(channel)
        .get_balloon(GetBalloonRequest { vm_id })
        .await
        .map_err(status)?
        .into_inner();
    let v = balloon_json(&b);
    if as_json {
        println!("{v}");
    } else if let Value::Object(map) = v {
        for (k, v) in map.into_iter().filter(|(_, v)| !v.is_null()) {
            println!("{k:<26} {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_options_parse() {
        let b = parse_balloon("amount_mib=64,deflate_on_oom,stats_interval_s=5,free_page_reporting").unwrap();
        assert_eq!(
            b,
            BalloonSpec {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_interval_s: 5,
                free_page_reporting: true
            }
        );
        assert_eq!(parse_balloon("amount_mib=0").unwrap(), BalloonSpec::default());
        for bad in ["amount=1", "amount_mib=x", "deflate_on_oom=on"] {
            assert!(parse_balloon(bad).is_err(), "{bad}");
        }
    }
}
