//! Network interfaces: `nets` in `vm.json`, or `--net tap=...,mac=...,id=...` flags.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::ConfigError;
use crate::drive::{check_id, cli_pairs, is_valid_name};
use crate::rate_limiter::{RateLimiterCliKeys, RateLimiterConfig};

/// Most NICs a VM may have.
pub const MAX_NETS: usize = 8;
/// Longest Linux interface name (IFNAMSIZ minus the terminating NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// An Ethernet address, written `02:00:00:00:00:01` in JSON and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether the group (multicast) bit is set: such an address cannot be a NIC's own.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// A locally administered unicast address derived from `seed` (the NIC's index and id), stable
    /// across restarts of the same configuration.
    pub fn derived(seed: &str) -> MacAddr {
        // FNV-1a: small, deterministic, good enough to spread a handful of names.
        let hash = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let b = hash.to_le_bytes();
        // 0x02: locally administered, unicast.
        MacAddr([0x02, b[0], b[1], b[2], b[3], b[4]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a MAC address like 02:00:00:00:00:01");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One virtio-net NIC on a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique name of the NIC within the VM (1-64 of `A-Z a-z 0-9 _ -`).
    pub id: String,
    /// The host TAP device, which must exist (created by the operator or the agent, attached to a
    /// bridge or routed as they see fit). Exactly one of `tap` and `fd` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The name of an already open TAP file descriptor passed over the control socket (`add-fds`)
    /// or inherited at launch (`vmm --fd NAME=N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<String>,
    /// The guest's MAC address; derived from the id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Throttling of what the guest receives; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Throttling of what the guest sends; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// The MAC the guest sees.
    pub fn mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| MacAddr::derived(&self.id))
    }

    /// Parses a `--net` value: `tap=NAME|fd=NAME[,mac=MAC][,id=ID][,rx_bw=N][,rx_bw_burst=N]
    /// [,rx_iops=N][,rx_iops_burst=N][,tx_bw=...]`. `index` names the NIC (`net<index>`) when no id
    /// is given. Giving both `tap` and `fd` is left to [`validate_nets`] to refuse.
    pub fn from_cli(spec: &str, index: usize) -> Result<Self, String> {
        let mut tap = None;
        let mut fd = None;
        let mut id = None;
        let mut mac = None;
        let mut rx = RateLimiterCliKeys::default();
        let mut tx = RateLimiterCliKeys::default();
        for (key, value) in cli_pairs(spec)? {
            match key {
                "tap" => tap = Some(value.to_string()),
                "fd" => fd = Some(value.to_string()),
                "id" => id = Some(value.to_string()),
                "mac" => mac = Some(value.parse()?),
                _ => {
                    let taken = match (key.strip_prefix("rx_"), key.strip_prefix("tx_")) {
                        (Some(k), _) => rx.set(k, value).map_err(|e| e.to_string())?,
                        (_, Some(k)) => tx.set(k, value).map_err(|e| e.to_string())?,
                        _ => false,
                    };
                    if !taken {
                        return Err(format!("unknown key '{key}'"));
                    }
                }
            }
        }
        if tap.is_none() && fd.is_none() {
            return Err("tap=NAME (or fd=NAME, a passed tap descriptor) is required".into());
        }
        Ok(NetConfig {
            id: id.unwrap_or_else(|| format!("net{index}")),
            tap,
            fd,
            mac,
            rx_rate_limiter: limits(&rx)?,
            tx_rate_limiter: limits(&tx)?,
        })
    }
}

fn limits(keys: &RateLimiterCliKeys<'_>) -> Result<Option<RateLimiterConfig>, String> {
    let config = keys.to_config().map_err(|e| e.to_string())?;
    Ok((!config.is_unlimited()).then_some(config))
}

/// Checks the NICs of a VM: names, one backend each, unique unicast MACs, limits.
pub fn validate_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    if nets.len() > MAX_NETS {
        return Err(ConfigError::invalid(
            "nets",
            format!("at most {MAX_NETS} NICs, got {}", nets.len()),
        ));
    }
    let ids: Vec<&str> = nets.iter().map(|n| n.id.as_str()).collect();
    for (i, n) in nets.iter().enumerate() {
        let field = |name: &str| format!("nets[{i}].{name}");
        check_id("nets", &ids, i, "NIC")?;
        match (&n.tap, &n.fd) {
            (Some(tap), None) => {
                let ok = (1..=MAX_TAP_NAME_LEN).contains(&tap.len())
                    && tap
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
                if !ok {
                    return Err(ConfigError::invalid(
                        field("tap"),
                        format!(
                            "'{tap}' is not an interface name (1-{MAX_TAP_NAME_LEN} printable characters, no '/' or ':')"
                        ),
                    ));
                }
            }
            (None, Some(name)) if is_valid_name(name) => {}
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    field("fd"),
                    "must be 1-64 characters of A-Z a-z 0-9 _ -".into(),
                ))
            }
            _ => {
                return Err(ConfigError::invalid(
                    field("tap"),
                    "give exactly one of tap and fd".into(),
                ))
            }
        }
        let mac = n.mac();
        if mac.is_multicast() || mac.0 == [0; 6] {
            return Err(ConfigError::invalid(
                field("mac"),
                format!("{mac} is not a unicast address"),
            ));
        }
        if nets[..i].iter().any(|other| other.mac() == mac) {
            return Err(ConfigError::invalid(field("mac"), format!("duplicate MAC {mac}")));
        }
        for (name, limits) in [
            ("rx_rate_limiter", &n.rx_rate_limiter),
            ("tx_rate_limiter", &n.tx_rate_limiter),
        ] {
            if let Some(limits) = limits {
                limits
                    .validate()
                    .map_err(|e| ConfigError::invalid(field(name), e.to_string()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_prints_and_refuses_junk() {
        let mac: MacAddr = "02:aB:00:10:ff:09".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0xab, 0x00, 0x10, 0xff, 0x09]);
        assert_eq!(mac.to_string(), "02:ab:00:10:ff:09");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "02-00-00-00-00-00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"02:ab:00:10:ff:09\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        let derived = MacAddr::derived("net0");
        assert_eq!(derived, MacAddr::derived("net0"));
        assert_ne!(derived, MacAddr::derived("net1"));
        assert!(!derived.is_multicast() && derived.0[0] & 2 == 2);
    }

    #[test]
    fn cli_spec() {
        let n = NetConfig::from_cli("tap=tap0,mac=02:00:00:00:00:07,id=eth,rx_bw=1M,tx_iops=100", 0).unwrap();
        assert_eq!((n.id.as_str(), n.tap.as_deref()), ("eth", Some("tap0")));
        assert_eq!(n.mac().to_string(), "02:00:00:00:00:07");
        assert!(n.rx_rate_limiter.as_ref().is_some_and(|r| r.bandwidth.is_some()));
        assert!(n.tx_rate_limiter.as_ref().is_some_and(|r| r.ops.is_some()));
        let n = NetConfig::from_cli("tap=t1", 3).unwrap();
        assert_eq!(n.id, "net3");
        assert!(n.rx_rate_limiter.is_none() && n.tx_rate_limiter.is_none());
        let n = NetConfig::from_cli("fd=tap-fd,id=eth0", 0).unwrap();
        assert_eq!((n.tap, n.fd.as_deref()), (None, Some("tap-fd")));
        let both = NetConfig::from_cli("tap=t,fd=f", 0).unwrap();
        let err = validate_nets(&[both]).unwrap_err().to_string();
        assert!(err.contains("exactly one of tap and fd"), "{err}");
        for (bad, why) in [
            ("mac=02:00:00:00:00:01", "tap"),
            ("tap=a,mac=nope", "MAC"),
            ("tap=a,color=red", "unknown key"),
            ("tap=a,tap=b", "more than once"),
            ("tap=a,rx_bw=fast", "bw"),
        ] {
            let err = NetConfig::from_cli(bad, 0).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = NetConfig::from_cli("tap=tap0", 0).unwrap();
        assert!(validate_nets(std::slice::from_ref(&ok)).is_ok());
        let with = |f: &dyn Fn(&mut NetConfig)| {
            let mut n = ok.clone();
            f(&mut n);
            n
        };
        let other = with(&|n| {
            n.id = "b".into();
            n.tap = Some("tap1".into())
        });
        let cases: Vec<(Vec<NetConfig>, &str)> = vec![
            (vec![with(&|n| n.id = "a b".into())], "nets[0].id"),
            (vec![ok.clone(), ok.clone()], "duplicate NIC id"),
            (vec![with(&|n| n.tap = Some("x".repeat(16)))], "nets[0].tap"),
            (vec![with(&|n| n.tap = Some("a/b".into()))], "nets[0].tap"),
            (vec![with(&|n| n.tap = None)], "exactly one"),
            (vec![with(&|n| n.fd = Some("f".into()))], "exactly one"),
            (
                vec![with(&|n| n.mac = Some(MacAddr([1, 0, 0, 0, 0, 1])))],
                "nets[0].mac",
            ),
            (
                vec![with(&|n| n.mac = Some(MacAddr([2, 0, 0, 0, 0, 1]))), {
                    let mut o = other.clone();
                    o.mac = Some(MacAddr([2, 0, 0, 0, 0, 1]));
                    o
                }],
                "duplicate MAC",
            ),
            (vec![ok.clone(); MAX_NETS + 1], "at most"),
        ];
        for (nets, want) in cases {
            let err = validate_nets(&nets).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        assert!(validate_nets(&[ok, other]).is_ok());
    }
}
