//! The destination's migration thread: checks the handshake, writes the pages it receives into
//! fresh guest memory, hands memory and state to the main loop to build the VM (paused), says
//! ready, and waits for the source's commit.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_api::migration::MigrateReceive;
use vmm_api::VmConfig;

use super::conn::Conn;
use super::wire::{self, DiskCopy, Frame, Hello, MAGIC, PROTOCOL_VERSION};
use super::{FromMain, MainLink, MigrationError, ToMain};
use crate::arch::layout;
use crate::persist::{format, host_cpu_model, SnapshotState};
use crate::seccomp::{SeccompFilter, SeccompMode, ThreadCategory};

/// How long the source may stay silent: between frames of a round, and while the destination
/// waits for its commit.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What arrived: enough to build the VM.
pub struct Received {
    /// The source's configuration with this host's overrides.
    pub config: VmConfig,
    /// vCPU, VM and device state.
    pub state: SnapshotState,
    /// Guest memory as the source left it.
    pub mem: GuestMemoryMmap,
    /// Bytes of pages received.
    pub memory_bytes: u64,
}

/// Starts the thread that receives a migration on `conn`. It confines itself once it has read
/// the handshake and set up guest memory (which reads `/proc` and names the mapping), before the
/// bulk of what the peer sends.
pub fn spawn_receiver(
    conn: OwnedFd,
    params: MigrateReceive,
    drive_fds: Vec<(String, File)>,
    link: MainLink,
    seccomp: SeccompMode,
) -> Result<(), MigrationError> {
    let filter = SeccompFilter::build(ThreadCategory::Migration, seccomp)
        .map_err(|e| MigrationError::Thread(e.to_string()))?;
    let body = move || {
        let sock = UnixStream::from(conn);
        let failed = match Conn::destination(sock, params.tls.as_ref(), READ_TIMEOUT, WRITE_TIMEOUT) {
            Ok(conn) => {
                let mut input = BufReader::with_capacity(1 << 20, conn);
                receive(&mut input, &params, drive_fds, &link, &filter)
                    .err()
                    .inspect(|e| {
                        // Best effort: the source learns why instead of waiting for its timeout.
                        let _ = send(input.get_mut(), &Frame::Abort(e.to_string()));
                    })
            }
            Err(e) => Some(e.into()),
        };
        if let Some(e) = failed {
            if let Err(e) = link.tell(ToMain::ReceiveFailed(e.to_string())) {
                log::error!("incoming migration: {e}");
            }
        }
    };
    std::thread::Builder::new()
        .name("vmm-migrate-in".into())
        .spawn(body)
        .map(|_| ())
        .map_err(|e| MigrationError::Thread(e.to_string()))
}

/// Whether two tokens are equal, in time that does not depend on where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The VM the handshake describes, refused if this host cannot run it or the token is wrong.
fn accept(hello: &Hello, params: &MigrateReceive) -> Result<VmConfig, MigrationError> {
    let overrides = &params.overrides;
    let incompatible = |why: String| MigrationError::Incompatible(why);
    if hello.magic != MAGIC || hello.version != PROTOCOL_VERSION {
        return Err(incompatible(format!(
            "migration protocol version {} (this VMM speaks {PROTOCOL_VERSION})",
            hello.version
        )));
    }
    if !params.token.is_empty() && !same_token(&hello.token, &params.token) {
        return Err(MigrationError::Refused(if hello.token.is_empty() {
            "the source sent no migration token".into()
        } else {
            "wrong migration token".into()
        }));
    }
    let here = host_cpu_model();
    if hello.cpu_model != here {
        return Err(incompatible(format!(
            "the VM runs on a {:?} CPU, this host has {here:?}",
            hello.cpu_model
        )));
    }
    let mut config: VmConfig = serde_json::from_str(&hello.config_json)
        .map_err(|e| incompatible(format!("the VM's configuration: {e}")))?;
    crate::persist::restore::apply_overrides(&mut config, overrides)
        .map_err(|e| incompatible(e.to_string()))?;
    for o in &overrides.drives {
        if let Some(drive) = config.drives.iter_mut().find(|d| d.id == o.id) {
            drive.path = o.path.clone().unwrap_or_default();
            drive.fd = o.fd.clone();
        }
    }
    config
        .validate()
        .map_err(|e| incompatible(format!("the VM's configuration: {e}")))?;
    let expected: Vec<(u64, u64)> = layout::ram_ranges(config.machine.memory_mib << 20)
        .iter()
        .map(|r| (r.start, r.len))
        .collect();
    if hello.memory_ranges != expected {
        return Err(incompatible(format!(
            "the memory layout does not match {} MiB",
            config.machine.memory_mib
        )));
    }
    Ok(config)
}

/// A file receiving a copied drive's image.
struct DiskTarget {
    /// The drive's id.
    id: String,
    file: File,
    bytes: u64,
    /// Written since it was last made durable.
    unsynced: bool,
}

impl DiskTarget {
    fn sync(&mut self) -> Result<(), MigrationError> {
        if self.unsynced {
            self.file.sync_data().map_err(|e| {
                MigrationError::Vm(format!("drive {}: cannot write its copy to disk: {e}", self.id))
            })?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// Opens the files the copied drives go to: each drive's `path` or descriptor (`fd`, from
/// `drive_fds`) as the overrides set it, empty (it is given the image's size) or already of that
/// size, and not in use (locked) by a VM. Anything else is refused: this side does not overwrite an
/// image it was pointed at by mistake. The lock is held until the copy is complete.
fn open_targets(
    disks: &[DiskCopy],
    config: &VmConfig,
    mut drive_fds: Vec<(String, File)>,
) -> Result<Vec<DiskTarget>, MigrationError> {
    let incompatible = |why: String| MigrationError::Incompatible(why);
    disks
        .iter()
        .map(|copy| {
            let drive = config.drives.iter().find(|d| d.id == copy.id).ok_or_else(|| {
                incompatible(format!(
                    "the copied drive {:?} is not in the configuration",
                    copy.id
                ))
            })?;
            let (mut file, name) = match &drive.fd {
                Some(fd) => {
                    let at = drive_fds.iter().position(|(n, _)| n == fd).ok_or_else(|| {
                        incompatible(format!(
                            "drive {}: no descriptor named {fd:?} (send it with add-fds)",
                            copy.id
                        ))
                    })?;
                    (drive_fds.swap_remove(at).1, format!("descriptor {fd}"))
                }
                None => {
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&drive.path)
                        .map_err(|e| {
                            incompatible(format!("drive {}: {}: {e}", copy.id, drive.path.display()))
                        })?;
                    (file, drive.path.display().to_string())
                }
            };
            // The image a VM uses (the source's own, when both run on one host and the drive has
            // no override) is locked: a copy must never be written over a live disk.
            devices::virtio::block::disk::lock_exclusive(&file).map_err(|e| {
                incompatible(format!(
                    "drive {}: {name} cannot receive the copy: {}",
                    copy.id,
                    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                        "another process (a VM) holds a lock on it".to_string()
                    } else {
                        e.to_string()
                    }
                ))
            })?;
            let size = file
                .seek(SeekFrom::End(0))
                .map_err(|e| incompatible(format!("drive {}: {e}", copy.id)))?;
            if size == 0 {
                file.set_len(copy.bytes)
                    .map_err(|e| incompatible(format!("drive {}: cannot size its copy: {e}", copy.id)))?;
            } else if size != copy.bytes {
                return Err(incompatible(format!(
                    "drive {}: {name} is {size} bytes, the source's image {} bytes",
                    copy.id, copy.bytes
                )));
            }
            Ok(DiskTarget {
                id: copy.id.clone(),
                file,
                bytes: copy.bytes,
                unsynced: size == 0,
            })
        })
        .collect()
}

/// Makes every copy durable: the guest may have flushed what the last rounds carried.
fn sync_all(targets: &mut [DiskTarget]) -> Result<(), MigrationError> {
    targets.iter_mut().try_for_each(DiskTarget::sync)
}

fn receive(
    input: &mut BufReader<Conn>,
    params: &MigrateReceive,
    drive_fds: Vec<(String, File)>,
    link: &MainLink,
    filter: &SeccompFilter,
) -> Result<(), MigrationError> {
    let hello = match wire::read_frame(input)? {
        Frame::Hello(h) => h,
        other => return Err(wire::WireError::Protocol(format!("expected hello, got {other:?}")).into()),
    };
    let config = accept(&hello, params)?;
    let mut targets = open_targets(&hello.disks, &config, drive_fds)?;
    let mem = crate::vstate::memory::create_guest_memory(config.machine.memory_mib, config.machine.hugepages)
        .map_err(|e| MigrationError::Incompatible(format!("guest memory: {e}")))?;
    filter
        .apply()
        .map_err(|e| MigrationError::Thread(e.to_string()))?;
    link.tell(ToMain::PrepareKvm(mem.clone(), config.machine.track_dirty_pages))?;
    send(input.get_mut(), &Frame::HelloAck)?;

    let mut memory_bytes = 0u64;
    let state = loop {
        match wire::read_frame(input)? {
            Frame::Pages { gpa, data } => {
                // Bounds are checked by the write: a range outside guest RAM (or across a hole)
                // is refused, and nothing outside it is touched.
                mem.write_slice(&data, GuestAddress(gpa)).map_err(|e| {
                    wire::WireError::Protocol(format!("pages at {gpa:#x} (+{} bytes): {e}", data.len()))
                })?;
                memory_bytes += data.len() as u64;
            }
            Frame::Disk { disk, offset, data } => {
                let target = targets
                    .get_mut(disk as usize)
                    .ok_or_else(|| wire::WireError::Protocol(format!("disk frame for drive {disk}")))?;
                if offset
                    .checked_add(data.len() as u64)
                    .is_none_or(|end| end > target.bytes)
                {
                    return Err(wire::WireError::Protocol(format!(
                        "disk {disk}: {} bytes at {offset:#x} lie past its end",
                        data.len()
                    ))
                    .into());
                }
                target
                    .file
                    .write_all_at(&data, offset)
                    .map_err(|e| MigrationError::Vm(format!("writing the copy of drive {disk}: {e}")))?;
                target.unsynced = true;
            }
            // Durable round by round, so that the switch-over has little left to wait for.
            Frame::RoundEnd(_) => sync_all(&mut targets)?,
            Frame::State(bytes) => {
                sync_all(&mut targets)?;
                let state: SnapshotState = format::decode(&bytes, "migration state")
                    .map_err(|e| wire::WireError::Protocol(e.to_string()))?;
                if state.memory_ranges != hello.memory_ranges {
                    return Err(wire::WireError::Protocol("the state's memory layout differs".into()).into());
                }
                break state;
            }
            other => return Err(wire::WireError::Protocol(format!("unexpected {other:?}")).into()),
        }
    };
    // The VM opens (and locks) its images itself.
    drop(targets);
    let received = Received {
        config,
        state,
        mem,
        memory_bytes,
    };
    match link.ask(ToMain::Build(Box::new(received)))? {
        FromMain::Built(Ok(())) => {}
        FromMain::Built(Err(e)) => return Err(MigrationError::Vm(e)),
        other => return Err(MigrationError::Vm(format!("unexpected answer {other:?}"))),
    }
    send(input.get_mut(), &Frame::Ready)?;
    match wire::read_frame(input)? {
        Frame::Commit { resume } => link.tell(ToMain::Commit { resume }),
        other => Err(wire::WireError::Protocol(format!("expected commit, got {other:?}")).into()),
    }
}

fn send(out: &mut Conn, frame: &Frame) -> Result<(), wire::WireError> {
    wire::write_frame(out, frame)?;
    out.flush().map_err(wire::WireError::Io)
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn tokens_match_only_exactly() {
        assert!(same_token("abc123", "abc123"));
        assert!(!same_token("abc123", "abc124"));
        assert!(!same_token("abc123", "abc12"));
        assert!(!same_token("", "abc"));
    }
}
