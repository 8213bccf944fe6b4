//! The VM configuration: `vm.json`, or the equivalent command-line flags.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::balloon::{BalloonConfig, HugePages};
use crate::drive::{validate_drives, DriveConfig};
use crate::net::{validate_nets, NetConfig};

/// virtio-mmio devices a VM may have in all (one interrupt line each).
pub const MAX_VIRTIO_DEVICES: usize = 17;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory that a Linux guest can boot in, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Why a configuration was rejected. Messages name the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON, or not the expected shape (includes unknown fields).
    #[error("invalid VM config: {0}")]
    Parse(#[from] serde_json::Error),
    /// A value is out of range.
    #[error("invalid VM config: {field}: {reason}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `machine.vcpus` or `drives[1].path`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, initrd and command line.
    pub boot: BootSource,
    /// vCPUs and memory.
    #[serde(default)]
    pub machine: MachineConfig,
    /// Where the guest's serial console goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-blk drives, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...), except that
    /// the root drive, if any, always comes first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveConfig>,
    /// virtio-net NICs, in the order the guest sees them (`eth0`, `eth1`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// An ELF `vmlinux` (PVH or 64-bit entry) or a `bzImage`.
    pub kernel: PathBuf,
    /// Optional initrd / initramfs image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
}

/// The command line used when none is given: a serial console, no PCI probing, reboot through the
/// keyboard controller, and exit (via pvpanic) one second after a panic.
pub fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1 pci=off".to_string()
}

/// Virtual hardware size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Track the guest pages written since the last snapshot (KVM dirty log and device writes), so
    /// that `snapshot-create` can write a diff. Costs the guest a little on each first write.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub track_dirty_pages: bool,
    /// Offer guest RAM to the host's KSM (`MADV_MERGEABLE`): identical pages of this and other VMs
    /// are merged while `/sys/kernel/mm/ksm/run` is 1. Costs the host CPU for scanning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mergeable: bool,
    /// Transparent huge pages for guest RAM.
    #[serde(default, skip_serializing_if = "HugePages::is_auto")]
    pub hugepages: HugePages,
    /// A virtio-balloon device. (Here rather than at the top level of `vm.json` so that code
    /// building a `VmConfig` field by field keeps compiling: machine options take defaults.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: 1,
            memory_mib: 128,
            track_dirty_pages: false,
            mergeable: false,
            hugepages: HugePages::Auto,
            balloon: None,
        }
    }
}

/// Serial console destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialConfig {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Discard console output.
    Off,
    /// Write console output to this file (created or truncated).
    File(PathBuf),
}

impl VmConfig {
    /// Parses and validates a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: VmConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that parsing alone cannot. Does not touch the file system: whether files
    /// exist and the host has the memory is for the VMM to find out when it builds the VM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > MAX_VCPUS {
            return Err(invalid(
                "machine.vcpus",
                format!("must be 1 to {MAX_VCPUS}, got {}", m.vcpus),
            ));
        }
        if m.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "machine.memory_mib",
                format!("must be at least {MIN_MEMORY_MIB}, got {}", m.memory_mib),
            ));
        }
        // Bounded so that byte sizes never overflow, far above any host's memory.
        if m.memory_mib > 1 << 30 {
            return Err(invalid(
                "machine.memory_mib",
                format!("{} is too large", m.memory_mib),
            ));
        }
        if self.boot.kernel.as_os_str().is_empty() {
            return Err(invalid("boot.kernel", "must not be empty".into()));
        }
        if self
            .boot
            .initrd
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("boot.initrd", "must not be empty".into()));
        }
        if self.boot.cmdline.bytes().any(|b| b == 0) {
            return Err(invalid("boot.cmdline", "must not contain NUL bytes".into()));
        }
        validate_drives(&self.drives)?;
        validate_nets(&self.nets)?;
        if let Some(balloon) = &m.balloon {
            balloon.validate(m.memory_mib)?;
        }
        let devices = self.drives.len() + self.nets.len() + usize::from(m.balloon.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "nets",
                format!("at most {MAX_VIRTIO_DEVICES} drives, NICs and balloon together, got {devices}"),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::invalid(field, reason)
}

impl ConfigError {
    /// A value of `field` is out of range.
    pub fn invalid(field: impl Into<String>, reason: String) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_minimal_configs() {
        let full = r#"{
            "boot": {"kernel": "/k", "initrd": "/i", "cmdline": "console=ttyS0"},
            "machine": {"vcpus": 4, "memory_mib": 3584},
            "serial": {"file": "/tmp/console.log"},
            "drives": [
                {"id": "root", "path": "/r.img", "root": true, "read_only": true},
                {"id": "data", "path": "/d.img", "serial": "D1", "engine": "sync",
                 "rate_limiter": {"ops": {"size": 100, "refill_time_ms": 1000}}}
            ]
        }"#;
        let c = VmConfig::from_json(full).unwrap();
        assert_eq!(
            c.machine,
            MachineConfig {
                vcpus: 4,
                memory_mib: 3584,
                ..MachineConfig::default()
            }
        );
        assert_eq!(c.serial, SerialConfig::File("/tmp/console.log".into()));
        assert_eq!(c.boot.initrd, Some("/i".into()));
        assert_eq!(c.drives.len(), 2);
        assert!(c.drives[0].root && c.drives[0].read_only);
        assert_eq!(c.drives[1].serial(), "D1");

        let minimal = VmConfig::from_json(r#"{"boot": {"kernel": "/k"}, "serial": "off"}"#).unwrap();
        assert_eq!(minimal.machine, MachineConfig::default());
        assert_eq!(minimal.boot.cmdline, default_cmdline());
        assert_eq!(minimal.serial, SerialConfig::Off);
        // Round trip.
        let again = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn memory_levers_parse() {
        let c = VmConfig::from_json(
            r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": 256, "mergeable": true,
                "hugepages": "thp", "balloon": {"amount_mib": 64, "deflate_on_oom": true,
                "stats_interval_s": 1, "free_page_reporting": true}}}"#,
        )
        .unwrap();
        assert!(c.machine.mergeable);
        assert_eq!(c.machine.hugepages, HugePages::Thp);
        let b = c.machine.balloon.clone().unwrap();
        assert_eq!((b.amount_mib, b.stats_interval_s), (64, 1));
        assert!(b.deflate_on_oom && b.free_page_reporting);
        let again = VmConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        // Defaults stay out of the serialized form.
        let minimal = VmConfig::from_json(r#"{"boot": {"kernel": "/k"}}"#).unwrap();
        let text = serde_json::to_string(&minimal).unwrap();
        assert!(!text.contains("hugepages") && !text.contains("balloon"), "{text}");
    }

    #[test]
    fn rejects_bad_configs_naming_the_field() {
        let cases = [
            (
                r#"{"boot": {"kernel": "/k"}, "extra": 1}"#,
                "unknown field `extra`",
            ),
            (
                r#"{"boot": {"kernel": "/k", "initrd_path": "/i"}}"#,
                "unknown field `initrd_path`",
            ),
            (r#"{"boot": {"kernel": "/k"}"#, "EOF"),
            (
                r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 0, "memory_mib": 128}}"#,
                "machine.vcpus",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 33, "memory_mib": 128}}"#,
                "machine.vcpus",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": 0}}"#,
                "machine.memory_mib",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": -1}}"#,
                "invalid value",
            ),
            (r#"{"boot": {"kernel": ""}}"#, "boot.kernel"),
            (
                r#"{"boot": {"kernel": "/k"}, "drives": [{"id": "a", "path": "/a", "cache_mode": "none"}]}"#,
                "unknown field `cache_mode`",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "drives": [{"id": "a", "path": "/a", "engine": "aio"}]}"#,
                "unknown variant `aio`",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "drives": [{"id": "a", "path": "/a", "serial": "é"}]}"#,
                "drives[0].serial",
            ),
            (
                r#"{"machine": {"vcpus": 1, "memory_mib": 64}}"#,
                "missing field `boot`",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": 64, "balloon": {"size": 1}}}"#,
                "unknown field `size`",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": 64, "balloon": {"amount_mib": 65}}}"#,
                "machine.balloon.amount_mib",
            ),
            (
                r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": 64, "hugepages": "always"}}"#,
                "unknown variant `always`",
            ),
        ];
        for (json, expected) in cases {
            let err = VmConfig::from_json(json).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
