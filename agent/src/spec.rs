//! Checking what clients send: VM ids, specs, labels and label selectors, and turning a spec into the
//! `vm.json` the vmm boots from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use vmm_api::config::{BootSource, MachineConfig, SerialConfig, VmConfig, MAX_VCPUS, MIN_MEMORY_MIB};
use vmm_api::drive::{DriveConfig, MAX_DRIVES};

use crate::error::AgentError;
use crate::proto::VmSpec;

/// Longest VM id.
pub const MAX_VM_ID_LEN: usize = 63;
/// Most labels on one VM.
pub const MAX_LABELS: usize = 64;

/// Checks a VM id: 1-63 of `a-z 0-9 -`, not starting or ending with `-` (it names a directory and
/// appears in socket paths, so it must stay short and plain).
pub fn check_vm_id(field: &str, id: &str) -> Result<(), AgentError> {
    let ok = (1..=MAX_VM_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AgentError::invalid(
            field,
            format!("must be 1-{MAX_VM_ID_LEN} of a-z 0-9 - (not starting or ending with -)"),
        ))
    }
}

/// Checks a request id: at most 128 printable ASCII characters (empty means none).
pub fn check_request_id(id: &str) -> Result<(), AgentError> {
    if id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AgentError::invalid(
            "request_id",
            "must be at most 128 printable ASCII characters",
        ));
    }
    Ok(())
}

fn is_label_text(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

/// Checks labels: keys 1-63 and values 0-63 of `A-Z a-z 0-9 . _ - /`.
pub fn check_labels(field: &str, labels: &HashMap<String, String>) -> Result<(), AgentError> {
    if labels.len() > MAX_LABELS {
        return Err(AgentError::invalid(field, format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        if k.is_empty() || !is_label_text(k) {
            return Err(AgentError::invalid(
                field,
                format!("key '{k}' must be 1-63 of A-Z a-z 0-9 . _ - /"),
            ));
        }
        if !is_label_text(v) {
            return Err(AgentError::invalid(
                format!("{field}[{k}]"),
                "value must be at most 63 of A-Z a-z 0-9 . _ - /",
            ));
        }
    }
    Ok(())
}

fn check_file(field: &str, path: &str) -> Result<(), AgentError> {
    if path.is_empty() {
        return Err(AgentError::invalid(field, "must not be empty"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(AgentError::invalid(field, "must be an absolute path"));
    }
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() || !m.is_dir() => Ok(()),
        Ok(_) => Err(AgentError::invalid(field, format!("{path} is a directory"))),
        Err(e) => Err(AgentError::invalid(field, format!("cannot read {path}: {e}"))),
    }
}

/// Checks every field of a spec (including that its files exist on this host), naming the first
/// offending one as `spec.<field>`. A spec on images is checked once they are resolved into it
/// (`images::resolve_spec`), but for the overlays, which do not exist yet.
pub fn check_spec(spec: Option<&VmSpec>) -> Result<&VmSpec, AgentError> {
    let Some(spec) = spec else {
        return Err(AgentError::invalid("spec", "is required"));
    };
    if spec.vcpus == 0 || spec.vcpus > u32::from(MAX_VCPUS) {
        return Err(AgentError::invalid(
            "spec.vcpus",
            format!("must be 1 to {MAX_VCPUS}, got {}", spec.vcpus),
        ));
    }
    if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > 1 << 30 {
        return Err(AgentError::invalid(
            "spec.memory_mib",
            format!(
                "must be {MIN_MEMORY_MIB} to {}, got {}",
                1u64 << 30,
                spec.memory_mib
            ),
        ));
    }
    check_file("spec.kernel", &spec.kernel)?;
    if !spec.initrd.is_empty() {
        check_file("spec.initrd", &spec.initrd)?;
    }
    if spec.cmdline.len() > 4096 || spec.cmdline.bytes().any(|b| b == 0 || b == b'\n') {
        return Err(AgentError::invalid(
            "spec.cmdline",
            "must be at most 4096 bytes, without NUL or newline",
        ));
    }
    if spec.disks.len() > MAX_DRIVES {
        return Err(AgentError::invalid(
            "spec.disks",
            format!("at most {MAX_DRIVES} disks, got {}", spec.disks.len()),
        ));
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        // An overlay on an image is the agent's to make (`images::resolve_spec`), after this.
        if disk.image_id.is_empty() {
            check_file(&format!("spec.disks[{i}].path"), &disk.path)?;
        }
    }
    if spec.disks.iter().filter(|d| d.root).count() > 1 {
        return Err(AgentError::invalid(
            "spec.disks",
            "at most one disk may be the root",
        ));
    }
    check_labels("spec.labels", &spec.labels)?;
    crate::nics::check_nics(&spec.nics)?;
    crate::memory::check_memory_options(spec)?;
    // The vmm's own rules, as a last line (they name vm.json fields, so map them back roughly).
    to_vm_config(spec, Path::new("/console.log"), Path::new("/images"))
        .validate()
        .map_err(|e| AgentError::invalid("spec", e.to_string()))?;
    Ok(spec)
}

/// The vmm configuration for `spec`, with the serial console written to `console_log`; a disk on
/// an image is a copy-on-write overlay of that image's rootfs under `images_dir`.
pub fn to_vm_config(spec: &VmSpec, console_log: &Path, images_dir: &Path) -> VmConfig {
    let machine = MachineConfig {
        // check_spec bounds vcpus to 1..=32 first; clamp anyway rather than wrap.
        vcpus: u8::try_from(spec.vcpus).unwrap_or(u8::MAX),
        memory_mib: spec.memory_mib,
        track_dirty_pages: spec.track_dirty_pages,
        mergeable: spec.mergeable,
        hugepages: crate::memory::hugepages(spec),
        balloon: spec.balloon.as_ref().map(crate::memory::balloon_config),
    };
    VmConfig {
        boot: BootSource {
            kernel: PathBuf::from(&spec.kernel),
            initrd: (!spec.initrd.is_empty()).then(|| PathBuf::from(&spec.initrd)),
            cmdline: if spec.cmdline.is_empty() {
                vmm_api::config::default_cmdline()
            } else {
                spec.cmdline.clone()
            },
        },
        machine,
        serial: SerialConfig::File(console_log.to_path_buf()),
        drives: spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| DriveConfig {
                id: format!("disk{i}"),
                path: PathBuf::from(&d.path),
                fd: None,
                backing: (!d.image_id.is_empty())
                    .then(|| crate::images::backing_path(images_dir, &d.image_id)),
                read_only: d.read_only,
                root: d.root,
                serial: None,
                engine: Default::default(),
                cache: Default::default(),
                rate_limiter: None,
            })
            .collect(),
        nets: spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| crate::nics::to_net_config(i, n))
            .collect(),
    }
}

/// One term of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A parsed label selector: comma-separated `k=v`, `k==v`, `k!=v`, `k` and `!k` terms, all of which
/// must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

impl Selector {
    /// Parses `text`; an error names the field `label_selector`.
    pub fn parse(text: &str) -> Result<Selector, AgentError> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let bad = || AgentError::invalid("label_selector", format!("bad term '{raw}'"));
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::Absent(k.trim().into())
            } else {
                Term::Exists(raw.into())
            };
            let (Term::Equals(k, v) | Term::NotEquals(k, v)) = &term else {
                let (Term::Exists(k) | Term::Absent(k)) = &term else {
                    return Err(bad());
                };
                if k.is_empty() || !is_label_text(k) {
                    return Err(bad());
                }
                terms.push(term);
                continue;
            };
            if k.is_empty() || !is_label_text(k) || !is_label_text(v) {
                return Err(bad());
            }
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids() {
        for ok in ["a", "web-1", "0abc", &"x".repeat(63)] {
            check_vm_id("vm_id", ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "a b", &"x".repeat(64), ".."] {
            assert!(check_vm_id("vm_id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selectors() {
        let labels: HashMap<String, String> = [("app", "web"), ("zone", "a")]
            .map(|(k, v)| (k.into(), v.into()))
            .into();
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web, zone=a", true),
            ("app=db", false),
            ("app!=db", true),
            ("zone", true),
            ("!zone", false),
            ("!tier", true),
            ("tier", false),
        ] {
            assert_eq!(Selector::parse(sel).unwrap().matches(&labels), want, "{sel}");
        }
        for bad in ["=x", "a b=c", "!", "k=v v"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_fields_are_named() {
        let exe = std::env::current_exe().unwrap().display().to_string();
        let good = VmSpec {
            vcpus: 1,
            memory_mib: 128,
            kernel: exe.clone(),
            ..Default::default()
        };
        check_spec(Some(&good)).unwrap();
        let with = |f: &dyn Fn(&mut VmSpec)| {
            let mut s = good.clone();
            f(&mut s);
            s
        };
        let cases: Vec<(VmSpec, &str)> = vec![
            (with(&|s| s.vcpus = 0), "spec.vcpus"),
            (with(&|s| s.vcpus = 33), "spec.vcpus"),
            (with(&|s| s.memory_mib = 8), "spec.memory_mib"),
            (with(&|s| s.kernel = String::new()), "spec.kernel"),
            (with(&|s| s.kernel = "rel/k".into()), "spec.kernel"),
            (with(&|s| s.kernel = "/nonexistent/k".into()), "spec.kernel"),
            (with(&|s| s.initrd = "/nonexistent/i".into()), "spec.initrd"),
            (with(&|s| s.cmdline = "a\nb".into()), "spec.cmdline"),
        ];
        for (spec, field) in cases {
            let err = check_spec(Some(&spec)).unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
        }
        assert!(check_spec(None).unwrap_err().to_string().starts_with("spec:"));
    }
}
