//! `--fd NAME=N`: descriptors the parent left open across `exec`, taken over at start-up.
//!
//! A supervisor that launches the VMM with its configuration (`--config`, possibly `--jail`) cannot
//! use `add-fds` for what that configuration names: the VM is built before any client connects, and a
//! jailed VMM could not open host files itself. So it leaves them open in the child and names them
//! on the command line. Each one then lands in the same table `add-fds` fills, under the same name
//! rules and the same total limit, so `nets[].fd`, `drives[].fd` and the like name it alike.
//!
//! Two steps: [`parse`] is pure (the flag values, checked against each other), and [`take`] claims
//! the descriptors. `take` must run before the process opens anything that lives on: a number the
//! parent did *not* pass would otherwise be found open, holding a file of our own, and be owned twice.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use vmm_api::control::MAX_PASSED_FDS;
use vmm_api::drive::is_valid_name;

use crate::device_manager::PassedFds;

/// One `--fd NAME=N`, checked but not yet taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritedFd {
    /// The name configurations use (`nets[].fd`, `drives[].fd`, ...).
    pub name: String,
    /// The descriptor number in this process, 3 or above.
    pub fd: RawFd,
}

/// Why `--fd` values cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritedFdError {
    /// A value that is not `NAME=N` with a valid name and number.
    #[error("invalid value '{value}' for --fd: {reason}")]
    BadValue {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same name twice.
    #[error("--fd {value}: the name '{name}' is given more than once")]
    DuplicateName {
        /// The second value with the name.
        value: String,
        /// The name.
        name: String,
    },
    /// The same descriptor twice (one descriptor can back one device only).
    #[error("--fd {value}: descriptor {fd} is given more than once (also as '{first}')")]
    DuplicateFd {
        /// The second value with the number.
        value: String,
        /// The number.
        fd: RawFd,
        /// The name it was first given.
        first: String,
    },
    /// More than the VMM holds.
    #[error("--fd given {0} times: at most {MAX_PASSED_FDS} passed file descriptors in all")]
    TooMany(usize),
    /// The parent did not leave it open (or left it close-on-exec).
    #[error("--fd {name}={fd}: descriptor {fd} is not open (the parent must leave it open across exec, without close-on-exec)")]
    NotOpen {
        /// Its name.
        name: String,
        /// Its number.
        fd: RawFd,
    },
    /// `fcntl` failed for another reason.
    #[error("--fd {name}={fd}: fcntl: {source}")]
    Fcntl {
        /// Its name.
        name: String,
        /// Its number.
        fd: RawFd,
        /// Why.
        source: std::io::Error,
    },
}

/// Parses and cross-checks every `--fd` value, in the order given.
pub fn parse(values: &[String]) -> Result<Vec<InheritedFd>, InheritedFdError> {
    if values.len() > MAX_PASSED_FDS {
        return Err(InheritedFdError::TooMany(values.len()));
    }
    let mut parsed: Vec<InheritedFd> = Vec::with_capacity(values.len());
    for value in values {
        let one = parse_one(value)?;
        if parsed.iter().any(|p| p.name == one.name) {
            return Err(InheritedFdError::DuplicateName {
                value: value.clone(),
                name: one.name,
            });
        }
        if let Some(first) = parsed.iter().find(|p| p.fd == one.fd) {
            return Err(InheritedFdError::DuplicateFd {
                value: value.clone(),
                fd: one.fd,
                first: first.name.clone(),
            });
        }
        parsed.push(one);
    }
    Ok(parsed)
}

fn parse_one(value: &str) -> Result<InheritedFd, InheritedFdError> {
    let bad = |reason: &str| InheritedFdError::BadValue {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let (name, number) = value
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=N (N the number of a descriptor left open by the parent)"))?;
    if !is_valid_name(name) {
        return Err(bad("NAME must be 1-64 characters of A-Z a-z 0-9 _ -"));
    }
    // Digits only: `parse` alone would take "+5".
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("N must be a decimal descriptor number"));
    }
    let fd: RawFd = number
        .parse()
        .map_err(|_| bad("N is too large for a descriptor number"))?;
    if fd < 3 {
        return Err(bad(
            "descriptors 0, 1 and 2 are standard input, output and error: pass 3 or above",
        ));
    }
    Ok(InheritedFd {
        name: name.to_string(),
        fd,
    })
}

/// Takes ownership of every inherited descriptor and marks it close-on-exec (nothing the VMM runs
/// later may inherit a tap or a disk). All are checked before any is taken: on an error this
/// process owns none of them, and the caller exits.
///
/// Call before anything opens a file that stays open (see the module documentation).
pub fn take(inherited: &[InheritedFd]) -> Result<PassedFds, InheritedFdError> {
    let mut flags = Vec::with_capacity(inherited.len());
    for one in inherited {
        flags.push(fd_flags(one)?);
    }
    let mut taken = PassedFds::with_capacity(inherited.len());
    for (one, flags) in inherited.iter().zip(flags) {
        // SAFETY: F_SETFD changes only the descriptor flags of an open descriptor (checked above).
        if unsafe { libc::fcntl(one.fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            // The ones taken so far close as `taken` drops.
            return Err(InheritedFdError::Fcntl {
                name: one.name.clone(),
                fd: one.fd,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the descriptor is open, was open when the process started (nothing has opened a
        // file that is still open before this runs, so the number cannot be one of ours), and
        // `parse` let each number through once: this is its only owner.
        taken.insert(one.name.clone(), unsafe { OwnedFd::from_raw_fd(one.fd) });
    }
    Ok(taken)
}

/// The descriptor flags of `one`, or why it cannot be used.
fn fd_flags(one: &InheritedFd) -> Result<libc::c_int, InheritedFdError> {
    // SAFETY: F_GETFD only reads the descriptor flags; on a number that is not open it fails.
    let flags = unsafe { libc::fcntl(one.fd, libc::F_GETFD) };
    if flags >= 0 {
        return Ok(flags);
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::EBADF) => InheritedFdError::NotOpen {
            name: one.name.clone(),
            fd: one.fd,
        },
        _ => InheritedFdError::Fcntl {
            name: one.name.clone(),
            fd: one.fd,
            source: e,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, IntoRawFd};

    fn values(s: &[&str]) -> Vec<String> {
        s.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn values_parse_in_order() {
        let parsed = parse(&values(&["tap0=3", "disk_1=17", "mig-x=2147483647"])).unwrap();
        let pairs: Vec<(&str, RawFd)> = parsed.iter().map(|p| (p.name.as_str(), p.fd)).collect();
        assert_eq!(pairs, [("tap0", 3), ("disk_1", 17), ("mig-x", i32::MAX)]);
        assert!(parse(&[]).unwrap().is_empty());
        let most: Vec<String> = (0..MAX_PASSED_FDS).map(|i| format!("f{i}={}", i + 3)).collect();
        assert_eq!(parse(&most).unwrap().len(), MAX_PASSED_FDS);
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let name64 = format!("{}=3", "n".repeat(64));
        assert!(parse(&[name64]).is_ok());
        let name65 = format!("{}=3", "n".repeat(65));
        let too_many: Vec<String> = (0..=MAX_PASSED_FDS).map(|i| format!("f{i}={}", i + 3)).collect();
        let cases: Vec<(Vec<String>, &str)> = vec![
            (
                values(&["tap0"]),
                "invalid value 'tap0' for --fd: expected NAME=N",
            ),
            (values(&["=3"]), "invalid value '=3' for --fd: NAME must be"),
            (values(&["a b=3"]), "NAME must be"),
            (values(&["a/b=3"]), "NAME must be"),
            (vec![name65], "NAME must be"),
            (
                values(&["x="]),
                "invalid value 'x=' for --fd: N must be a decimal",
            ),
            (values(&["x=+5"]), "N must be a decimal"),
            (values(&["x=-1"]), "N must be a decimal"),
            (values(&["x=0x10"]), "N must be a decimal"),
            (values(&["x=5=6"]), "N must be a decimal"),
            (values(&["x=2147483648"]), "too large"),
            (values(&["x=0"]), "pass 3 or above"),
            (values(&["x=2"]), "pass 3 or above"),
            (
                values(&["a=3", "b=4", "a=5"]),
                "--fd a=5: the name 'a' is given more than once",
            ),
            (
                values(&["a=3", "b=4", "c=3"]),
                "--fd c=3: descriptor 3 is given more than once (also as 'a')",
            ),
            (too_many, "--fd given 65 times: at most 64"),
        ];
        for (given, expected) in cases {
            let err = parse(&given).unwrap_err().to_string();
            assert!(err.contains(expected), "{given:?}: {err}");
        }
    }

    #[test]
    fn taking_checks_every_descriptor_first_and_sets_close_on_exec() {
        let file = std::fs::File::open("/proc/self/statm").unwrap();
        let fd = file.into_raw_fd();
        // Clear close-on-exec, as a parent passing it down would have.
        // SAFETY: F_SETFD on a descriptor this test opened.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        // A number far above anything a test process opens.
        let closed = InheritedFd {
            name: "gone".into(),
            fd: 1_000_000,
        };
        let open = InheritedFd {
            name: "statm".into(),
            fd,
        };
        let err = take(&[open.clone(), closed]).unwrap_err().to_string();
        assert!(
            err.contains("--fd gone=1000000: descriptor 1000000 is not open"),
            "{err}"
        );
        // The failed take left the open one alone: still open, still inheritable.
        // SAFETY: F_GETFD only reads flags.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFD) }, 0);

        let mut taken = take(std::slice::from_ref(&open)).unwrap();
        let owned = taken.remove("statm").unwrap();
        assert_eq!(owned.as_raw_fd(), fd);
        // SAFETY: F_GETFD only reads flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
