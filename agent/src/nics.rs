//! NICs in a VM spec: checked with the vmm's own rules (reported under `spec.nics[i]`), given a
//! stable MAC when the client names none, and turned into the vmm's `nets` configuration.
//!
//! The agent attaches VMs to TAP devices that exist already (made by whoever runs the host's
//! network: a bridge port, a routed tap, a test's namespace); it creates none. The vmm opens the
//! tap in the agent's network namespace, which is therefore where the tap must be.

use std::path::Path;

use vmm_api::config::ConfigError;
use vmm_api::net::{validate_nets, MacAddr, NetConfig};
use vmm_api::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

use crate::error::AgentError;
use crate::proto::{NicSpec, RateLimit, TokenBucket, VmSpec};

/// The MAC of NIC `nic_id` of VM `vm_id` when the spec names none: locally administered
/// (`02:...`), unicast, the same on every start and on every host.
pub fn derived_mac(vm_id: &str, nic_id: &str) -> MacAddr {
    MacAddr::derived(&format!("{vm_id}/{nic_id}"))
}

/// Fills in the derived MAC of every NIC without one, so that the stored spec shows what the guest
/// gets.
pub fn fill_macs(vm_id: &str, spec: &mut VmSpec) {
    for nic in &mut spec.nics {
        if nic.mac.is_empty() {
            nic.mac = derived_mac(vm_id, &nic.id).to_string();
        }
    }
}

fn bucket(b: &TokenBucket) -> TokenBucketConfig {
    TokenBucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time_ms: b.refill_time_ms,
    }
}

fn limits(r: Option<&RateLimit>) -> Option<RateLimiterConfig> {
    r.map(|r| RateLimiterConfig {
        bandwidth: r.bandwidth.as_ref().map(bucket),
        ops: r.ops.as_ref().map(bucket),
    })
}

/// The vmm's configuration of one NIC. A MAC that does not parse is left out here (the vmm would
/// derive one): [`check_nics`] refuses such specs before they are stored.
pub fn to_net_config(nic: &NicSpec) -> NetConfig {
    NetConfig {
        id: nic.id.clone(),
        tap: Some(nic.tap.clone()),
        fd: None,
        mac: nic.mac.parse().ok(),
        rx_rate_limiter: limits(nic.rx_rate_limit.as_ref()),
        tx_rate_limiter: limits(nic.tx_rate_limit.as_ref()),
    }
}

/// The request's name for a field of the vmm's `nets[i]...`.
fn request_field(field: &str) -> String {
    let field = field
        .replacen("nets", "spec.nics", 1)
        .replace("rx_rate_limiter", "rx_rate_limit")
        .replace("tx_rate_limiter", "tx_rate_limit");
    if field.starts_with("spec.nics") {
        field
    } else {
        format!("spec.nics: {field}")
    }
}

/// Checks the NICs of a spec (MACs filled in or not): the vmm's rules on ids, tap names, MACs and
/// rate limits, and that each tap exists here as a TAP device. Errors name `spec.nics[i].<field>`.
pub fn check_nics(nics: &[NicSpec]) -> Result<(), AgentError> {
    for (i, nic) in nics.iter().enumerate() {
        if !nic.mac.is_empty() {
            if let Err(e) = nic.mac.parse::<MacAddr>() {
                return Err(AgentError::invalid(format!("spec.nics[{i}].mac"), e));
            }
        }
    }
    let nets: Vec<NetConfig> = nics.iter().map(to_net_config).collect();
    if let Err(e) = validate_nets(&nets) {
        return Err(match e {
            ConfigError::Invalid { field, reason } => AgentError::invalid(request_field(&field), reason),
            other => AgentError::invalid("spec.nics", other.to_string()),
        });
    }
    for (i, nic) in nics.iter().enumerate() {
        // validate_nets has checked the name (no '/'), so it is one path component.
        let dev = Path::new("/sys/class/net").join(&nic.tap);
        if !dev.exists() {
            return Err(AgentError::invalid(
                format!("spec.nics[{i}].tap"),
                format!("no network interface '{}' on this host", nic.tap),
            ));
        }
        // Only tun/tap devices have tun_flags.
        if !dev.join("tun_flags").exists() {
            return Err(AgentError::invalid(
                format!("spec.nics[{i}].tap"),
                format!("'{}' is not a TAP device", nic.tap),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(id: &str, tap: &str, mac: &str) -> NicSpec {
        NicSpec {
            id: id.into(),
            tap: tap.into(),
            mac: mac.into(),
            ..Default::default()
        }
    }

    #[test]
    fn derived_macs_are_stable_local_unicast_and_per_vm() {
        let a = derived_mac("web1", "eth0");
        assert_eq!(a, derived_mac("web1", "eth0"));
        assert_ne!(a, derived_mac("web2", "eth0"));
        assert_ne!(a, derived_mac("web1", "eth1"));
        assert_eq!(a.0[0], 0x02, "locally administered, unicast");
        let mut spec = VmSpec {
            nics: vec![nic("eth0", "t0", ""), nic("eth1", "t1", "02:00:00:00:00:09")],
            ..Default::default()
        };
        fill_macs("web1", &mut spec);
        assert_eq!(spec.nics[0].mac, a.to_string());
        assert_eq!(spec.nics[1].mac, "02:00:00:00:00:09");
    }

    #[test]
    fn errors_name_the_nic_field() {
        // "lo" exists everywhere and is no TAP device.
        let cases: Vec<(Vec<NicSpec>, &str)> = vec![
            (vec![nic("eth0", "lo", "zz")], "spec.nics[0].mac"),
            (
                vec![nic("eth0", "lo", ""), nic("eth1", "lo", "01:00:00:00:00:01")],
                "spec.nics[1].mac",
            ),
            (
                vec![nic("eth0", "lo", ""), nic("eth0", "lo", "")],
                "spec.nics[1].id",
            ),
            (vec![nic("bad id", "lo", "")], "spec.nics[0].id"),
            (vec![nic("eth0", "a/b", "")], "spec.nics[0].tap"),
            (vec![nic("eth0", "", "")], "spec.nics[0].tap"),
            (vec![nic("eth0", "vmmt-none0", "")], "spec.nics[0].tap"),
            (vec![nic("eth0", "lo", "")], "spec.nics[0].tap"),
            (vec![nic("e", "lo", ""); 9], "spec.nics"),
        ];
        for (nics, field) in cases {
            let err = check_nics(&nics).unwrap_err().to_string();
            assert!(err.starts_with(field), "{field}: {err}");
        }
        let mut limited = nic("eth0", "lo", "");
        limited.tx_rate_limit = Some(RateLimit {
            bandwidth: Some(TokenBucket {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 0,
            }),
            ops: None,
        });
        let err = check_nics(&[limited]).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.nics[0].tx_rate_limit: bandwidth.refill_time_ms"),
            "{err}"
        );
        assert_eq!(
            check_nics(&[nic("eth0", "lo", "")]).unwrap_err().to_string(),
            "spec.nics[0].tap: 'lo' is not a TAP device"
        );
    }

    #[test]
    fn nics_become_vmm_nets() {
        let mut n = nic("eth0", "tap0", "02:00:00:00:00:01");
        n.rx_rate_limit = Some(RateLimit {
            bandwidth: None,
            ops: Some(TokenBucket {
                size: 100,
                one_time_burst: 5,
                refill_time_ms: 1000,
            }),
        });
        let net = to_net_config(&n);
        assert_eq!(net.tap.as_deref(), Some("tap0"));
        assert_eq!(
            net.mac.map(|m| m.to_string()).as_deref(),
            Some("02:00:00:00:00:01")
        );
        let ops = net.rx_rate_limiter.and_then(|r| r.ops).unwrap();
        assert_eq!((ops.size, ops.one_time_burst, ops.refill_time_ms), (100, 5, 1000));
        assert!(net.tx_rate_limiter.is_none());
    }
}
