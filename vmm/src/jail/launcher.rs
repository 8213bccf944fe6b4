//! The fork into the jail: the launcher (parent) that supervises and cleans up, and the child's
//! ordered confinement steps.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::cgroup::{Cgroup, Hierarchy, Limits};
use super::fs::{self, HostFiles};
use super::{namespaces, privileges, Entered, JailConfig, JailError, JailLayout};
use crate::arch::host_quirks::KvmFlavor;
use crate::cli::RunOptions;
use crate::device_manager::PassedFds;

/// Signals the launcher forwards to the VMM.
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Sets up the jail and forks. Returns in both processes: [`Entered::Vmm`] in the jailed child, with
/// the inherited descriptors `fds`, [`Entered::Launcher`] in the parent once the child has exited
/// and the jail is cleaned up.
pub fn launch(
    jail: &JailConfig,
    layout: JailLayout,
    options: RunOptions,
    fds: PassedFds,
) -> Result<Entered, JailError> {
    ensure_single_threaded()?;
    // Facts about the host that the VMM needs later but cannot see from inside the jail.
    let _ = KvmFlavor::detect();
    let _ = vmm_api::snapshot::host_cpu_model();
    let netns = jail.netns.as_deref().map(namespaces::open_netns).transpose()?;
    let host = fs::prepare_host(jail, &layout)?;
    let limits = Limits {
        cpu: jail.cpu_limit,
        memory_bytes: jail.memory_limit_mib.map(|m| m << 20),
        pids: jail.pids_limit,
    };
    let cgroup = match Hierarchy::detect().and_then(|h| Cgroup::create(h, &jail.id, &limits)) {
        Ok(c) => c,
        Err(e) => {
            fs::cleanup(host);
            return Err(e.into());
        }
    };
    match fork_jailed(jail, &host, netns.as_ref(), &cgroup, fds) {
        Forked::Child(Ok(fds)) => {
            let mut options = options;
            options.api_sock = layout.api_sock.clone();
            Ok(Entered::Vmm(layout.config.map(Box::new), options, fds))
        }
        // The launcher cleans up; the child only reports.
        Forked::Child(Err(e)) => Err(e),
        Forked::Parent(result) => {
            if let Err(e) = cgroup.remove() {
                log::warn!("jail cleanup: {e}");
            }
            fs::cleanup(host);
            result.map(Entered::Launcher)
        }
    }
}

enum Forked {
    /// The jailed VMM, confined, with the inherited descriptors.
    Child(Result<PassedFds, JailError>),
    Parent(Result<i32, JailError>),
}

/// Refuses to fork a multi-threaded process: only the forking thread would survive in the child,
/// and locks other threads held would stay locked.
fn ensure_single_threaded() -> Result<(), JailError> {
    match std::fs::read_dir("/proc/self/task").map(|d| d.count()) {
        Ok(1) => Ok(()),
        Ok(n) => Err(JailError::NotConfined(format!(
            "the jail must be entered while the process has one thread, it has {n}"
        ))),
        Err(e) => Err(JailError::io(
            "cannot read",
            std::path::Path::new("/proc/self/task"),
            e,
        )),
    }
}

fn pipe() -> Result<(File, File), JailError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::sys("pipe2"));
    }
    // SAFETY: pipe2 just returned these two open descriptors, owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), File::from(w)))
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in signals {
        // SAFETY: `set` is a valid sigset_t and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    set
}

/// Forks the VMM off. Inherited descriptors (`fds`) are copied by the fork and end up in the VMM
/// only: the child keeps them through every confinement step, none of which touches open
/// descriptors (namespaces change what new lookups see, and a tap stays attached to its device in
/// the namespace it was opened in; `pivot_root` leaves open files usable without a path; access was
/// checked when the parent opened them, so the uid change does not matter; `RLIMIT_NOFILE` limits
/// new numbers only), and no `exec` follows, so close-on-exec does not drop them either. The
/// launcher closes its copies right after the fork: it has no use for them, and holding them for
/// the VM's lifetime would keep a tap (or a migration stream, or a disk) alive after the VMM died.
fn fork_jailed(
    jail: &JailConfig,
    host: &HostFiles,
    netns: Option<&File>,
    cgroup: &Cgroup,
    fds: PassedFds,
) -> Forked {
    let setup = || -> Result<_, JailError> {
        let (ready_r, ready_w) = pipe()?;
        let mut blocked = FORWARDED.to_vec();
        blocked.push(libc::SIGCHLD);
        let set = signal_set(&blocked);
        // SAFETY: sigset_t is plain data, filled by sigprocmask.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid sigset pointers. Blocked before the fork so that no signal meant for the
        // VMM is lost before the launcher reads them from its signalfd.
        if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) } != 0 {
            return Err(JailError::sys("sigprocmask"));
        }
        namespaces::unshare_pid()?;
        Ok((ready_r, ready_w, set, old))
    };
    let (ready_r, ready_w, set, old) = match setup() {
        Ok(s) => s,
        Err(e) => return Forked::Parent(Err(e)),
    };
    // SAFETY: the process is single-threaded (checked), so the child is a consistent copy.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Forked::Parent(Err(JailError::sys("fork")));
    }
    if pid == 0 {
        drop(ready_w);
        return Forked::Child(child(jail, host, netns, ready_r, &old).map(|()| fds));
    }
    drop(fds);
    drop(ready_r);
    Forked::Parent(parent(pid, cgroup, ready_w, &set))
}

/// The launcher after the fork: puts the child in the cgroup, lets it go, forwards signals, waits.
fn parent(
    pid: libc::pid_t,
    cgroup: &Cgroup,
    mut ready: File,
    set: &libc::sigset_t,
) -> Result<i32, JailError> {
    let released = cgroup.add(pid).map_err(JailError::from).and_then(|()| {
        ready.write_all(b"1").map_err(|e| JailError::Sys {
            what: "release the VMM",
            source: e,
        })
    });
    if let Err(e) = released {
        // SAFETY: kill with a pid this process forked and has not reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_child(pid)?;
        return Err(e);
    }
    // SAFETY: a valid signal set; -1 asks for a new signalfd.
    let sfd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    if sfd < 0 {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_child(pid)?;
        return Err(JailError::sys("signalfd"));
    }
    // SAFETY: signalfd just returned this descriptor, owned by nobody else.
    let mut signals = File::from(unsafe { OwnedFd::from_raw_fd(sfd) });
    loop {
        if let Some(code) = try_wait(pid)? {
            // `ready` stays open until here: the child sees it closed only once the launcher is gone.
            drop(ready);
            return Ok(code);
        }
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match signals.read(&mut info) {
            Ok(n) if n == info.len() => {
                // ssi_signo is the first field (u32) of signalfd_siginfo.
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as libc::c_int;
                if FORWARDED.contains(&signo) {
                    // SAFETY: kill with a pid this process forked and has not reaped.
                    unsafe { libc::kill(pid, signo) };
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(JailError::Sys {
                    what: "read signalfd",
                    source: e,
                })
            }
        }
    }
}

/// The child's exit code, if it has exited: its own, or 128 + the signal that killed it.
fn try_wait(pid: libc::pid_t) -> Result<Option<i32>, JailError> {
    let mut status = 0;
    // SAFETY: a valid pointer to a local.
    let ret = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if ret < 0 {
        return Err(JailError::sys("waitpid"));
    }
    if ret == 0 {
        return Ok(None);
    }
    if libc::WIFEXITED(status) {
        Ok(Some(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Ok(Some(128 + libc::WTERMSIG(status)))
    } else {
        Ok(None)
    }
}

fn wait_child(pid: libc::pid_t) -> Result<i32, JailError> {
    loop {
        if let Some(code) = try_wait(pid)? {
            return Ok(code);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The child, PID 1 of the new PID namespace: every confinement step, in order (docs/jail.md).
fn child(
    jail: &JailConfig,
    host: &HostFiles,
    netns: Option<&File>,
    mut ready: File,
    old_mask: &libc::sigset_t,
) -> Result<(), JailError> {
    privileges::die_with_parent()?;
    // Wait to be placed in the cgroup: nothing is allocated before the limits apply. End of file
    // means the launcher died or gave up (before or after the PDEATHSIG above).
    let mut byte = [0u8; 1];
    match ready.read(&mut byte) {
        Ok(1) => {}
        _ => {
            return Err(JailError::NotConfined(
                "the launcher went away before releasing the VMM".into(),
            ))
        }
    }
    namespaces::unshare_rest(netns)?;
    namespaces::set_hostname(&jail.id)?;
    fs::enter_root(jail, host)?;
    privileges::set_rlimits(jail.nofile)?;
    privileges::drop_to(jail.uid, jail.gid)?;
    // The uid change cleared the parent-death signal: set it again, then check that the launcher
    // did not die in between (its end of the pipe would be closed).
    privileges::die_with_parent()?;
    let mut poll = libc::pollfd {
        fd: ready.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; timeout 0 does not block.
    let n = unsafe { libc::poll(&mut poll, 1, 0) };
    if n != 0 {
        return Err(JailError::NotConfined("the launcher went away".into()));
    }
    drop(ready);
    install_exit_handlers()?;
    // SAFETY: a valid signal set saved before the fork: the VMM starts with the caller's mask.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, old_mask, std::ptr::null_mut()) } != 0 {
        return Err(JailError::sys("sigprocmask"));
    }
    Ok(())
}

extern "C" fn exit_on_signal(signo: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + signo) };
}

/// As PID 1 of its namespace the VMM ignores every signal it has no handler for, even SIGTERM from
/// the launcher: exit on the forwarded ones, with the code the shell would report for the signal.
fn install_exit_handlers() -> Result<(), JailError> {
    for signo in FORWARDED {
        // SAFETY: sigaction is plain data; zeroed is a valid empty action.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = exit_on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `action` is a valid sigaction whose handler only calls _exit.
        if unsafe { libc::sigaction(signo, &action, std::ptr::null_mut()) } != 0 {
            return Err(JailError::sys("sigaction"));
        }
    }
    Ok(())
}
