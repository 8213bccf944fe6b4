//! The destination's migration thread: checks the handshake, writes the pages it receives into
//! fresh guest memory, hands memory and state to the main loop to build the VM (paused), says
//! ready, and waits for the source's commit.

use std::io::{BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_api::migration::MigrateReceive;
use vmm_api::VmConfig;

use super::conn::Conn;
use super::wire::{self, Frame, Hello, MAGIC, PROTOCOL_VERSION};
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
                receive(&mut input, &params, &link, &filter).err().inspect(|e| {
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

fn receive(
    input: &mut BufReader<Conn>,
    params: &MigrateReceive,
    link: &MainLink,
    filter: &SeccompFilter,
) -> Result<(), MigrationError> {
    let hello = match wire::read_frame(input)? {
        Frame::Hello(h) => h,
        other => return Err(wire::WireError::Protocol(format!("expected hello, got {other:?}")).into()),
    };
    let config = accept(&hello, params)?;
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
            Frame::RoundEnd(_) => {}
            Frame::State(bytes) => {
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
