//! The guest artifacts, as built (or found in the cache) by `guest-images/build.sh`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Paths of the guest artifacts printed by `guest-images/build.sh` as `KEY=/abs/path` lines.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// `VMLINUX`: the uncompressed ELF kernel.
    pub vmlinux: PathBuf,
    /// `BZIMAGE`: the same kernel as a bzImage.
    pub bzimage: PathBuf,
    /// `ROOTFS`: a root filesystem image for block-device tests.
    pub rootfs: PathBuf,
    /// `INITRAMFS`: an initramfs (cpio) for boots without a disk.
    pub initramfs: PathBuf,
    /// Every `KEY=/abs/path` line the script printed, including the four above.
    pub all: BTreeMap<String, PathBuf>,
}

static IMAGES: OnceLock<Result<GuestImages, String>> = OnceLock::new();

impl GuestImages {
    /// Runs `guest-images/build.sh` the first time it is called in this process (later calls return
    /// the same result). The script is idempotent and instant when its cache is warm; on a cold cache
    /// it builds the kernel, which takes a while.
    pub fn get() -> Result<&'static GuestImages> {
        IMAGES
            .get_or_init(|| Self::build().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("guest images unavailable: {e}"))
    }

    /// A path printed by the script under `key` (e.g. `"VMLINUX"`), if any.
    pub fn path(&self, key: &str) -> Option<&Path> {
        self.all.get(key).map(PathBuf::as_path)
    }

    fn build() -> Result<GuestImages> {
        let script = workspace_root().join("guest-images").join("build.sh");
        if !script.exists() {
            bail!("{} does not exist", script.display());
        }
        let output = Command::new("bash")
            .arg(&script)
            .current_dir(workspace_root())
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !output.status.success() {
            bail!(
                "{} failed ({}); last lines of its stderr:\n{}",
                script.display(),
                output.status,
                tail(&String::from_utf8_lossy(&output.stderr), 30)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        Self::from_script_output(&stdout).with_context(|| {
            format!(
                "unexpected output from {}:\n{}",
                script.display(),
                tail(&stdout, 30)
            )
        })
    }

    /// Builds the struct from the script's stdout (lines that are not `KEY=/abs/path` are ignored).
    fn from_script_output(stdout: &str) -> Result<GuestImages> {
        let all = parse_key_paths(stdout);
        let take = |key: &str| -> Result<PathBuf> {
            let path = all
                .get(key)
                .cloned()
                .ok_or_else(|| anyhow!("no {key}=... line"))?;
            Ok(path)
        };
        Ok(GuestImages {
            vmlinux: take("VMLINUX")?,
            bzimage: take("BZIMAGE")?,
            rootfs: take("ROOTFS")?,
            initramfs: take("INITRAMFS")?,
            all,
        })
    }
}

/// Parses `KEY=/abs/path` lines: KEY is upper-case letters, digits and `_`; the path is absolute.
fn parse_key_paths(text: &str) -> BTreeMap<String, PathBuf> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            let key_ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            (key_ok && value.starts_with('/')).then(|| (key.to_string(), PathBuf::from(value)))
        })
        .collect()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_script_output() {
        let out = "building...\nVMLINUX=/c/vmlinux\nBZIMAGE=/c/bzImage\nROOTFS=/c/rootfs.ext4\n\
                   INITRAMFS=/c/initramfs.cpio\nEXTRA_DISK=/c/x.img\nnot a path=foo\nREL=relative\n";
        let images = GuestImages::from_script_output(out).unwrap();
        assert_eq!(images.vmlinux, PathBuf::from("/c/vmlinux"));
        assert_eq!(images.bzimage, PathBuf::from("/c/bzImage"));
        assert_eq!(images.rootfs, PathBuf::from("/c/rootfs.ext4"));
        assert_eq!(images.initramfs, PathBuf::from("/c/initramfs.cpio"));
        assert_eq!(images.path("EXTRA_DISK"), Some(Path::new("/c/x.img")));
        assert_eq!(images.all.len(), 5);
    }

    #[test]
    fn missing_key_is_an_error() {
        let err = GuestImages::from_script_output("VMLINUX=/c/vmlinux\n").unwrap_err();
        assert!(err.to_string().contains("BZIMAGE"), "{err}");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
