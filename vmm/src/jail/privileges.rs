//! Dropping privileges for good: resource limits, the jail uid/gid with no supplementary groups, no
//! capabilities in any set, locked securebits, `no_new_privs`, not dumpable; then checking all of it.

use super::JailError;

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(ret: libc::c_int, what: &'static str) -> Result<(), JailError> {
    if ret < 0 {
        Err(JailError::sys(what))
    } else {
        Ok(())
    }
}

/// Sets `RLIMIT_NOFILE` to `nofile` and `RLIMIT_CORE` to 0 (a core dump would hold guest memory).
pub fn set_rlimits(nofile: u64) -> Result<(), JailError> {
    for (resource, value, what) in [
        (libc::RLIMIT_NOFILE, nofile, "setrlimit(RLIMIT_NOFILE)"),
        (libc::RLIMIT_CORE, 0, "setrlimit(RLIMIT_CORE)"),
    ] {
        let limit = libc::rlimit {
            rlim_cur: value as libc::rlim_t,
            rlim_max: value as libc::rlim_t,
        };
        // SAFETY: `limit` is a valid rlimit that outlives the call.
        check(unsafe { libc::setrlimit(resource, &limit) }, what)?;
    }
    Ok(())
}

/// Becomes `uid`/`gid` for good, with no capabilities left anywhere and `no_new_privs` set, then
/// verifies it. Must run as root (with CAP_SETPCAP, CAP_SETUID, CAP_SETGID).
pub fn drop_to(uid: u32, gid: u32) -> Result<(), JailError> {
    // While still privileged: root is never special again, the setuid fixup that clears the
    // capabilities cannot be turned off, and ambient capabilities cannot be raised.
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    prctl(libc::PR_SET_SECUREBITS, bits, "PR_SET_SECUREBITS")?;
    // The bounding set: capabilities no later exec could ever regain (dropping needs CAP_SETPCAP).
    let mut cap: libc::c_ulong = 0;
    // PR_CAPBSET_READ fails (EINVAL) past the last capability the kernel knows.
    while prctl(libc::PR_CAPBSET_READ, cap, "PR_CAPBSET_READ").is_ok() {
        prctl(libc::PR_CAPBSET_DROP, cap, "PR_CAPBSET_DROP")?;
        cap += 1;
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        "PR_CAP_AMBIENT_CLEAR_ALL",
    )?;
    // SAFETY: an empty list: the pointer is not read when the size is 0.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups([])")?;
    // SAFETY: integer arguments only. gid first: after the uid change it would no longer be allowed.
    check(unsafe { libc::setresgid(gid, gid, gid) }, "setresgid")?;
    // SAFETY: integer arguments only. Leaving uid 0 clears the permitted and effective sets.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid")?;
    // The inheritable set survives a uid change: clear it too.
    set_caps(&[CapData::default(); 2])?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")?;
    // Not dumpable: no core file, no ptrace by other processes of the same uid.
    prctl(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")?;
    verify(uid, gid)
}

/// Asks the kernel to SIGKILL this process when its parent (the launcher) dies. A credential change
/// clears the setting, so it is set again after [`drop_to`].
pub fn die_with_parent() -> Result<(), JailError> {
    prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        "PR_SET_PDEATHSIG",
    )
    .map(drop)
}

/// A prctl(2) whose arguments are integers; returns what it returns.
fn prctl(option: libc::c_int, arg: libc::c_ulong, what: &'static str) -> Result<libc::c_int, JailError> {
    // SAFETY: the options used here take integer arguments only (no pointers); unused ones are 0.
    let ret = unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if ret < 0 {
        return Err(JailError::sys(what));
    }
    Ok(ret)
}

fn set_caps(data: &[CapData; 2]) -> Result<(), JailError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: header and two data structs as capset(2) expects for version 3; both outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    check(ret as libc::c_int, "capset")
}

fn get_caps() -> Result<[CapData; 2], JailError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and room for two data structs as capget(2) writes for version 3.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    check(ret as libc::c_int, "capget")?;
    Ok(data)
}

/// Checks, from the kernel's point of view, that the process is as confined as [`drop_to`] asked.
fn verify(uid: u32, gid: u32) -> Result<(), JailError> {
    let fail = |what: String| Err(JailError::NotConfined(what));
    let caps = get_caps()?;
    if caps
        .iter()
        .any(|c| c.effective | c.permitted | c.inheritable != 0)
    {
        return fail("capabilities remain after dropping privileges".into());
    }
    let mut bounding = (0..).map_while(|cap| prctl(libc::PR_CAPBSET_READ, cap, "PR_CAPBSET_READ").ok());
    if bounding.any(|present| present != 0) {
        return fail("the capability bounding set is not empty".into());
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid pointers to locals.
    check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) }, "getresuid")?;
    if [r, e, s] != [uid; 3] {
        return fail(format!("uids are {r}/{e}/{s}, not {uid}"));
    }
    // SAFETY: three valid pointers to locals.
    check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) }, "getresgid")?;
    if [r, e, s] != [gid; 3] {
        return fail(format!("gids are {r}/{e}/{s}, not {gid}"));
    }
    // SAFETY: size 0 only counts the groups; the pointer is not written.
    if unsafe { libc::getgroups(0, std::ptr::null_mut()) } != 0 {
        return fail("supplementary groups remain".into());
    }
    if prctl(libc::PR_GET_NO_NEW_PRIVS, 0, "PR_GET_NO_NEW_PRIVS")? != 1 {
        return fail("no_new_privs is not set".into());
    }
    // SAFETY: integer arguments only; this must fail now that the process is not root.
    if unsafe { libc::setresuid(0, 0, 0) } == 0 {
        return fail("the process could become root again".into());
    }
    Ok(())
}
