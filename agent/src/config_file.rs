//! The agent's TOML configuration file (`--config /etc/vmm-agent.toml`): the same settings as its
//! flags, which override it. Unknown keys are refused, so that a misspelt setting is not silently
//! ignored.
//!
//! ```toml
//! state_dir = "/var/lib/vmm-agent"
//! listen = ["unix:/var/lib/vmm-agent/agent.sock", "tcp://0.0.0.0:7443"]
//! reserve_memory_mib = 2048
//! restore_on_boot = true
//! metrics_listen = "127.0.0.1:9464"
//! vms_cpu_max = 14.5
//! bridge = "br0"
//! [tls]
//! cert = "/etc/vmm-agent/agent.pem"
//! key = "/etc/vmm-agent/agent.key"
//! client_ca = "/etc/vmm-agent/clients-ca.pem"
//! [labels]
//! zone = "z1"
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// It cannot be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// It is not TOML of the expected shape (unknown keys included); the message names the key
    /// and its line.
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
}

/// TLS settings of `tcp://` listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// `--tls-cert`.
    pub cert: Option<PathBuf>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
    /// `--tls-client-ca`.
    pub client_ca: Option<PathBuf>,
}

/// Every setting, each optional (a flag or the built-in default fills what is missing).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--listen`, all of them.
    pub listen: Option<Vec<String>>,
    /// `--vmm-bin`.
    pub vmm_bin: Option<PathBuf>,
    /// `--reserve-memory-mib`.
    pub reserve_memory_mib: Option<u64>,
    /// `--reserve-vcpus`.
    pub reserve_vcpus: Option<u64>,
    /// `--vcpu-overcommit`.
    pub vcpu_overcommit: Option<u64>,
    /// `--label`s, as a table.
    pub labels: Option<HashMap<String, String>>,
    /// `--adopt-timeout-ms`.
    pub adopt_timeout_ms: Option<u64>,
    /// `--console-log-max-bytes`.
    pub console_log_max_bytes: Option<u64>,
    /// `--restore-on-boot`.
    pub restore_on_boot: Option<bool>,
    /// `--insecure-tcp`.
    pub insecure_tcp: Option<bool>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// `--vm-cgroup`.
    pub vm_cgroup: Option<String>,
    /// `--vms-cpu-max`.
    pub vms_cpu_max: Option<f64>,
    /// `--bridge`.
    pub bridge: Option<String>,
    /// `--nic-mtu`.
    pub nic_mtu: Option<u32>,
    /// `--image-max-bytes`.
    pub image_max_bytes: Option<u64>,
    /// `--max-concurrent-boots`.
    pub max_concurrent_boots: Option<usize>,
    /// `--boot-slot-timeout-secs`.
    pub boot_slot_timeout_secs: Option<u64>,
    /// `--jail-vms`.
    pub jail_vms: Option<bool>,
    /// `--jail-uids`.
    pub jail_uids: Option<String>,
    /// `--tls-*`.
    pub tls: Option<TlsSection>,
}

impl FileConfig {
    /// Parses the text of a configuration file read from `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigFileError> {
        toml::from_str(text).map_err(|e| {
            // toml's message spans lines (it quotes the offending line); keep it readable on one.
            let message = e.message().to_string();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            ConfigFileError::Parse(path.to_path_buf(), format!("{message}{at}"))
        })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read(path.to_path_buf(), e))?;
        Self::parse(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_parses() {
        let text = r#"
            state_dir = "/var/lib/x"
            listen = ["unix:/run/a.sock", "tcp://127.0.0.1:7443"]
            vmm_bin = "/usr/bin/vmm"
            reserve_memory_mib = 2048
            reserve_vcpus = 1
            vcpu_overcommit = 2
            adopt_timeout_ms = 100
            console_log_max_bytes = 65536
            restore_on_boot = true
            insecure_tcp = false
            log_level = "debug"
            metrics_listen = "127.0.0.1:9464"
            bridge = "br0"
            nic_mtu = 1400
            max_concurrent_boots = 3
            boot_slot_timeout_secs = 30
            jail_vms = true
            jail_uids = "5000000:10"
            [labels]
            zone = "z1"
            [tls]
            cert = "/c"
            key = "/k"
            client_ca = "/ca"
        "#;
        let c = FileConfig::parse(Path::new("a.toml"), text).unwrap();
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/var/lib/x")));
        assert_eq!(c.listen.as_ref().map(Vec::len), Some(2));
        assert_eq!(c.reserve_memory_mib, Some(2048));
        assert_eq!(c.restore_on_boot, Some(true));
        assert_eq!(c.metrics_listen.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!((c.bridge.as_deref(), c.nic_mtu), (Some("br0"), Some(1400)));
        assert_eq!(
            (c.max_concurrent_boots, c.boot_slot_timeout_secs),
            (Some(3), Some(30))
        );
        assert_eq!(c.labels.unwrap()["zone"], "z1");
        assert_eq!(c.tls.unwrap().client_ca.as_deref(), Some(Path::new("/ca")));
        assert_eq!(
            FileConfig::parse(Path::new("e.toml"), "").unwrap(),
            FileConfig::default()
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let err = FileConfig::parse(
            Path::new("a.toml"),
            "state_dir = \"/x\"\nreserve_memroy_mib = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("a.toml: unknown field `reserve_memroy_mib`"),
            "{err}"
        );
        assert!(err.ends_with("(line 2)"), "{err}");
        let err = FileConfig::parse(Path::new("a.toml"), "[tls]\ncrt = \"/c\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `crt`"), "{err}");
        let err = FileConfig::parse(Path::new("a.toml"), "vcpu_overcommit = \"four\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid type"), "{err}");
    }
}
