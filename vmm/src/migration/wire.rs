//! The migration stream between two VMMs: typed frames, each a one-byte kind, a little-endian
//! `u32` length and that many bytes. Every read is bounded: a peer cannot make this side
//! allocate more than [`MAX_FRAME_BYTES`] or wait for more than it announced.
//!
//! ```text
//! source                                   destination
//! Hello {version, config, memory, cpu} ->
//!                                      <-  HelloAck (or Abort: incompatible)
//! Pages {gpa, data}*, Disk*, RoundEnd  ->  (written into guest memory and the disk copies)
//!   ... one round per pass over the dirty pages and written disk chunks ...
//! (paused) Pages*, Disk*, State        ->
//!                                      <-  Ready (VM built, paused) or Abort
//! Commit {resume}                      ->  (runs it; the source exits)
//! ```

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// What a stream starts with.
pub const MAGIC: [u8; 8] = *b"VMMMIGR\0";
pub use vmm_api::migration::PROTOCOL_VERSION;
/// Largest frame: a run of 1024 pages and its address, or a state body.
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// Most pages one `Pages` frame carries.
pub const MAX_PAGES_PER_FRAME: usize = 1024;
/// Guest page size on the wire.
pub const PAGE_SIZE: usize = 4096;
/// Most disk bytes one `Disk` frame carries.
pub const MAX_DISK_BYTES_PER_FRAME: usize = 1 << 20;
/// Disk data on the wire is a whole number of these.
pub const DISK_SECTOR: usize = 512;

/// Why the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading or writing the connection failed (or timed out).
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the migration connection")]
    Closed,
    /// The peer sent something that is not this protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer gave up, saying why.
    #[error("the peer aborted: {0}")]
    Aborted(String),
    /// The peer speaks another version of this protocol.
    #[error("the peer speaks migration protocol version {0}, this VMM speaks {PROTOCOL_VERSION}")]
    Version(u32),
}

/// The source's first frame: what the destination must be able to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The VM's configuration, as JSON.
    pub config_json: String,
    /// Guest memory regions (start, length).
    pub memory_ranges: Vec<(u64, u64)>,
    /// The source host's CPU model (vCPU state only fits the same).
    pub cpu_model: String,
    /// The source VMM's version.
    pub vmm_version: String,
    /// The one-time token the destination's agent issued for this migration (empty: none).
    pub token: String,
    /// The drives whose contents follow in `Disk` frames (empty with shared storage), in the
    /// order `Disk` frames number them.
    pub disks: Vec<DiskCopy>,
}

/// A drive the source copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    /// The drive's id in the configuration.
    pub id: String,
    /// The image's size.
    pub bytes: u64,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// The destination can take the VM.
    HelloAck,
    /// Consecutive guest pages starting at guest physical address `gpa`.
    Pages {
        /// Page-aligned start.
        gpa: u64,
        /// A whole number of pages, at most [`MAX_PAGES_PER_FRAME`].
        data: Vec<u8>,
    },
    /// Consecutive bytes of a copied drive's image.
    Disk {
        /// Index into [`Hello::disks`].
        disk: u32,
        /// Sector-aligned start in the image.
        offset: u64,
        /// A whole number of sectors, at most [`MAX_DISK_BYTES_PER_FRAME`].
        data: Vec<u8>,
    },
    /// A memory round is complete.
    RoundEnd(u32),
    /// The vCPU, VM and device state (a framed, checksummed state body).
    State(Vec<u8>),
    /// The destination built the VM and waits, paused, for the commit.
    Ready,
    /// The source hands the VM over for good.
    Commit {
        /// Run it (it ran at the source); else leave it paused.
        resume: bool,
    },
    /// Either side gives up.
    Abort(String),
}

const HELLO: u8 = 1;
const HELLO_ACK: u8 = 2;
const PAGES: u8 = 3;
const ROUND_END: u8 = 4;
const STATE: u8 = 5;
const READY: u8 = 6;
const COMMIT: u8 = 7;
const ABORT: u8 = 8;
const DISK: u8 = 9;

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_FRAME_BYTES as u64)
        .reject_trailing_bytes()
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), WireError> {
    use bincode::Options;
    let hello;
    let index;
    // The body is written as two parts (a disk frame's index, then its data) to spare a copy.
    let (kind, head, prefix, body): (u8, [u8; 8], &[u8], &[u8]) = match frame {
        Frame::Hello(h) => {
            hello = codec()
                .serialize(h)
                .map_err(|e| WireError::Protocol(format!("hello: {e}")))?;
            (HELLO, [0; 8], &[], &hello)
        }
        Frame::HelloAck => (HELLO_ACK, [0; 8], &[], &[]),
        Frame::Pages { gpa, data } => (PAGES, gpa.to_le_bytes(), &[], data),
        Frame::Disk { disk, offset, data } => {
            index = disk.to_le_bytes();
            (DISK, offset.to_le_bytes(), &index, data)
        }
        Frame::RoundEnd(n) => (ROUND_END, u64::from(*n).to_le_bytes(), &[], &[]),
        Frame::State(bytes) => (STATE, [0; 8], &[], bytes),
        Frame::Ready => (READY, [0; 8], &[], &[]),
        Frame::Commit { resume } => (COMMIT, u64::from(*resume).to_le_bytes(), &[], &[]),
        Frame::Abort(why) => (ABORT, [0; 8], &[], why.as_bytes()),
    };
    let len = head.len() + prefix.len() + body.len();
    if len > MAX_FRAME_BYTES {
        return Err(WireError::Protocol(format!("a frame of {len} bytes")));
    }
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&(len as u32).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(&head)?;
    w.write_all(prefix)?;
    w.write_all(body)?;
    Ok(())
}

fn read_exact_or_closed(r: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Closed),
        Err(e) => Err(WireError::Io(e)),
    }
}

/// Reads one frame. `Abort` from the peer is returned as [`WireError::Aborted`].
pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    use bincode::Options;
    let mut header = [0u8; 5];
    read_exact_or_closed(r, &mut header)?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::Protocol(format!("a frame of {len} bytes announced")));
    }
    if len < 8 {
        return Err(WireError::Protocol(format!(
            "a frame of {len} bytes is too short"
        )));
    }
    let mut head = [0u8; 8];
    read_exact_or_closed(r, &mut head)?;
    let mut body = vec![0u8; len - 8];
    read_exact_or_closed(r, &mut body)?;
    let value = u64::from_le_bytes(head);
    let empty = |frame: Frame| {
        if body.is_empty() {
            Ok(frame)
        } else {
            Err(WireError::Protocol(format!(
                "frame kind {} with a body",
                header[0]
            )))
        }
    };
    match header[0] {
        // The magic and version lead every version's hello: another version is named as such,
        // not reported as a body that does not decode.
        HELLO if body.len() >= 12 && body[..8] == MAGIC && body[8..12] != PROTOCOL_VERSION.to_le_bytes() => {
            Err(WireError::Version(u32::from_le_bytes([
                body[8], body[9], body[10], body[11],
            ])))
        }
        HELLO => codec()
            .deserialize(&body)
            .map(Frame::Hello)
            .map_err(|e| WireError::Protocol(format!("hello: {e}"))),
        HELLO_ACK => empty(Frame::HelloAck),
        PAGES => {
            let pages = body.len() / PAGE_SIZE;
            if body.is_empty() || !body.len().is_multiple_of(PAGE_SIZE) || pages > MAX_PAGES_PER_FRAME {
                return Err(WireError::Protocol(format!(
                    "a page frame of {} bytes",
                    body.len()
                )));
            }
            if !value.is_multiple_of(PAGE_SIZE as u64) {
                return Err(WireError::Protocol(format!("unaligned page address {value:#x}")));
            }
            Ok(Frame::Pages {
                gpa: value,
                data: body,
            })
        }
        DISK => {
            let data_len = body.len().saturating_sub(4);
            if body.len() < 4
                || data_len == 0
                || !data_len.is_multiple_of(DISK_SECTOR)
                || data_len > MAX_DISK_BYTES_PER_FRAME
            {
                return Err(WireError::Protocol(format!(
                    "a disk frame of {} bytes",
                    body.len()
                )));
            }
            if !value.is_multiple_of(DISK_SECTOR as u64) {
                return Err(WireError::Protocol(format!("unaligned disk offset {value:#x}")));
            }
            let disk = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            let mut data = body;
            data.drain(..4);
            Ok(Frame::Disk {
                disk,
                offset: value,
                data,
            })
        }
        ROUND_END => {
            let n = u32::try_from(value).map_err(|_| WireError::Protocol("round number".into()))?;
            empty(Frame::RoundEnd(n))
        }
        STATE => Ok(Frame::State(body)),
        READY => empty(Frame::Ready),
        COMMIT => match value {
            0 | 1 => empty(Frame::Commit { resume: value == 1 }),
            v => Err(WireError::Protocol(format!("commit flag {v}"))),
        },
        ABORT => Err(WireError::Aborted(String::from_utf8_lossy(&body).into_owned())),
        kind => Err(WireError::Protocol(format!("unknown frame kind {kind}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) -> Result<Frame, WireError> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &frame)?;
        read_frame(&mut bytes.as_slice())
    }

    #[test]
    fn frames_round_trip() {
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            config_json: "{}".into(),
            memory_ranges: vec![(0, 128 << 20)],
            cpu_model: "GenuineIntel X".into(),
            vmm_version: "0.1.0".into(),
            token: "t0ken".into(),
            disks: vec![DiskCopy {
                id: "data".into(),
                bytes: 64 << 20,
            }],
        };
        for frame in [
            Frame::Hello(hello),
            Frame::HelloAck,
            Frame::Pages {
                gpa: 0x2000,
                data: vec![7; 2 * PAGE_SIZE],
            },
            Frame::Disk {
                disk: 1,
                offset: 4096,
                data: vec![9; 3 * DISK_SECTOR],
            },
            Frame::RoundEnd(3),
            Frame::State(vec![1, 2, 3]),
            Frame::Ready,
            Frame::Commit { resume: true },
            Frame::Commit { resume: false },
        ] {
            assert_eq!(round_trip(frame.clone()).unwrap(), frame);
        }
        assert!(matches!(
            round_trip(Frame::Abort("no".into())),
            Err(WireError::Aborted(m)) if m == "no"
        ));
    }

    #[test]
    fn a_hello_of_another_protocol_version_is_named_as_such() {
        // What a version-1 source sent: magic, version, and a body this version cannot decode.
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&[0; 40]);
        let mut bytes = vec![HELLO];
        bytes.extend_from_slice(&((8 + body.len()) as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(&body);
        let e = read_frame(&mut bytes.as_slice()).unwrap_err();
        assert!(matches!(e, WireError::Version(1)), "{e}");
        assert!(e.to_string().contains("version 1"), "{e}");
    }

    #[test]
    fn malformed_frames_are_refused_without_allocating() {
        let frame = |kind: u8, len: u32, rest: &[u8]| {
            let mut b = vec![kind];
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(rest);
            b
        };
        // Announces 4 GiB: refused before any allocation.
        let huge = frame(PAGES, u32::MAX, &[]);
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(WireError::Protocol(_))
        ));
        // Shorter than announced: the peer closed mid-frame.
        let short = frame(PAGES, 8 + 4096, &[0; 100]);
        assert!(matches!(
            read_frame(&mut short.as_slice()),
            Err(WireError::Closed)
        ));
        // Not a whole page, unaligned, too many pages, unknown kind, a body where none belongs.
        let mut part = vec![0u8; 8];
        part.extend_from_slice(&[0; 100]);
        let bad = [
            frame(PAGES, part.len() as u32, &part),
            frame(
                PAGES,
                8 + 4096,
                &[[1u8, 0, 0, 0, 0, 0, 0, 0].as_slice(), &[0; 4096]].concat(),
            ),
            frame(42, 8, &[0; 8]),
            // Disk frames: no index, no data, not whole sectors, unaligned, too large.
            frame(DISK, 10, &[0; 10]),
            frame(DISK, 12, &[0; 12]),
            frame(DISK, 8 + 4 + 100, &[0; 112]),
            frame(
                DISK,
                8 + 4 + 512,
                &[[7u8, 0, 0, 0, 0, 0, 0, 0].as_slice(), &[0; 516]].concat(),
            ),
            frame(
                DISK,
                (8 + 4 + MAX_DISK_BYTES_PER_FRAME + 512) as u32,
                &vec![0; 8 + 4 + MAX_DISK_BYTES_PER_FRAME + 512],
            ),
            frame(READY, 9, &[0; 9]),
            frame(HELLO, 12, &[0; 12]),
        ];
        for b in bad {
            assert!(
                matches!(read_frame(&mut b.as_slice()), Err(WireError::Protocol(_))),
                "{b:?}"
            );
        }
        let pages = MAX_PAGES_PER_FRAME + 1;
        let mut many = frame(PAGES, (8 + pages * PAGE_SIZE) as u32, &[0; 8]);
        many.extend(std::iter::repeat_n(0, pages * PAGE_SIZE));
        assert!(matches!(
            read_frame(&mut many.as_slice()),
            Err(WireError::Protocol(_))
        ));
        assert!(matches!(read_frame(&mut [].as_slice()), Err(WireError::Closed)));
    }
}
