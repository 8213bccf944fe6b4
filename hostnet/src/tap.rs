//! Non-persistent TAP devices. Opening `/dev/net/tun` and naming a new device with `TUNSETIFF`
//! creates it; it disappears when the last descriptor of it closes. Handed to a vmm (which checks
//! exactly these flags on a passed descriptor), the tap lives as long as that vmm does, so a vmm
//! that ends, crashes or is killed leaves nothing behind, whatever happens to whoever made it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Longest interface name (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";

/// Why a tap could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long, or holds a byte an interface name cannot.
    #[error("'{0}' is not an interface name (1-15 printable characters, no '/' or ':')")]
    InvalidName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    /// An interface of that name exists already (a tap someone else holds or made persistent, or
    /// another kind of interface).
    #[error("a network interface '{0}' exists already")]
    Exists(String),
    /// No persistent tap of that name exists.
    #[error("there is no persistent tap '{0}'")]
    NotFound(String),
    /// Not allowed (needs CAP_NET_ADMIN).
    #[error("not allowed to create tap '{0}' (needs CAP_NET_ADMIN)")]
    PermissionDenied(String),
    /// Another failure of an ioctl.
    #[error("{op} on tap '{name}'")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as `TUNSETIFF` and `TUNGETIFF` use it: the name, then the flags (a short) at
/// the start of the 24-byte union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

// The kernel copies sizeof(struct ifreq) bytes in and out: ours must be exactly that big.
const _: () = assert!(std::mem::size_of::<IfReqFlags>() == std::mem::size_of::<libc::ifreq>());

impl IfReqFlags {
    fn new(name: &str, flags: libc::c_short) -> IfReqFlags {
        let mut ifr = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags,
            _rest: [0; 22],
        };
        // check_name has bounded the name to 15 bytes, so a NUL always ends it.
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        ifr
    }
}

/// Whether `name` can name an interface: 1-15 printable ASCII bytes, no `/` or `:` (the kernel's
/// rule, less the characters it accepts but tools choke on).
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The flags a tap for a vmm has: an Ethernet device, no packet-information prefix, a
/// virtio-net header before each frame (what the vmm's tap backend requires of a passed fd).
pub const TAP_FLAGS: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

/// Creates the non-persistent tap `name` and returns its descriptor (close-on-exec, blocking;
/// the vmm makes it non-blocking). The device is down, at the kernel's default MTU, on no
/// bridge: see [`crate::netlink`]. Refuses to attach to a tap that exists already, so that two
/// VMs never share one by accident.
pub fn create_tap(name: &str) -> Result<OwnedFd, TapError> {
    let file = set_iff(name).map_err(|(e, code)| match code {
        // EBUSY: a tap of that name held by someone; EINVAL: another kind of interface.
        Some(libc::EBUSY) | Some(libc::EINVAL) | Some(libc::EEXIST) => TapError::Exists(name.to_string()),
        _ => e,
    })?;
    // TUNSETIFF attaches to a persistent tap of that name if nobody holds it: that one is
    // someone else's. Ours, made just now, is not persistent.
    if tap_flags(&file, name)? & libc::IFF_PERSIST as libc::c_short != 0 {
        return Err(TapError::Exists(name.to_string()));
    }
    Ok(file.into())
}

/// Opens `/dev/net/tun` (close-on-exec: processes spawned meanwhile must not inherit a tap) and
/// binds it to tap `name` with [`TAP_FLAGS`] (`TUNSETIFF`: creates the tap, or attaches to a
/// persistent one of that name that nobody holds). A failure comes with the ioctl's errno.
fn set_iff(name: &str) -> Result<File, (TapError, Option<i32>)> {
    if !is_valid_name(name) {
        return Err((TapError::InvalidName(name.to_string()), None));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)
        .map_err(|e| (TapError::OpenTun(e), None))?;
    let mut ifr = IfReqFlags::new(name, TAP_FLAGS);
    // SAFETY: TUNSETIFF reads and writes one struct ifreq; `ifr` has its size and layout (checked
    // at compile time above) and lives on this stack frame across the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        let code = e.raw_os_error();
        let error = match code {
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(name.to_string()),
            _ => TapError::Ioctl {
                name: name.to_string(),
                op: "TUNSETIFF",
                source: e,
            },
        };
        return Err((error, code));
    }
    Ok(file)
}

/// Attaches to the existing persistent tap `name` (an operator's) and returns its descriptor
/// (close-on-exec, blocking), for a process that cannot open it itself (a jailed vmm, without
/// CAP_NET_ADMIN and in a network namespace of its own). Refuses a name with no such tap: the
/// attach would create a new tap of that name, which is removed again here.
pub fn attach_tap(name: &str) -> Result<OwnedFd, TapError> {
    let file = set_iff(name).map_err(|(e, _)| e)?;
    if tap_flags(&file, name)? & libc::IFF_PERSIST as libc::c_short == 0 {
        // Made just now by this call: `file` goes, and the tap with it.
        return Err(TapError::NotFound(name.to_string()));
    }
    Ok(file.into())
}

/// The `IFF_*` flags of the tap behind `fd`.
fn tap_flags(fd: &impl AsRawFd, name: &str) -> Result<libc::c_short, TapError> {
    let mut ifr = IfReqFlags::new("", 0);
    // SAFETY: TUNGETIFF writes one struct ifreq; `ifr` has its size and layout and lives on this
    // stack frame across the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
    if ret < 0 {
        return Err(TapError::Ioctl {
            name: name.to_string(),
            op: "TUNGETIFF",
            source: io::Error::last_os_error(),
        });
    }
    Ok(ifr.flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_rules() {
        assert!(is_valid_name("vt0123456789abc"));
        assert!(!is_valid_name("vt0123456789abcd"), "16 bytes");
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name("a:b"));
        assert!(!is_valid_name("a b"));
        assert!(matches!(create_tap("a/b"), Err(TapError::InvalidName(_))));
        assert!(matches!(attach_tap("a/b"), Err(TapError::InvalidName(_))));
    }

    #[test]
    fn the_request_holds_the_name_nul_terminated_and_the_flags() {
        let ifr = IfReqFlags::new("vt0123456789abc", TAP_FLAGS);
        assert_eq!(&ifr.name[..15], b"vt0123456789abc");
        assert_eq!(ifr.name[15], 0);
        assert_eq!(
            i32::from(ifr.flags),
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR
        );
    }
}
