//! NICs in a VM spec: checked with the vmm's own rules (reported under `spec.nics[i]`), given a
//! stable MAC when the client names none, and turned into the vmm's `nets` configuration.
//!
//! A NIC is on one of two kinds of host tap, both in the agent's network namespace:
//!
//! - one that exists already (`tap` set; made by whoever runs the host's network: a bridge
//!   port, a routed tap, a test's namespace), which the vmm opens by name;
//! - one the agent makes for each start (`tap` empty): a non-persistent tap ([`make_taps`]), set
//!   up on a bridge, whose descriptor the vmm receives and then holds alone. It lives exactly as
//!   long as that vmm: a stopped, crashed or deleted VM leaves no tap behind, and an agent that
//!   dies leaves running VMs' taps to their vmms.

use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;
use std::path::Path;

use hostnet::netlink::{LinkChange, Netlink, NetlinkError};
use hostnet::tap::TapError;

use vmm_api::config::ConfigError;
use vmm_api::net::{validate_nets, MacAddr, NetConfig};
use vmm_api::rate_limiter::{RateLimiterConfig, TokenBucketConfig};

use crate::error::AgentError;
use crate::proto::{NicSpec, NicTap, RateLimit, TokenBucket, VmSpec};

/// MTUs an agent-made tap may have (IPv4's minimum to the largest a tap takes).
pub const MTU_RANGE: RangeInclusive<u32> = 68..=65535;

/// Whether the agent makes this NIC's tap (the spec names none).
pub fn is_agent_made(nic: &NicSpec) -> bool {
    nic.tap.is_empty()
}

/// The name of the tap the agent makes for NIC `nic_id` of VM `vm_id`: `vt` and 13 hex digits
/// of a hash (15 bytes, the kernel's limit), the same on every start and every host, so that
/// operators and a restarted agent find it.
pub fn agent_tap_name(vm_id: &str, nic_id: &str) -> String {
    // FNV-1a, as for derived MACs, seeded differently so that the two do not mirror each other.
    let hash = format!("tap:{vm_id}/{nic_id}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("vt{:013x}", hash >> 12)
}

/// The name under which the vmm receives the descriptor of the agent's tap for `nics[index]`.
pub fn fd_name(index: usize) -> String {
    format!("nic{index}")
}

/// Fills in the agent's defaults for NICs whose tap it makes: `bridge` (`--bridge`) and `mtu`
/// (`--nic-mtu`), so that the stored spec shows them and later starts do not change with the
/// agent's flags.
pub fn fill_nic_defaults(spec: &mut VmSpec, bridge: Option<&str>, mtu: Option<u32>) {
    for nic in spec.nics.iter_mut().filter(|n| is_agent_made(n)) {
        if nic.bridge.is_empty() {
            nic.bridge = bridge.unwrap_or_default().to_string();
        }
        if nic.mtu == 0 {
            nic.mtu = mtu.unwrap_or(0);
        }
    }
}

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

/// The vmm's configuration of NIC `index`: on its tap by name, or on the descriptor of the
/// agent's tap (`nic<index>`, passed with `add-fds`). A MAC that does not parse is left out here
/// (the vmm would derive one): [`check_nics`] refuses such specs before they are stored.
pub fn to_net_config(index: usize, nic: &NicSpec) -> NetConfig {
    let agent_made = is_agent_made(nic);
    NetConfig {
        id: nic.id.clone(),
        tap: (!agent_made).then(|| nic.tap.clone()),
        fd: agent_made.then(|| fd_name(index)),
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

/// Checks the NICs of a spec (MACs and the agent's defaults filled in or not): the vmm's rules on
/// ids, tap names, MACs and rate limits; that each named tap exists here as a TAP device; and
/// for taps the agent makes, that the bridge exists here as a bridge and the MTU is one a tap
/// takes. Errors name `spec.nics[i].<field>`.
pub fn check_nics(nics: &[NicSpec]) -> Result<(), AgentError> {
    for (i, nic) in nics.iter().enumerate() {
        if !nic.mac.is_empty() {
            if let Err(e) = nic.mac.parse::<MacAddr>() {
                return Err(AgentError::invalid(format!("spec.nics[{i}].mac"), e));
            }
        }
        check_host_side_fields(i, nic)?;
    }
    let nets: Vec<NetConfig> = nics
        .iter()
        .enumerate()
        .map(|(i, n)| to_net_config(i, n))
        .collect();
    if let Err(e) = validate_nets(&nets) {
        return Err(match e {
            ConfigError::Invalid { field, reason } => AgentError::invalid(request_field(&field), reason),
            other => AgentError::invalid("spec.nics", other.to_string()),
        });
    }
    for (i, nic) in nics.iter().enumerate() {
        if is_agent_made(nic) {
            find_bridge(i, &nic.bridge)?;
            continue;
        }
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

/// The fields that say how the host side is made: a named tap takes no bridge or MTU (the host's
/// network owns it); an agent-made one needs a bridge and at most a valid MTU.
fn check_host_side_fields(i: usize, nic: &NicSpec) -> Result<(), AgentError> {
    if !is_agent_made(nic) {
        if !nic.bridge.is_empty() {
            return Err(AgentError::invalid(
                format!("spec.nics[{i}].bridge"),
                "only for a tap the agent makes: give either tap (an existing tap) or bridge, not both",
            ));
        }
        if nic.mtu != 0 {
            return Err(AgentError::invalid(
                format!("spec.nics[{i}].mtu"),
                "only for a tap the agent makes (no tap); an existing tap keeps its MTU",
            ));
        }
        return Ok(());
    }
    if nic.bridge.is_empty() {
        return Err(AgentError::invalid(
            format!("spec.nics[{i}].bridge"),
            "needed for a tap the agent makes (no tap given), and the agent has no --bridge",
        ));
    }
    if !hostnet::tap::is_valid_name(&nic.bridge) {
        return Err(AgentError::invalid(
            format!("spec.nics[{i}].bridge"),
            format!("'{}' is not an interface name", nic.bridge),
        ));
    }
    if nic.mtu != 0 && !MTU_RANGE.contains(&nic.mtu) {
        return Err(AgentError::invalid(
            format!("spec.nics[{i}].mtu"),
            format!(
                "must be {} to {}, got {}",
                MTU_RANGE.start(),
                MTU_RANGE.end(),
                nic.mtu
            ),
        ));
    }
    Ok(())
}

/// The index and MTU of `bridge`, which must exist here and be a bridge; errors name
/// `spec.nics[i].bridge`.
fn find_bridge(i: usize, bridge: &str) -> Result<hostnet::netlink::Link, AgentError> {
    let lookup = Netlink::open().and_then(|mut nl| nl.link(bridge));
    match lookup {
        Ok(Some(link)) if link.is_bridge() => Ok(link),
        Ok(Some(_)) => Err(AgentError::invalid(
            format!("spec.nics[{i}].bridge"),
            format!("'{bridge}' is not a bridge"),
        )),
        Ok(None) => Err(AgentError::invalid(
            format!("spec.nics[{i}].bridge"),
            format!("no network interface '{bridge}' on this host"),
        )),
        Err(e) => Err(AgentError::Internal(format!(
            "cannot look up bridge '{bridge}': {}",
            crate::error::ErrorChain(&e)
        ))),
    }
}

/// A tap the agent made for one NIC, up and on its bridge, until its descriptor is handed to the
/// vmm (dropping it removes the tap).
#[derive(Debug)]
pub struct AgentTap {
    /// The name the vmm receives the descriptor under (its `nets[i].fd`).
    pub fd_name: String,
    /// The descriptor; the tap lives while some process holds it.
    pub fd: OwnedFd,
    /// What the VM shows of it.
    pub status: NicTap,
}

/// Why the taps of a start could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TapSetupError {
    /// The bridge is gone, or no longer a bridge, since the VM was created.
    #[error("NIC '{nic}': {reason}")]
    Bridge { nic: String, reason: String },
    /// The tap cannot be created.
    #[error("NIC '{nic}'")]
    Create {
        nic: String,
        #[source]
        source: TapError,
    },
    /// The tap cannot be sized, attached to the bridge or brought up.
    #[error("NIC '{nic}': setting up tap '{tap}' on bridge '{bridge}'")]
    Setup {
        nic: String,
        tap: String,
        bridge: String,
        #[source]
        source: NetlinkError,
    },
}

/// Makes the taps of every NIC of `spec` (of VM `vm_id`) without one: each created
/// non-persistent, given its MTU (the NIC's, else the bridge's), made a port of its bridge and
/// brought up. Blocking (a few syscalls each). On an error the taps made so far are dropped,
/// which removes them.
pub fn make_taps(vm_id: &str, spec: &VmSpec) -> Result<Vec<AgentTap>, TapSetupError> {
    let mut made = Vec::new();
    for (i, nic) in spec.nics.iter().enumerate().filter(|(_, n)| is_agent_made(n)) {
        let bridge = find_bridge(i, &nic.bridge).map_err(|e| TapSetupError::Bridge {
            nic: nic.id.clone(),
            reason: e.to_string(),
        })?;
        let tap = agent_tap_name(vm_id, &nic.id);
        let fd = hostnet::tap::create_tap(&tap).map_err(|source| TapSetupError::Create {
            nic: nic.id.clone(),
            source,
        })?;
        let mtu = if nic.mtu == 0 { bridge.mtu } else { nic.mtu };
        let setup_error = |source| TapSetupError::Setup {
            nic: nic.id.clone(),
            tap: tap.clone(),
            bridge: nic.bridge.clone(),
            source,
        };
        let mut nl = Netlink::open().map_err(setup_error)?;
        let index = match nl.link(&tap).map_err(setup_error)? {
            Some(link) => link.index,
            None => return Err(setup_error(NetlinkError::Malformed("the new tap is not listed"))),
        };
        let change = LinkChange {
            mtu: Some(mtu),
            master: Some(bridge.index),
            up: true,
        };
        nl.set_link(index, change).map_err(setup_error)?;
        made.push(AgentTap {
            fd_name: fd_name(i),
            fd,
            status: NicTap {
                nic_id: nic.id.clone(),
                tap,
                bridge: nic.bridge.clone(),
                mtu,
            },
        });
    }
    Ok(made)
}

/// What `Vm.nic_taps` shows for `spec`'s NICs: the taps `made` by the agent, the spec's names
/// for the others.
pub fn nic_taps(spec: &VmSpec, made: &[AgentTap]) -> Vec<NicTap> {
    spec.nics
        .iter()
        .map(|nic| match made.iter().find(|t| t.status.nic_id == nic.id) {
            Some(t) => t.status.clone(),
            None => NicTap {
                nic_id: nic.id.clone(),
                tap: nic.tap.clone(),
                bridge: String::new(),
                mtu: 0,
            },
        })
        .collect()
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
    fn agent_tap_names_are_stable_short_and_distinct() {
        let a = agent_tap_name("web1", "eth0");
        assert_eq!(a, agent_tap_name("web1", "eth0"));
        assert_eq!(a.len(), 15, "{a}");
        assert!(
            a.starts_with("vt") && a[2..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{a}"
        );
        assert!(hostnet::tap::is_valid_name(&a));
        // Pinned: a restarted or upgraded agent must find the taps its predecessor made.
        assert_eq!(agent_tap_name("netvm", "eth0"), "vt121b145bf4b26");
        let long_id = "a".repeat(63);
        assert_eq!(agent_tap_name(&long_id, &"n".repeat(64)).len(), 15);
        let mut seen = std::collections::HashSet::new();
        for vm in 0..200 {
            for nic in 0..8 {
                assert!(seen.insert(agent_tap_name(&format!("vm{vm}"), &format!("eth{nic}"))));
            }
        }
    }

    #[test]
    fn defaults_fill_only_agent_made_nics_and_fields_not_given() {
        let mut own = nic("eth2", "", "");
        own.bridge = "br9".into();
        own.mtu = 1400;
        let mut spec = VmSpec {
            nics: vec![nic("eth0", "tap0", ""), nic("eth1", "", ""), own],
            ..Default::default()
        };
        fill_nic_defaults(&mut spec, Some("br0"), Some(9000));
        assert_eq!((spec.nics[0].bridge.as_str(), spec.nics[0].mtu), ("", 0));
        assert_eq!((spec.nics[1].bridge.as_str(), spec.nics[1].mtu), ("br0", 9000));
        assert_eq!((spec.nics[2].bridge.as_str(), spec.nics[2].mtu), ("br9", 1400));
        let mut spec = VmSpec {
            nics: vec![nic("eth0", "", "")],
            ..Default::default()
        };
        fill_nic_defaults(&mut spec, None, None);
        assert_eq!((spec.nics[0].bridge.as_str(), spec.nics[0].mtu), ("", 0));
    }

    #[test]
    fn host_side_fields_are_checked_by_kind() {
        let with = |tap: &str, bridge: &str, mtu: u32| NicSpec {
            bridge: bridge.into(),
            mtu,
            ..nic("eth0", tap, "")
        };
        let cases = [
            (
                with("lo", "br0", 0),
                "spec.nics[0].bridge: only for a tap the agent makes",
            ),
            (
                with("lo", "", 1500),
                "spec.nics[0].mtu: only for a tap the agent makes",
            ),
            (
                with("", "", 0),
                "spec.nics[0].bridge: needed for a tap the agent makes",
            ),
            (
                with("", "a/b", 0),
                "spec.nics[0].bridge: 'a/b' is not an interface name",
            ),
            (
                with("", "br0", 67),
                "spec.nics[0].mtu: must be 68 to 65535, got 67",
            ),
            (with("", "br0", 65536), "spec.nics[0].mtu: must be 68 to 65535"),
            // Loopback exists everywhere and is no bridge.
            (with("", "lo", 1500), "spec.nics[0].bridge: 'lo' is not a bridge"),
            (
                with("", "vmmt-none0", 0),
                "spec.nics[0].bridge: no network interface 'vmmt-none0'",
            ),
        ];
        for (n, want) in cases {
            let err = check_nics(&[n]).unwrap_err().to_string();
            assert!(err.starts_with(want), "{want}: {err}");
        }
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
            // No tap: the agent would make one, but on no bridge.
            (vec![nic("eth0", "", "")], "spec.nics[0].bridge"),
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
        let net = to_net_config(0, &n);
        assert_eq!(net.tap.as_deref(), Some("tap0"));
        assert_eq!(net.fd, None);
        assert_eq!(
            net.mac.map(|m| m.to_string()).as_deref(),
            Some("02:00:00:00:00:01")
        );
        let ops = net.rx_rate_limiter.and_then(|r| r.ops).unwrap();
        assert_eq!((ops.size, ops.one_time_burst, ops.refill_time_ms), (100, 5, 1000));
        assert!(net.tx_rate_limiter.is_none());
        // The agent's tap reaches the vmm as a descriptor named after the NIC's index.
        let mut agent_made = nic("eth1", "", "");
        agent_made.bridge = "br0".into();
        let net = to_net_config(3, &agent_made);
        assert_eq!((net.tap, net.fd.as_deref()), (None, Some("nic3")));
    }
}
