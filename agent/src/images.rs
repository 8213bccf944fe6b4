//! Base images on disk, and what they mean for a VM's spec.
//!
//! An image lives in `<state dir>/images/<image_id>/` as `kernel`, `rootfs` and maybe `initrd`,
//! read-only (0444). It is assembled in a staging directory (`images/.staging-*`) and renamed into
//! place only when complete, and recorded in the store after that: a crash leaves at worst a
//! staging directory or an unrecorded image directory, which [`remove_leftovers`] clears at the
//! next start. Copies are sparse (holes and all-zero blocks of the source stay holes), and every
//! file's SHA-256 is computed as it is written.
//!
//! A VM on an image boots the image's kernel and initrd and gets a root disk that is a
//! copy-on-write overlay of its rootfs: an empty sparse file in the VM's directory, as large as
//! the rootfs, which the vmm fills with what the guest writes while reading everything else from
//! the image ([`vmm_api::drive::DriveConfig::backing`]).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::digest::{Context as Digest, SHA256};

use crate::error::AgentError;
use crate::proto::{Disk, Image, ImageFile, ImagePart, VmSpec};
use crate::spec::check_vm_id;

/// The largest image accepted unless the agent is told otherwise (`--image-max-bytes`).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 64 << 30;
/// A rootfs is a disk: its size must be a multiple of this.
pub const SECTOR: u64 = 512;
/// Prefix of the directories images are assembled in.
const STAGING_PREFIX: &str = ".staging-";
/// How much is copied or hashed at a time.
const BUF_LEN: usize = 1 << 20;

/// Checks an image id: the rules of VM ids (it names a directory).
pub fn check_image_id(field: &str, id: &str) -> Result<(), AgentError> {
    check_vm_id(field, id)
}

/// The parts of an image, in the order they are listed.
pub const PARTS: [ImagePart; 3] = [ImagePart::Kernel, ImagePart::Rootfs, ImagePart::Initrd];

/// The file name of a part in an image's directory (also the request field that names it).
pub fn part_name(part: ImagePart) -> &'static str {
    match part {
        ImagePart::Kernel => "kernel",
        ImagePart::Rootfs => "rootfs",
        ImagePart::Initrd => "initrd",
        ImagePart::Unspecified => "unspecified",
    }
}

/// An image's part, if it has it.
pub fn image_file(image: &Image, part: ImagePart) -> Option<&ImageFile> {
    match part {
        ImagePart::Kernel => image.kernel.as_ref(),
        ImagePart::Rootfs => image.rootfs.as_ref(),
        ImagePart::Initrd => image.initrd.as_ref(),
        ImagePart::Unspecified => None,
    }
}

/// Checks the size of a part before any of it is copied: a kernel and a rootfs are not empty, a
/// rootfs is whole sectors, and the image stays within `max` bytes (`so_far`: its other parts).
pub fn check_part_size(
    field: &str,
    part: ImagePart,
    size: u64,
    so_far: u64,
    max: u64,
) -> Result<(), AgentError> {
    if size == 0 && part != ImagePart::Initrd {
        return Err(AgentError::invalid(field, "is empty"));
    }
    if part == ImagePart::Rootfs && !size.is_multiple_of(SECTOR) {
        return Err(AgentError::invalid(
            field,
            format!("a rootfs is a disk image: its size must be a multiple of {SECTOR}, got {size}"),
        ));
    }
    if so_far.saturating_add(size) > max {
        return Err(AgentError::invalid(
            field,
            format!(
                "the image would take {} bytes, more than this agent accepts ({max}, --image-max-bytes)",
                so_far.saturating_add(size)
            ),
        ));
    }
    Ok(())
}

/// Opens a source file named in a request: an absolute path to a regular file.
pub fn open_source(field: &str, path: &str) -> Result<(File, u64), AgentError> {
    if path.is_empty() {
        return Err(AgentError::invalid(field, "must not be empty"));
    }
    if !Path::new(path).is_absolute() {
        return Err(AgentError::invalid(field, "must be an absolute path"));
    }
    let file =
        File::open(path).map_err(|e| AgentError::invalid(field, format!("cannot open {path}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| AgentError::invalid(field, format!("cannot read {path}: {e}")))?;
    if !meta.is_file() {
        return Err(AgentError::invalid(
            field,
            format!("{path} is not a regular file"),
        ));
    }
    Ok((file, meta.len()))
}

/// Lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a client-given SHA-256: empty or 64 hex digits.
pub fn check_sha256(field: &str, digest: &str) -> Result<(), AgentError> {
    if digest.is_empty() || (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(())
    } else {
        Err(AgentError::invalid(
            field,
            "must be empty or 64 hex digits (SHA-256)",
        ))
    }
}

/// Feeds `len` zero bytes to `digest` (the holes of a sparse file).
fn digest_zeros(digest: &mut Digest, mut len: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        digest.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// Where the next data at or after `pos` starts (`len` if none). File systems without hole
/// support report everything as data.
fn next_data(src: &File, pos: u64, len: u64) -> io::Result<u64> {
    match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(pos)) {
        // Never before `pos`, never past `len`, whatever the file does meanwhile.
        Ok(at) => Ok(at.clamp(pos, len)),
        Err(rustix::io::Errno::NXIO) => Ok(len),
        Err(e) => Err(e.into()),
    }
}

/// Where the hole after `pos` starts (`len` at the latest).
fn next_hole(src: &File, pos: u64, len: u64) -> io::Result<u64> {
    match rustix::fs::seek(src, rustix::fs::SeekFrom::Hole(pos)) {
        Ok(at) => Ok(at.min(len)),
        Err(rustix::io::Errno::NXIO) => Ok(len),
        Err(e) => Err(e.into()),
    }
}

/// The granularity at which zero blocks are left as holes.
const ZERO_BLOCK: usize = 4096;

/// Writes `data` at `offset` of `dst`, leaving out the blocks that are all zeros (`dst` reads
/// zeros there already: it was sized with a hole).
fn write_nonzero(dst: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut start = None;
    let mut at = 0;
    while at < data.len() {
        let end = (at + ZERO_BLOCK).min(data.len());
        let zero = data[at..end].iter().all(|b| *b == 0);
        match (zero, start) {
            (false, None) => start = Some(at),
            (true, Some(s)) => {
                dst.write_all_at(&data[s..at], offset + s as u64)?;
                start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(s) = start {
        dst.write_all_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// Copies the first `len` bytes of `src` into `dst` (made exactly `len` long), leaving holes where
/// `src` has holes or all-zero blocks, and returns the SHA-256 of those bytes (hex).
pub fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<String> {
    dst.set_len(len)?;
    let mut digest = Digest::new(&SHA256);
    let mut buf = vec![0u8; BUF_LEN];
    let mut pos = 0;
    while pos < len {
        let data = next_data(src, pos, len)?;
        digest_zeros(&mut digest, data - pos);
        if data >= len {
            break;
        }
        let end = next_hole(src, data, len)?.max(data + 1).min(len);
        let mut at = data;
        while at < end {
            let want = (end - at).min(BUF_LEN as u64) as usize;
            let n = src.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was copied",
                ));
            }
            digest.update(&buf[..n]);
            write_nonzero(dst, &buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    Ok(hex(digest.finish().as_ref()))
}

/// One part being written from a stream of chunks: sparse, hashed, bounded by its size.
pub struct PartWriter {
    file: File,
    size: u64,
    written: u64,
    digest: Digest,
}

impl PartWriter {
    /// Creates `path`, `size` bytes long (a hole until written).
    pub fn create(path: &Path, size: u64) -> io::Result<PartWriter> {
        let file = File::create(path)?;
        file.set_len(size)?;
        Ok(PartWriter {
            file,
            size,
            written: 0,
            digest: Digest::new(&SHA256),
        })
    }

    /// How many bytes may still come.
    pub fn remaining(&self) -> u64 {
        self.size - self.written
    }

    /// Appends `data`, which the caller checked fits in [`PartWriter::remaining`].
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.digest.update(data);
        write_nonzero(&self.file, data, self.written)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Whether every announced byte arrived.
    pub fn complete(&self) -> bool {
        self.written == self.size
    }

    /// The SHA-256 of what was written (hex).
    pub fn finish(self) -> String {
        hex(self.digest.finish().as_ref())
    }
}

/// A directory an image is assembled in, removed on drop unless it was moved into place.
pub struct Staging {
    dir: PathBuf,
    images_dir: PathBuf,
    image_id: String,
    placed: bool,
}

impl Staging {
    /// A new, empty staging directory for `image_id` under `images_dir`.
    pub fn create(images_dir: &Path, image_id: &str) -> io::Result<Staging> {
        std::fs::create_dir_all(images_dir)?;
        let mut n = 0u32;
        loop {
            let dir = images_dir.join(format!("{STAGING_PREFIX}{image_id}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    return Ok(Staging {
                        dir,
                        images_dir: images_dir.to_path_buf(),
                        image_id: image_id.to_string(),
                        placed: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Where `part` goes while staged.
    pub fn path(&self, part: ImagePart) -> PathBuf {
        self.dir.join(part_name(part))
    }

    /// Makes the staged files read-only and durable, and moves the directory into place,
    /// replacing an unrecorded leftover of the same id. Returns the image directory.
    pub fn place(mut self) -> io::Result<PathBuf> {
        for part in PARTS {
            let path = self.path(part);
            if let Ok(file) = File::open(&path) {
                file.set_permissions(std::fs::Permissions::from_mode(0o444))?;
                file.sync_all()?;
            }
        }
        File::open(&self.dir)?.sync_all()?;
        let target = self.images_dir.join(&self.image_id);
        match std::fs::remove_dir_all(&target) {
            Ok(()) => tracing::warn!(image = %self.image_id, "replaced an unrecorded image directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::rename(&self.dir, &target)?;
        File::open(&self.images_dir)?.sync_all()?;
        self.placed = true;
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.placed {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a staging directory");
            }
        }
    }
}

/// Removes what a previous agent left under `images_dir`: staging directories, and image
/// directories with no record in `known` (a crash between placing and recording, or between
/// forgetting and removing).
pub fn remove_leftovers(images_dir: &Path, known: &[String]) {
    let Ok(entries) = std::fs::read_dir(images_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if known.contains(&name) {
            continue;
        }
        let path = entry.path();
        tracing::warn!(path = %path.display(), "removing an unfinished or unrecorded image");
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = removed {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}

/// Removes an image's directory (after its record is gone).
pub fn remove_image_dir(images_dir: &Path, image_id: &str) {
    let dir = images_dir.join(image_id);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(image = image_id, error = %e, "cannot remove an image's files");
        }
    }
}

/// The record of an image placed in `dir` with these parts (size and digest each).
pub fn image_record(
    image_id: &str,
    dir: &Path,
    parts: &[(ImagePart, u64, String)],
    labels: HashMap<String, String>,
    create_time_ms: i64,
) -> Image {
    let mut image = Image {
        image_id: image_id.to_string(),
        create_time_ms,
        labels,
        ..Default::default()
    };
    for (part, size, sha256) in parts {
        let file = Some(ImageFile {
            size_bytes: *size,
            sha256: sha256.clone(),
            path: dir.join(part_name(*part)).display().to_string(),
        });
        match part {
            ImagePart::Kernel => image.kernel = file,
            ImagePart::Rootfs => image.rootfs = file,
            ImagePart::Initrd => image.initrd = file,
            ImagePart::Unspecified => {}
        }
    }
    image
}

/// The images a spec refers to (the VM's and its disks'), each once.
pub fn spec_image_ids(spec: &VmSpec) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let all = std::iter::once(spec.image_id.as_str()).chain(spec.disks.iter().map(|d| d.image_id.as_str()));
    for id in all.filter(|id| !id.is_empty()) {
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }
    ids
}

/// Checks the image fields of a spec as a client sends it to CreateVm: valid ids; with
/// `image_id`, no kernel, initrd or root disk of its own; a disk on an image names no path (the
/// agent makes its overlay).
pub fn check_spec_images(spec: &VmSpec) -> Result<(), AgentError> {
    if !spec.image_id.is_empty() {
        check_image_id("spec.image_id", &spec.image_id)?;
        if !spec.kernel.is_empty() {
            return Err(AgentError::invalid(
                "spec.kernel",
                "must be empty with spec.image_id (the image's kernel boots)",
            ));
        }
        if !spec.initrd.is_empty() {
            return Err(AgentError::invalid(
                "spec.initrd",
                "must be empty with spec.image_id (the image's initrd, if any, is used)",
            ));
        }
        if let Some(i) = spec.disks.iter().position(|d| d.root) {
            return Err(AgentError::invalid(
                format!("spec.disks[{i}].root"),
                "must be false with spec.image_id (the image's rootfs is the root disk)",
            ));
        }
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        if disk.image_id.is_empty() {
            continue;
        }
        check_image_id(&format!("spec.disks[{i}].image_id"), &disk.image_id)?;
        if !disk.path.is_empty() {
            return Err(AgentError::invalid(
                format!("spec.disks[{i}].path"),
                "must be empty with image_id (the agent makes the disk's overlay)",
            ));
        }
    }
    Ok(())
}

/// An overlay to create for a new VM: an empty sparse file of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Where, in the VM's directory.
    pub path: PathBuf,
    /// The size of the image's rootfs.
    pub size: u64,
}

/// Where a VM's overlay of disk `index` lives.
pub fn overlay_path(vm_dir: &Path, index: usize) -> PathBuf {
    vm_dir.join(format!("disk{index}.overlay"))
}

/// Writes what a spec checked by [`check_spec_images`] means into it: the image's kernel and
/// initrd, its root overlay as `disks[0]`, each disk on an image given its overlay's path.
/// Returns the overlays to create. `images` holds every image the spec names.
pub fn resolve_spec(
    spec: &mut VmSpec,
    images: &HashMap<String, Image>,
    vm_dir: &Path,
) -> Result<Vec<Overlay>, AgentError> {
    let find = |id: &str| {
        images
            .get(id)
            .ok_or_else(|| AgentError::ImageNotFound(id.to_string()))
    };
    if !spec.image_id.is_empty() {
        let image = find(&spec.image_id)?;
        spec.kernel = image.kernel.as_ref().map(|f| f.path.clone()).unwrap_or_default();
        spec.initrd = image.initrd.as_ref().map(|f| f.path.clone()).unwrap_or_default();
        spec.disks.insert(
            0,
            Disk {
                root: true,
                image_id: spec.image_id.clone(),
                ..Default::default()
            },
        );
    }
    let mut overlays = Vec::new();
    for (i, disk) in spec.disks.iter_mut().enumerate() {
        if disk.image_id.is_empty() {
            continue;
        }
        let image = find(&disk.image_id)?;
        let path = overlay_path(vm_dir, i);
        disk.path = path.display().to_string();
        overlays.push(Overlay {
            path,
            size: image.rootfs.as_ref().map_or(0, |f| f.size_bytes),
        });
    }
    Ok(overlays)
}

/// The base under a disk on an image: the image's rootfs.
pub fn backing_path(images_dir: &Path, image_id: &str) -> PathBuf {
    images_dir.join(image_id).join(part_name(ImagePart::Rootfs))
}

/// Creates (or empties) the overlays of a new VM, sparse, and makes them durable.
pub fn create_overlays(overlays: &[Overlay]) -> io::Result<()> {
    for overlay in overlays {
        if let Some(dir) = overlay.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = File::create(&overlay.path)?;
        file.set_len(overlay.size)?;
        file.sync_all()?;
        if let Some(dir) = overlay.path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "images_tests.rs"]
mod tests;
