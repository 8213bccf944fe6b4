//! Block devices: `drives` in `vm.json`, or `--drive path=...,id=...` flags.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::rate_limiter::{RateLimiterCliKeys, RateLimiterConfig};

/// Most drives a VM may have (each takes one of the 17 interrupt lines left for virtio devices).
pub const MAX_DRIVES: usize = 16;
/// Longest drive serial (virtio-blk GET_ID returns 20 bytes).
pub const MAX_SERIAL_LEN: usize = 20;

/// How a drive's I/O is performed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEngine {
    /// io_uring: many requests in flight, completions signalled to the event loop (default). Falls
    /// back to `sync` if the host refuses io_uring.
    #[default]
    Uring,
    /// Blocking system calls on the VMM's event loop.
    Sync,
}

/// Whether a drive's I/O goes through the host page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Through the page cache (default): flushes (`fdatasync`) make writes durable.
    #[default]
    Writeback,
    /// Direct I/O (`O_DIRECT`): no host page cache, less host CPU per byte, the guest's own cache is
    /// the only one. Flushes still `fdatasync`.
    None,
}

/// One virtio-blk drive on a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique name of the drive within the VM (1-64 of `A-Z a-z 0-9 _ -`).
    pub id: String,
    /// The raw image (a regular file or block device), its size a multiple of 512. Exactly one of
    /// `path` and `fd` is given.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub path: PathBuf,
    /// The name of an already open image passed to the VMM over its control socket (`add-fds`) or
    /// inherited at launch (`vmm --fd NAME=N`), instead of a path: a supervisor opens (and may sandbox away) the file itself. Such a drive
    /// uses the page cache (`cache=writeback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<String>,
    /// A base image under this drive, making it copy-on-write: the image (`path` or `fd`) then holds
    /// only what the guest wrote, and blocks it never wrote read from the base. The image is a
    /// sparse file at least as large as the base (its size is the disk's), created empty by whoever
    /// sets the drive up; it must stay on a file system that reports holes (`SEEK_HOLE`), and its
    /// holes must never be punched by anything else. The base is opened read-only under a shared
    /// lock, so any number of drives share it; it must not change while any overlay uses it. Such a
    /// drive offers no discard or write-zeroes (a hole would expose the base again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<PathBuf>,
    /// The guest may only read (VIRTIO_BLK_F_RO); the image is opened read-only.
    #[serde(default)]
    pub read_only: bool,
    /// The root file system: the drive becomes `/dev/vda` and `root=/dev/vda ro|rw` is added to the
    /// kernel command line. At most one drive.
    #[serde(default)]
    pub root: bool,
    /// What GET_ID returns (printable ASCII, at most 20 bytes); defaults to the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The I/O engine.
    #[serde(default)]
    pub engine: IoEngine,
    /// Host page cache use.
    #[serde(default)]
    pub cache: CacheMode,
    /// Throttling; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DriveConfig {
    /// The serial the guest sees.
    pub fn serial(&self) -> &str {
        self.serial.as_deref().unwrap_or(&self.id)
    }

    /// Parses a `--drive` value: `path=P|fd=NAME[,backing=BASE][,id=ID][,ro=on|off][,root=on|off][,serial=S]
    /// [,engine=uring|sync][,cache=writeback|none][,bw=N][,bw_burst=N][,iops=N][,iops_burst=N]`. `index` names the drive
    /// (`drive<index>`) when no id is given.
    pub fn from_cli(spec: &str, index: usize) -> Result<Self, String> {
        let mut path = None;
        let mut fd = None;
        let mut backing = None;
        let mut id = None;
        let mut read_only = false;
        let mut root = false;
        let mut serial = None;
        let mut engine = IoEngine::default();
        let mut cache = CacheMode::default();
        let mut limits = RateLimiterCliKeys::default();
        for (key, value) in cli_pairs(spec)? {
            match key {
                "path" => path = Some(PathBuf::from(value)),
                "fd" => fd = Some(value.to_string()),
                "backing" => backing = Some(PathBuf::from(value)),
                "id" => id = Some(value.to_string()),
                "ro" => read_only = on_off(key, value)?,
                "root" => root = on_off(key, value)?,
                "serial" => serial = Some(value.to_string()),
                "engine" => {
                    engine = match value {
                        "uring" => IoEngine::Uring,
                        "sync" => IoEngine::Sync,
                        _ => return Err(format!("engine must be uring or sync, got '{value}'")),
                    }
                }
                "cache" => {
                    cache = match value {
                        "writeback" => CacheMode::Writeback,
                        "none" => CacheMode::None,
                        _ => return Err(format!("cache must be writeback or none, got '{value}'")),
                    }
                }
                _ => {
                    if !limits.set(key, value).map_err(|e| e.to_string())? {
                        return Err(format!("unknown key '{key}'"));
                    }
                }
            }
        }
        let rate_limiter = limits.to_config().map_err(|e| e.to_string())?;
        Ok(DriveConfig {
            id: id.unwrap_or_else(|| format!("drive{index}")),
            // Both given is left to `validate_drives` to refuse.
            path: match (path, &fd) {
                (Some(path), _) => path,
                (None, Some(_)) => PathBuf::new(),
                (None, None) => {
                    return Err("path=PATH (or fd=NAME, a passed image descriptor) is required".into())
                }
            },
            fd,
            backing,
            read_only,
            root,
            serial,
            engine,
            cache,
            rate_limiter: (!rate_limiter.is_unlimited()).then_some(rate_limiter),
        })
    }
}

/// Checks `ids[i]`, the id of entry `i` of `section` (`drives`, `nets`): a valid name that no
/// earlier entry uses.
pub(crate) fn check_id(section: &str, ids: &[&str], i: usize, what: &str) -> Result<(), ConfigError> {
    let field = format!("{section}[{i}].id");
    let id = ids[i];
    if !is_valid_name(id) {
        return Err(ConfigError::invalid(
            field,
            "must be 1-64 characters of A-Z a-z 0-9 _ -".into(),
        ));
    }
    if ids[..i].contains(&id) {
        return Err(ConfigError::invalid(field, format!("duplicate {what} id '{id}'")));
    }
    Ok(())
}

/// The `KEY=VALUE` items of a comma-separated device spec (`--drive`, `--net`), each key once.
pub(crate) fn cli_pairs(spec: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not KEY=VALUE"))?;
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(format!("{key} given more than once"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn is_empty_path(path: &std::path::Path) -> bool {
    path.as_os_str().is_empty()
}

/// Whether `name` may name a drive, a passed file descriptor, or another VMM resource:
/// 1-64 characters of `A-Z a-z 0-9 _ -`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub(crate) fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{key} must be on or off, got '{value}'")),
    }
}

/// Checks the drives of a VM: sizes, names, serials, at most one root.
pub fn validate_drives(drives: &[DriveConfig]) -> Result<(), ConfigError> {
    if drives.len() > MAX_DRIVES {
        return Err(ConfigError::invalid(
            "drives",
            format!("at most {MAX_DRIVES} drives, got {}", drives.len()),
        ));
    }
    let ids: Vec<&str> = drives.iter().map(|d| d.id.as_str()).collect();
    for (i, d) in drives.iter().enumerate() {
        let field = |name: &str| format!("drives[{i}].{name}");
        check_id("drives", &ids, i, "drive")?;
        match (&d.fd, d.path.as_os_str().is_empty()) {
            (None, true) => {
                return Err(ConfigError::invalid(
                    field("path"),
                    "must not be empty (give path or fd)".into(),
                ))
            }
            (Some(_), false) => {
                return Err(ConfigError::invalid(
                    field("fd"),
                    "give either path or fd, not both".into(),
                ))
            }
            (Some(name), true) if !is_valid_name(name) => {
                return Err(ConfigError::invalid(
                    field("fd"),
                    "must be 1-64 characters of A-Z a-z 0-9 _ -".into(),
                ))
            }
            (Some(_), true) if d.cache == CacheMode::None => {
                return Err(ConfigError::invalid(
                    field("cache"),
                    "cache=none needs a path: direct I/O opens the image a second time".into(),
                ))
            }
            _ => {}
        }
        if let Some(base) = &d.backing {
            if !base.is_absolute() {
                return Err(ConfigError::invalid(
                    field("backing"),
                    format!("{} is not an absolute path", base.display()),
                ));
            }
            if d.cache == CacheMode::None {
                return Err(ConfigError::invalid(
                    field("cache"),
                    "a drive with a backing image uses the page cache (cache=writeback)".into(),
                ));
            }
        }
        let serial = d.serial();
        if serial.len() > MAX_SERIAL_LEN || !serial.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                field("serial"),
                format!("must be at most {MAX_SERIAL_LEN} printable ASCII characters"),
            ));
        }
        if let Some(limits) = &d.rate_limiter {
            limits
                .validate()
                .map_err(|e| ConfigError::invalid(field("rate_limiter"), e.to_string()))?;
        }
    }
    if drives.iter().filter(|d| d.root).count() > 1 {
        return Err(ConfigError::invalid(
            "drives",
            "at most one drive may be the root".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn cli_spec_round_trip() {
        let d = DriveConfig::from_cli("path=/d.img,id=data,ro=on,serial=S1,engine=sync,iops=100", 3).unwrap();
        assert_eq!(d.id, "data");
        assert!(d.read_only && !d.root);
        assert_eq!(d.serial(), "S1");
        assert_eq!(d.engine, IoEngine::Sync);
        assert_eq!(d.rate_limiter.and_then(|r| r.ops).map(|o| o.size), Some(100));
        assert_eq!(d.cache, CacheMode::Writeback);
        let d = DriveConfig::from_cli("path=/r.img,root=on,cache=none", 2).unwrap();
        assert_eq!(d.cache, CacheMode::None);
        assert_eq!((d.id.as_str(), d.root, d.serial()), ("drive2", true, "drive2"));
        assert!(d.rate_limiter.is_none());
        let d = DriveConfig::from_cli("path=/vm/root.overlay,backing=/images/base.img", 0).unwrap();
        assert_eq!(d.backing.as_deref(), Some(Path::new("/images/base.img")));
        let d = DriveConfig::from_cli("fd=disk,id=data,ro=on", 0).unwrap();
        assert_eq!(
            (d.path.as_os_str().is_empty(), d.fd.as_deref()),
            (true, Some("disk"))
        );
        assert!(validate_drives(std::slice::from_ref(&d)).is_ok());
        let both = DriveConfig::from_cli("path=/a,fd=disk", 0).unwrap();
        let err = validate_drives(&[both]).unwrap_err().to_string();
        assert!(err.contains("either path or fd"), "{err}");
        for (bad, why) in [
            ("id=x", "path"),
            ("path=/a,ro=maybe", "ro"),
            ("path=/a,engine=aio", "engine"),
            ("path=/a,cache=unsafe", "cache"),
            ("path=/a,color=red", "unknown key"),
            ("path=/a,path=/b", "more than once"),
            ("path", "KEY=VALUE"),
            ("path=/a,bw=fast", "bw"),
        ] {
            let err = DriveConfig::from_cli(bad, 0).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = DriveConfig::from_cli("path=/a", 0).unwrap();
        let with = |f: &dyn Fn(&mut DriveConfig)| {
            let mut d = ok.clone();
            f(&mut d);
            d
        };
        assert!(validate_drives(std::slice::from_ref(&ok)).is_ok());
        let by_fd = with(&|d| {
            d.path = PathBuf::new();
            d.fd = Some("disk-1".into())
        });
        assert!(validate_drives(std::slice::from_ref(&by_fd)).is_ok());
        let json = serde_json::to_string(&by_fd).unwrap();
        assert!(!json.contains("path"), "{json}");
        assert_eq!(serde_json::from_str::<DriveConfig>(&json).unwrap(), by_fd);
        let cases: Vec<(Vec<DriveConfig>, &str)> = vec![
            (vec![with(&|d| d.id = "a b".into())], "drives[0].id"),
            (vec![ok.clone(), ok.clone()], "duplicate"),
            (
                vec![with(&|d| d.serial = Some("x".repeat(21)))],
                "drives[0].serial",
            ),
            (vec![with(&|d| d.path = PathBuf::new())], "drives[0].path"),
            (vec![with(&|d| d.fd = Some("f".into()))], "drives[0].fd"),
            (
                vec![with(&|d| d.backing = Some("base.img".into()))],
                "drives[0].backing",
            ),
            (
                vec![with(&|d| {
                    d.backing = Some("/base.img".into());
                    d.cache = CacheMode::None
                })],
                "drives[0].cache",
            ),
            (
                vec![with(&|d| {
                    d.path = PathBuf::new();
                    d.fd = Some("bad name".into())
                })],
                "drives[0].fd",
            ),
            (
                vec![with(&|d| {
                    d.path = PathBuf::new();
                    d.fd = Some("f".into());
                    d.cache = CacheMode::None
                })],
                "drives[0].cache",
            ),
            (
                vec![
                    with(&|d| d.root = true),
                    with(&|d| {
                        d.root = true;
                        d.id = "b".into()
                    }),
                ],
                "root",
            ),
            (vec![ok.clone(); MAX_DRIVES + 1], "at most"),
        ];
        for (drives, want) in cases {
            let err = validate_drives(&drives).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
