//! The TAP back end: a Linux tap interface opened through `/dev/net/tun`, or handed over already
//! open, that exchanges Ethernet frames with the host, each preceded by a 12-byte virtio-net header
//! (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`) so that checksum and segmentation offloads pass through.
//!
//! The device talks to it through [`TapIo`], so that unit tests can put a socket pair (which keeps
//! message boundaries, as a tap does) or an error-injecting double in its place.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::HDR_LEN;
use crate::virtio::feature;

/// The most pieces one frame may have (the kernel's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

const TUN_PATH: &CStr = c"/dev/net/tun";

/// Why a tap could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long for the kernel (`IFNAMSIZ` - 1 bytes), or has a NUL or `/`.
    #[error("tap name {0:?} is empty, longer than 15 bytes, or contains a NUL or '/'")]
    InvalidName(String),
    /// No interface has that name (in this network namespace).
    #[error("tap {0} does not exist (create it first, e.g. ip tuntap add dev {0} mode tap)")]
    NoSuchInterface(String),
    /// `/dev/net/tun` does not exist.
    #[error("tap {0}: /dev/net/tun does not exist (is the tun module loaded?)")]
    NoTunDevice(String),
    /// `/dev/net/tun` could not be opened.
    #[error("tap {name}: cannot open /dev/net/tun")]
    OpenTun {
        /// The tap.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The caller may not create or attach this tap.
    #[error("tap {0}: permission denied (creating a tap needs CAP_NET_ADMIN; attaching a persistent one needs its owner)")]
    PermissionDenied(String),
    /// Another process has the tap open.
    #[error("tap {0} is busy: another process has it attached")]
    Busy(String),
    /// An interface of that name exists and is not a tap (or has flags that conflict).
    #[error("interface {0} exists and is not a tap that can be attached with a virtio-net header")]
    NotATapInterface(String),
    /// A passed descriptor is not an attached tun/tap descriptor.
    #[error("passed descriptor is not an attached tap")]
    NotATap(#[source] io::Error),
    /// A passed tap lacks a flag this device needs.
    #[error("passed tap {name} was not opened with {flag}")]
    MissingFlag {
        /// The interface.
        name: String,
        /// The flag (`IFF_TAP`, `IFF_NO_PI`, `IFF_VNET_HDR`).
        flag: &'static str,
    },
    /// Another ioctl or fcntl failed.
    #[error("tap {name}: {op}")]
    Setup {
        /// The interface.
        name: String,
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

/// What the device needs from its back end. Every method must not block.
pub trait TapIo: Send {
    /// Reads one frame (virtio-net header first) into `buf`. Returns its full length, which is more
    /// than `buf.len()` if the frame did not fit (the rest is lost); `WouldBlock` if none is queued.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (virtio-net header first) gathered from guest memory.
    fn write_frame(&mut self, frame: &TxFrame) -> io::Result<usize>;
    /// Sets the offloads the tap may use on frames it hands over (`TUN_F_*`).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// The descriptor the event loop watches (readable: frames queued; writable: room to send).
    fn as_raw_fd(&self) -> RawFd;
    /// The interface name, for logs.
    fn name(&self) -> &str;
}

/// One outgoing frame as `iovec`s pointing into guest memory, so that the tap's `writev` copies
/// straight from the guest's buffers.
///
/// Invariant: every `iovec` was built from a slice that vm-memory validated against guest memory,
/// and guest memory stays mapped for the life of the VMM, so the pointers can always be read (or,
/// in [`TxFrame::write_host`], from a buffer that outlives the frame).
#[derive(Debug, Default)]
pub struct TxFrame {
    iovs: Vec<libc::iovec>,
    len: usize,
}

// SAFETY: the iovecs point into guest memory, mapped for the whole life of the process and shared by
// design between threads; they are only dereferenced by the kernel in `writev`.
unsafe impl Send for TxFrame {}

/// Why guest buffers could not become a [`TxFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxFrameError {
    /// A buffer is not (entirely) in guest memory.
    #[error("buffer outside guest memory")]
    OutsideMemory,
    /// More pieces than the kernel takes in one `writev`.
    #[error("more than {MAX_IOVECS} buffer pieces")]
    TooManyPieces,
}

impl TxFrame {
    /// Empties the frame, keeping its allocation.
    pub(crate) fn clear(&mut self) {
        self.iovs.clear();
        self.len = 0;
    }

    /// Appends `len` bytes of guest memory at `addr`, split where they cross memory regions.
    pub(crate) fn push_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), TxFrameError> {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            let slice = slice.map_err(|_| TxFrameError::OutsideMemory)?;
            if self.iovs.len() == MAX_IOVECS {
                return Err(TxFrameError::TooManyPieces);
            }
            self.iovs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            self.len += slice.len();
        }
        Ok(())
    }

    /// Writes `bytes` (a frame the VMM itself made, virtio-net header first) to `tap`. The frame
    /// that points at `bytes` lives only inside this call, so the pointer cannot outlive the buffer.
    pub(crate) fn write_host(tap: &mut dyn TapIo, bytes: &[u8]) -> io::Result<usize> {
        let frame = TxFrame {
            iovs: vec![libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            }],
            len: bytes.len(),
        };
        tap.write_frame(&frame)
    }

    /// Total bytes, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the frame has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `writev`s the frame to `fd` in one call (a tap or a datagram socket takes it as one frame).
    pub fn write_to(&self, fd: RawFd) -> io::Result<usize> {
        // The kernel's limit is checked when pieces are added, so this cannot truncate.
        let count = self.iovs.len() as libc::c_int;
        // SAFETY: the iovecs point into mapped guest memory (the type's invariant) and the kernel
        // only reads them; `count` is the length of the array passed.
        let n = unsafe { libc::writev(fd, self.iovs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Reads once from `fd` into `buf`.
pub(crate) fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow mutably.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Whether `fd` has room for a write now. In the tun driver (and for sockets) asking while it has
/// none also arranges for a write-space wake-up, which an edge-triggered epoll reports as writable.
pub(crate) fn writable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll reads and writes exactly one pollfd, which lives on this stack frame.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLOUT != 0
}

/// The `TUN_F_*` offloads to set on the tap for the features the guest acked: the tap may only hand
/// the guest frames the guest said it can take. Mirrors the kernel's own rule that segmentation
/// offloads only count with checksum offload.
pub fn offload_flags(acked: u64) -> u32 {
    let has = |bit: u32| acked & feature(bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    let tso4 = has(VIRTIO_NET_F_GUEST_TSO4);
    let tso6 = has(VIRTIO_NET_F_GUEST_TSO6);
    if tso4 {
        flags |= libc::TUN_F_TSO4;
    }
    if tso6 {
        flags |= libc::TUN_F_TSO6;
    }
    if (tso4 || tso6) && has(VIRTIO_NET_F_GUEST_ECN) {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    if has(VIRTIO_NET_F_GUEST_USO4) {
        flags |= libc::TUN_F_USO4;
    }
    if has(VIRTIO_NET_F_GUEST_USO6) {
        flags |= libc::TUN_F_USO6;
    }
    flags
}

/// An attached tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name` with a virtio-net header and without packet information,
    /// non-blocking. It never creates one: a tap the VMM made would vanish with it, unknown to
    /// whoever set up the host's network, so a missing tap is an error.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let ifr_name = ifr_name(name)?;
        let c_name = std::ffi::CString::new(name).map_err(|_| TapError::InvalidName(name.to_string()))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string that lives across the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(TapError::NoSuchInterface(name.to_string()));
        }
        // SAFETY: a valid NUL-terminated path; the returned descriptor is checked and owned below.
        let fd = unsafe {
            libc::open(
                TUN_PATH.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    TapError::NoTunDevice(name.to_string())
                }
                _ => TapError::OpenTun {
                    name: name.to_string(),
                    source: e,
                },
            });
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut ifr = empty_ifreq();
        ifr.ifr_name = ifr_name;
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on this stack frame.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EINVAL) => TapError::NotATapInterface(name),
                _ => TapError::Setup {
                    name,
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Tap {
            file,
            name: name_of(&ifr),
        };
        tap.set_vnet_hdr_size(HDR_LEN as i32)?;
        Ok(tap)
    }

    /// Takes a tap that a supervisor opened and attached (`TUNSETIFF` with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`), makes it non-blocking and close-on-exec, and sets the header size.
    /// Non-blocking is a property of the open file, so a copy the supervisor kept becomes
    /// non-blocking too; the supervisor is not meant to use it for I/O.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        let mut ifr = empty_ifreq();
        // SAFETY: TUNGETIFF writes one ifreq, which lives on this stack frame; on a descriptor that
        // is not a tun device the ioctl fails without writing.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::NotATap(io::Error::last_os_error()));
        }
        let name = name_of(&ifr);
        // SAFETY: TUNGETIFF succeeded, so the kernel filled in the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        for (bit, flag) in [
            (libc::IFF_TAP, "IFF_TAP"),
            (libc::IFF_NO_PI, "IFF_NO_PI"),
            (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
        ] {
            if flags & bit == 0 {
                return Err(TapError::MissingFlag { name, flag });
            }
        }
        let fcntl_err = |name: &str, op| TapError::Setup {
            name: name.to_string(),
            op,
            source: io::Error::last_os_error(),
        };
        // SAFETY: F_GETFL only reads the status flags of a descriptor we own.
        let status = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if status < 0 {
            return Err(fcntl_err(&name, "get status flags"));
        }
        // SAFETY: F_SETFL only sets the status flags of a descriptor we own.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK) };
        if ret < 0 {
            return Err(fcntl_err(&name, "set O_NONBLOCK"));
        }
        // SAFETY: F_SETFD only sets the descriptor flags of a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(fcntl_err(&name, "set FD_CLOEXEC"));
        }
        let tap = Tap { file, name };
        tap.set_vnet_hdr_size(HDR_LEN as i32)?;
        Ok(tap)
    }

    /// The interface name (as the kernel reports it).
    pub fn if_name(&self) -> &str {
        &self.name
    }

    /// Sets the virtio-net header size the tap reads and writes before each frame.
    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives on this stack frame.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(TapError::Setup {
                name: self.name.clone(),
                op: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The tap's interface flags (`IFF_*` of `TUNGETIFF`).
    pub fn flags(&self) -> io::Result<i32> {
        let mut ifr = empty_ifreq();
        // SAFETY: TUNGETIFF writes one ifreq, which lives on this stack frame.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: TUNGETIFF succeeded, so the kernel filled in the flags member of the union.
        Ok(i32::from(unsafe { ifr.ifr_ifru.ifru_flags }))
    }

    /// The virtio-net header size set on the tap.
    pub fn vnet_hdr_size(&self) -> io::Result<i32> {
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int, which lives on this stack frame.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut size) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    }
}

impl TapIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.file.as_raw_fd(), buf)
    }

    fn write_frame(&mut self, frame: &TxFrame) -> io::Result<usize> {
        frame.write_to(self.file.as_raw_fd())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

fn empty_ifreq() -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers, addresses and a
    // pointer), for which all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Checks `name` and converts it to the kernel's fixed-size, NUL-terminated form.
fn ifr_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.iter().any(|&b| b == 0 || b == b'/') {
        return Err(TapError::InvalidName(name.to_string()));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

fn name_of(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_CSUM;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "0123456789abcdef", "a/b", "nul\0x"] {
            assert!(matches!(Tap::open(bad), Err(TapError::InvalidName(_))), "{bad:?}");
        }
        assert!(ifr_name("0123456789abcde").is_ok());
    }

    #[test]
    fn offloads_follow_what_the_guest_accepts() {
        let f = feature;
        assert_eq!(offload_flags(0), 0);
        // Host-side (transmit) offloads do not let the tap send anything.
        assert_eq!(offload_flags(f(VIRTIO_NET_F_CSUM)), 0);
        // Segmentation without checksum offload means nothing, as in the kernel.
        assert_eq!(offload_flags(f(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(offload_flags(f(VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
        let all = f(VIRTIO_NET_F_GUEST_CSUM)
            | f(VIRTIO_NET_F_GUEST_TSO4)
            | f(VIRTIO_NET_F_GUEST_TSO6)
            | f(VIRTIO_NET_F_GUEST_ECN)
            | f(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            offload_flags(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO
        );
        // ECN alone is meaningless.
        assert_eq!(
            offload_flags(f(VIRTIO_NET_F_GUEST_CSUM) | f(VIRTIO_NET_F_GUEST_ECN)),
            libc::TUN_F_CSUM
        );
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(Tap::from_fd(file.into()), Err(TapError::NotATap(_))));
    }
}
