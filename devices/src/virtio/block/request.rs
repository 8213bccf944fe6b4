//! Turning a guest's descriptor chain into a validated block request.
//!
//! The descriptor walk itself (indirect tables, loops, chain length) is virtio-queue's; this module
//! checks what the chain means: a 16-byte header the device reads, data in the direction the request
//! type needs, and a one-byte status the device writes last. Nothing here trusts a length, an address
//! or a sector number that the guest supplied.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::disk::SECTOR_SIZE;

/// Size of the request header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment: sector (u64), sector count (u32), flags (u32).
const SEGMENT_LEN: u32 = 16;
/// The most descriptors a request may have; Linux never needs more than the queue size.
pub const MAX_DESCRIPTORS: usize = 1024;

/// A piece of guest memory named by one descriptor (or part of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// What the guest asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes from `sector` into the guest's writable buffers.
    Read {
        /// First sector.
        sector: u64,
        /// Total bytes, a multiple of 512.
        len: u32,
        /// Where the data goes.
        data: Vec<Segment>,
    },
    /// Write `len` bytes from the guest's readable buffers at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Total bytes, a multiple of 512.
        len: u32,
        /// Where the data comes from.
        data: Vec<Segment>,
    },
    /// Make every completed write durable.
    Flush,
    /// Copy the drive's serial into the guest's buffer.
    GetId {
        /// Where the serial goes (at most 20 bytes are written).
        data: Vec<Segment>,
    },
    /// Deallocate a range.
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
    },
    /// Zero a range, deallocating it if `unmap` is set.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u32,
        /// The guest allows the range to be deallocated.
        unmap: bool,
    },
}

impl RequestKind {
    /// Whether the request changes the disk.
    pub fn writes(&self) -> bool {
        matches!(
            self,
            RequestKind::Write { .. } | RequestKind::Discard { .. } | RequestKind::WriteZeroes { .. }
        )
    }

    /// Bytes of guest data moved, for bandwidth accounting.
    pub fn data_len(&self) -> u64 {
        match self {
            RequestKind::Read { len, .. } | RequestKind::Write { len, .. } => u64::from(*len),
            _ => 0,
        }
    }
}

/// A parsed request: what to do, and where its status byte goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The descriptor chain's head, to return it on the used ring.
    pub head: u16,
    /// The operation.
    pub kind: RequestKind,
    /// The status byte's guest address.
    pub status: GuestAddress,
}

/// The limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    /// Capacity in sectors.
    pub sectors: u64,
    /// The drive is read-only.
    pub read_only: bool,
    /// DISCARD and WRITE_ZEROES were negotiated.
    pub discard: bool,
    /// Largest DISCARD / WRITE_ZEROES in sectors (also advertised in the config space).
    pub max_discard_sectors: u32,
}

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// There is no writable byte for the status: the request can only be dropped.
    #[error("descriptor chain has no writable status byte")]
    NoStatus {
        /// The chain's head.
        head: u16,
    },
    /// The chain is malformed or the request invalid; the guest gets `status`.
    #[error("{reason}")]
    Rejected {
        /// The chain's head.
        head: u16,
        /// Its status byte.
        status_addr: GuestAddress,
        /// VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP.
        status: u8,
        /// Why, for the log.
        reason: &'static str,
    },
}

/// IOERR as the byte written into the status field.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// UNSUPP as the byte written into the status field.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The chain split by direction, with the status byte taken off the end.
struct Layout {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

fn layout<M: GuestMemory>(
    head: u16,
    chain: DescriptorChain<&M>,
) -> Result<(Layout, GuestAddress), RequestError> {
    let mut readable = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut order_ok = true;
    for (count, desc) in chain.enumerate() {
        if count >= MAX_DESCRIPTORS {
            order_ok = false;
            break;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            // The spec puts every device-readable descriptor before the device-writable ones.
            order_ok = false;
        }
    }
    // The status is the last byte of the last writable descriptor.
    let status_addr = loop {
        let Some(last) = writable.last_mut() else {
            return Err(RequestError::NoStatus { head });
        };
        if last.len == 0 {
            writable.pop();
            continue;
        }
        last.len -= 1;
        let addr = last
            .addr
            .checked_add(u64::from(last.len))
            .ok_or(RequestError::NoStatus { head })?;
        if last.len == 0 {
            writable.pop();
        }
        break addr;
    };
    if !order_ok {
        return Err(reject(
            head,
            status_addr,
            STATUS_IOERR,
            "malformed descriptor chain",
        ));
    }
    Ok((Layout { readable, writable }, status_addr))
}

fn reject(head: u16, status_addr: GuestAddress, status: u8, reason: &'static str) -> RequestError {
    RequestError::Rejected {
        head,
        status_addr,
        status,
        reason,
    }
}

/// Sums segment lengths; `None` if they exceed `u32` (the spec caps a chain at 4 GiB).
fn total_len(segs: &[Segment]) -> Option<u32> {
    segs.iter().try_fold(0u32, |acc, s| acc.checked_add(s.len))
}

/// Reads `buf.len()` bytes from the start of `segs`, returning the remaining segments.
fn read_prefix<M: GuestMemory>(mem: &M, segs: &[Segment], buf: &mut [u8]) -> Option<Vec<Segment>> {
    let mut filled = 0usize;
    let mut rest = Vec::new();
    for seg in segs {
        let want = buf.len() - filled;
        let take = (seg.len as usize).min(want);
        if take > 0 {
            mem.read_slice(&mut buf[filled..filled + take], seg.addr).ok()?;
            filled += take;
        }
        if take < seg.len as usize {
            rest.push(Segment {
                addr: seg.addr.checked_add(take as u64)?,
                len: seg.len - take as u32,
            });
        }
    }
    (filled == buf.len()).then_some(rest)
}

/// Checks that `[sector, sector + bytes / 512)` lies on the disk.
fn in_range(sector: u64, bytes: u64, limits: &DiskLimits) -> bool {
    bytes.is_multiple_of(SECTOR_SIZE)
        && sector
            .checked_add(bytes / SECTOR_SIZE)
            .is_some_and(|end| end <= limits.sectors)
}

/// Parses the chain whose head is `head`.
pub fn parse<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    mem: &M,
    limits: &DiskLimits,
) -> Result<Request, RequestError> {
    let head = chain.head_index();
    let (layout, status) = layout(head, chain)?;
    let rej = |status_byte, reason| reject(head, status, status_byte, reason);

    let mut header = [0u8; HEADER_LEN as usize];
    let data_in = read_prefix(mem, &layout.readable, &mut header)
        .ok_or_else(|| rej(STATUS_IOERR, "request header missing or outside guest memory"))?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
    ]);
    let data_out = layout.writable;
    let in_len = total_len(&data_in).ok_or_else(|| rej(STATUS_IOERR, "request too long"))?;
    let out_len = total_len(&data_out).ok_or_else(|| rej(STATUS_IOERR, "request too long"))?;

    let kind = match req_type {
        VIRTIO_BLK_T_IN => {
            if in_len != 0 {
                return Err(rej(STATUS_IOERR, "read request with device-readable data"));
            }
            if !in_range(sector, u64::from(out_len), limits) {
                return Err(rej(
                    STATUS_IOERR,
                    "read beyond the end of the disk or not in sectors",
                ));
            }
            RequestKind::Read {
                sector,
                len: out_len,
                data: data_out,
            }
        }
        VIRTIO_BLK_T_OUT => {
            if out_len != 0 {
                return Err(rej(STATUS_IOERR, "write request with device-writable data"));
            }
            if limits.read_only {
                return Err(rej(STATUS_IOERR, "write to a read-only drive"));
            }
            if !in_range(sector, u64::from(in_len), limits) {
                return Err(rej(
                    STATUS_IOERR,
                    "write beyond the end of the disk or not in sectors",
                ));
            }
            RequestKind::Write {
                sector,
                len: in_len,
                data: data_in,
            }
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if out_len == 0 {
                return Err(rej(STATUS_IOERR, "GET_ID without a buffer"));
            }
            RequestKind::GetId { data: data_out }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !limits.discard {
                return Err(rej(STATUS_UNSUPP, "discard or write-zeroes not negotiated"));
            }
            if limits.read_only {
                return Err(rej(STATUS_IOERR, "discard or write-zeroes on a read-only drive"));
            }
            // One segment per request: the device advertises max_discard_seg = 1.
            let mut seg = [0u8; SEGMENT_LEN as usize];
            if in_len != SEGMENT_LEN || read_prefix(mem, &data_in, &mut seg).is_none() {
                return Err(rej(
                    STATUS_IOERR,
                    "discard or write-zeroes needs exactly one segment",
                ));
            }
            let sector = u64::from_le_bytes([seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7]]);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            if sectors > limits.max_discard_sectors
                || !in_range(sector, u64::from(sectors) * SECTOR_SIZE, limits)
            {
                return Err(rej(STATUS_IOERR, "discard or write-zeroes range beyond the disk"));
            }
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return Err(rej(STATUS_UNSUPP, "unknown discard flags"));
            }
            if req_type == VIRTIO_BLK_T_DISCARD {
                // The spec: the unmap flag is reserved for discard, and must be rejected.
                if unmap {
                    return Err(rej(STATUS_UNSUPP, "unmap flag on a discard"));
                }
                RequestKind::Discard { sector, sectors }
            } else {
                RequestKind::WriteZeroes {
                    sector,
                    sectors,
                    unmap,
                }
            }
        }
        _ => return Err(rej(STATUS_UNSUPP, "unsupported request type")),
    };
    Ok(Request { head, kind, status })
}

/// Bytes of the serial written for GET_ID (the spec's fixed 20).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
