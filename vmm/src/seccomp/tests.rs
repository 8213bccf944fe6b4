//! The filters applied for real: each test forks a child that installs a prebuilt filter, makes raw
//! system calls and reports through its exit status, which the parent checks.
//!
//! The test process has other threads (the test harness), so a forked child may only call
//! async-signal-safe functions: everything it touches (paths, buffers, the BPF program) is made
//! before the fork, and the child only applies the filter (`prctl`, `seccomp`), makes raw
//! `syscall`s and ends with the `exit` system call, which is on every list.

use std::ffi::CString;
use std::os::fd::AsRawFd;

use super::*;

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum Status {
    Exited(i32),
    Signaled(i32),
}

const KILLED_BY_SECCOMP: Status = Status::Signaled(libc::SIGSYS);
/// The child's exit code when applying the filter failed.
const APPLY_FAILED: i32 = 100;

/// Runs `body` in a forked child under `filter`; the child exits with what `body` returns.
/// `body` must only make raw system calls on data prepared before the call.
fn in_filtered_child(filter: &SeccompFilter, body: impl FnOnce() -> i32) -> Status {
    // SAFETY: the child is a copy of this process with only the calling thread; until it ends it
    // only runs `apply` (prctl and seccomp on a program built before the fork, no allocation, no
    // lock) and `body`, which makes raw system calls on memory prepared before the fork. The
    // parent only waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match filter.apply() {
            Ok(()) => body(),
            Err(_) => APPLY_FAILED,
        };
        // SAFETY: ends the child's only thread, and so the child, without running destructors or
        // exit handlers (not async-signal-safe after a fork); `exit` is on every allow-list.
        unsafe { libc::syscall(libc::SYS_exit, code) };
        // SAFETY: unreachable (the exit above does not return); `_exit` as a last resort.
        unsafe { libc::_exit(APPLY_FAILED) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid place for the kernel to write.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        Status::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Status::Signaled(libc::WTERMSIG(status))
    } else {
        panic!("unexpected wait status {status:#x}")
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A scratch directory, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("vmm-seccomp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Scratch(path)
    }

    fn cpath(&self, name: &str) -> (std::path::PathBuf, CString) {
        let path = self.0.join(name);
        let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
        (path, c)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// System calls that some list must refuse.
#[derive(Debug, Clone, Copy)]
enum Forbidden {
    /// `socket(AF_INET, SOCK_STREAM)`.
    SocketInet,
    /// `execve("/bin/true")`.
    Execve,
    /// `mkdirat(AT_FDCWD, scratch/made)`.
    Mkdirat,
    /// `openat(AT_FDCWD, "/dev/null", O_RDONLY)`.
    Openat,
    /// `mmap(PROT_READ | PROT_EXEC)` of anonymous memory.
    MmapExec,
    /// `ioctl(pipe, TCGETS)`: not on any list.
    IoctlTcgets,
    /// `ioctl(pipe, FIONBIO)`: the main loop's, not a vCPU's.
    IoctlFionbio,
    /// `ioctl(-1, KVM_RUN)`: a vCPU's, not an I/O worker's.
    IoctlKvmRun,
    /// `tgkill(1, 1, 0)`: a signal to another process.
    TgkillOther,
}

use Forbidden::*;

fn forbidden(category: ThreadCategory) -> &'static [Forbidden] {
    match category {
        // The main loop creates snapshot files (`snapshot-create`); where it can is the jail's
        // business (mount namespace, pivot_root), not the filter's.
        ThreadCategory::MainLoop => &[SocketInet, Execve, MmapExec, IoctlTcgets, TgkillOther],
        ThreadCategory::Vcpu => &[
            SocketInet,
            Execve,
            Mkdirat,
            Openat,
            MmapExec,
            IoctlFionbio,
            IoctlTcgets,
            TgkillOther,
        ],
        ThreadCategory::IoWorker => &[
            SocketInet,
            Execve,
            Mkdirat,
            Openat,
            MmapExec,
            IoctlKvmRun,
            TgkillOther,
        ],
        // The thread that reads what another host sends: no new fds, no files (opens fail with
        // EACCES instead, see `a_migration_thread_cannot_open_files_and_lives_on`), no KVM.
        ThreadCategory::Migration => &[
            SocketInet,
            Execve,
            Mkdirat,
            MmapExec,
            IoctlKvmRun,
            IoctlFionbio,
            IoctlTcgets,
            TgkillOther,
        ],
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for fd in self.pipe {
            // SAFETY: closes the pipe this fixture made and nothing else uses.
            unsafe { libc::close(fd) };
        }
    }
}

/// Everything a forbidden call needs, made before the fork.
struct Fixture {
    _scratch: Scratch,
    made: std::path::PathBuf,
    made_c: CString,
    dev_null: CString,
    bin_true: CString,
    pipe: [libc::c_int; 2],
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new(tag);
        let (made, made_c) = scratch.cpath("made");
        let mut pipe = [0; 2];
        // SAFETY: `pipe` has room for the two fds the kernel writes.
        assert_eq!(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        Fixture {
            _scratch: scratch,
            made,
            made_c,
            dev_null: CString::new("/dev/null").expect("no NUL"),
            bin_true: CString::new("/bin/true").expect("no NUL"),
            pipe,
        }
    }

    /// Makes the call; returns 0 if it did what it does without a filter (the call proceeded).
    /// Runs in the forked child: raw system calls only.
    fn call(&self, what: Forbidden) -> i32 {
        // SAFETY: every pointer passed below points into this fixture (or a local), which lives
        // until the child ends; the calls create or change nothing outside the child but the
        // scratch directory.
        unsafe {
            match what {
                SocketInet => {
                    let fd = libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
                    i32::from(fd < 0)
                }
                Execve => {
                    let argv = [self.bin_true.as_ptr(), std::ptr::null()];
                    let envp = [std::ptr::null::<libc::c_char>()];
                    libc::syscall(
                        libc::SYS_execve,
                        self.bin_true.as_ptr(),
                        argv.as_ptr(),
                        envp.as_ptr(),
                    );
                    1
                }
                Mkdirat => {
                    let r = libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, self.made_c.as_ptr(), 0o700);
                    i32::from(r != 0)
                }
                Openat => {
                    let fd = libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        self.dev_null.as_ptr(),
                        libc::O_RDONLY,
                    );
                    i32::from(fd < 0)
                }
                MmapExec => {
                    let p = libc::syscall(
                        libc::SYS_mmap,
                        0,
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    i32::from(p == -1)
                }
                IoctlTcgets => {
                    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
                    let r = libc::syscall(libc::SYS_ioctl, self.pipe[0], libc::TCGETS, termios.as_mut_ptr());
                    // A pipe is no terminal: the call ran if the kernel said so.
                    i32::from(!(r == -1 && errno() == libc::ENOTTY))
                }
                IoctlFionbio => {
                    let on: libc::c_int = 1;
                    let r = libc::syscall(libc::SYS_ioctl, self.pipe[0], libc::FIONBIO, &on);
                    i32::from(r != 0)
                }
                IoctlKvmRun => {
                    let r = libc::syscall(libc::SYS_ioctl, -1, ioctl::KVM_RUN, 0);
                    i32::from(!(r == -1 && errno() == libc::EBADF))
                }
                TgkillOther => {
                    // Signal 0 only checks that the target exists: harmless if it is let through.
                    let r = libc::syscall(libc::SYS_tgkill, 1, 1, 0);
                    i32::from(r != 0 && errno() != libc::EPERM && errno() != libc::ESRCH)
                }
            }
        }
    }
}

#[test]
fn modes_parse_and_print() {
    for (text, mode) in [
        ("kill", SeccompMode::Kill),
        ("log", SeccompMode::Log),
        ("off", SeccompMode::Off),
    ] {
        assert_eq!(text.parse::<SeccompMode>().expect("valid mode"), mode);
        assert_eq!(mode.to_string(), text);
    }
    assert_eq!(SeccompMode::default(), SeccompMode::Kill);
    let err = "allow"
        .parse::<SeccompMode>()
        .expect_err("not a mode")
        .to_string();
    assert!(
        err.contains("'allow'") && err.contains("kill, log or off"),
        "{err}"
    );
}

#[test]
fn every_category_builds_in_every_mode_and_off_builds_nothing() {
    for category in ThreadCategory::ALL {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            let filter = SeccompFilter::build(category, mode).expect("filter builds");
            assert_eq!(filter.category(), category);
            let program = filter.program().expect("a program");
            // The verdict for a call outside the list is the mode's.
            let verdict = match mode {
                SeccompMode::Kill => libc::SECCOMP_RET_KILL_PROCESS,
                _ => libc::SECCOMP_RET_LOG,
            };
            let ret_k = 0x06; // BPF_RET | BPF_K
            assert!(
                program.iter().any(|insn| insn.code == ret_k && insn.k == verdict),
                "{category} {mode}: no RET {verdict:#x}"
            );
        }
        let off = SeccompFilter::build(category, SeccompMode::Off).expect("off builds");
        assert!(off.program().is_none());
    }
}

#[test]
fn an_io_worker_spawned_by_the_main_loop_keeps_its_whole_list() {
    // Filters stack: a worker created after the main-loop filter runs under both.
    let main = main_loop::rules().expect("main loop rules");
    let worker = io_worker::rules().expect("worker rules");
    for nr in worker.0.keys() {
        assert!(
            main.contains(*nr),
            "syscall {nr} is on the I/O worker's list only"
        );
    }
}

#[test]
fn only_the_main_loop_may_exit_the_process_and_no_vcpu_may_open_files() {
    let vcpu = vcpu::rules().expect("vcpu rules");
    for nr in [
        libc::SYS_openat,
        libc::SYS_open,
        libc::SYS_socket,
        libc::SYS_execve,
        libc::SYS_exit_group,
        libc::SYS_clone,
        libc::SYS_clone3,
    ] {
        assert!(!vcpu.contains(nr), "syscall {nr} on the vCPU list");
    }
    assert!(main_loop::rules()
        .expect("main rules")
        .contains(libc::SYS_exit_group));
}

/// In kill mode each forbidden call kills the child with SIGSYS; without the filter (mode off)
/// the very same call runs, so the kill is the filter's doing.
#[test]
fn kill_mode_kills_the_process_on_a_forbidden_call_in_every_category() {
    for category in ThreadCategory::ALL {
        let kill = SeccompFilter::build(category, SeccompMode::Kill).expect("filter builds");
        let off = SeccompFilter::build(category, SeccompMode::Off).expect("filter builds");
        for &what in forbidden(category) {
            let fixture = Fixture::new("kill");
            let status = in_filtered_child(&kill, || fixture.call(what));
            assert_eq!(status, KILLED_BY_SECCOMP, "{category}: {what:?} under kill");
            assert!(!fixture.made.exists(), "{category}: {what:?} made a directory");
            if !matches!(what, Execve) {
                let status = in_filtered_child(&off, || fixture.call(what));
                assert_eq!(status, Status::Exited(0), "{category}: {what:?} without a filter");
            }
        }
    }
}

/// glibc's allocator may try to open a /proc file from the migration thread: the open fails with
/// EACCES, in every mode but off, and the process lives on.
#[test]
fn a_migration_thread_cannot_open_files_and_lives_on() {
    for mode in [SeccompMode::Kill, SeccompMode::Log] {
        let filter = SeccompFilter::build(ThreadCategory::Migration, mode).expect("filter builds");
        let fixture = Fixture::new("refuse");
        let status = in_filtered_child(&filter, || {
            // SAFETY: a raw openat of a NUL-terminated path the fixture keeps alive.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    fixture.dev_null.as_ptr(),
                    libc::O_RDONLY,
                )
            };
            if fd < 0 && errno() == libc::EACCES {
                0
            } else {
                1
            }
        });
        assert_eq!(status, Status::Exited(0), "{mode:?}");
    }
}

/// In log mode a forbidden call is let through (and logged by the kernel).
#[test]
fn log_mode_lets_a_forbidden_call_proceed_in_every_category() {
    for category in ThreadCategory::ALL {
        let log = SeccompFilter::build(category, SeccompMode::Log).expect("filter builds");
        for &what in forbidden(category) {
            if matches!(what, Execve) {
                // It would run /bin/true under the filter: covered by kill mode.
                continue;
            }
            let fixture = Fixture::new("log");
            let status = in_filtered_child(&log, || fixture.call(what));
            assert_eq!(status, Status::Exited(0), "{category}: {what:?} under log");
            if matches!(what, Mkdirat) {
                assert!(fixture.made.is_dir(), "{category}: mkdirat did not run");
            }
        }
    }
}

/// What a category's threads do all the time still works under its kill-mode filter.
#[test]
fn allowed_calls_work_under_the_kill_filter() {
    let image = Scratch::new("allowed");
    let (path, _) = image.cpath("image");
    std::fs::write(&path, [7u8; 4096]).expect("image");
    let file = std::fs::File::open(&path).expect("open image");
    let image_fd = file.as_raw_fd();
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two fds the kernel writes.
    assert_eq!(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let mut buf = [0u8; 64];
    let buf_ptr = buf.as_mut_ptr();
    let mut futex_word = 0u32;
    let futex_ptr: *mut u32 = &mut futex_word;
    let builder_pid = std::process::id();
    // SAFETY: gettid takes no arguments and cannot fail.
    let builder_tid = unsafe { libc::syscall(libc::SYS_gettid) };

    for category in ThreadCategory::ALL {
        let filter = SeccompFilter::build(category, SeccompMode::Kill).expect("filter builds");
        let status = in_filtered_child(&filter, || {
            // SAFETY: every pointer passed points into buffers made before the fork that outlive
            // the child; the fds are the pipe's and the image's, open in the child.
            unsafe {
                let iov = libc::iovec {
                    iov_base: buf_ptr.cast(),
                    iov_len: 8,
                };
                // Everyone: write and read (eventfds, logs), an image read, memory, locks, clocks.
                if libc::syscall(libc::SYS_write, pipe[1], buf_ptr, 4) != 4 {
                    return 1;
                }
                if libc::syscall(libc::SYS_read, pipe[0], buf_ptr, 4) != 4 {
                    return 2;
                }
                // A migration thread reads files only with pread (disk images it copies).
                if category != ThreadCategory::Migration
                    && (libc::syscall(libc::SYS_preadv, image_fd, &iov, 1, 0) != 8 || *buf_ptr != 7)
                {
                    return 3;
                }
                let p = libc::syscall(
                    libc::SYS_mmap,
                    0,
                    1 << 20,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == -1 || libc::syscall(libc::SYS_munmap, p, 1 << 20) != 0 {
                    return 4;
                }
                if libc::syscall(libc::SYS_futex, futex_ptr, libc::FUTEX_WAKE, 1) != 0 {
                    return 5;
                }
                let mut ts = std::mem::MaybeUninit::<libc::timespec>::uninit();
                if libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, ts.as_mut_ptr()) != 0 {
                    return 6;
                }
                match category {
                    ThreadCategory::Vcpu => {
                        // KVM_RUN passes the filter and reaches the kernel, which refuses the fd.
                        if libc::syscall(libc::SYS_ioctl, -1, ioctl::KVM_RUN, 0) != -1
                            || errno() != libc::EBADF
                        {
                            return 10;
                        }
                        let zero = libc::timespec {
                            tv_sec: 0,
                            tv_nsec: 0,
                        };
                        let disarm = libc::itimerspec {
                            it_interval: zero,
                            it_value: zero,
                        };
                        let null = std::ptr::null::<libc::itimerspec>();
                        if libc::syscall(libc::SYS_timerfd_settime, -1, 0, &disarm, null) != -1
                            || errno() != libc::EBADF
                        {
                            return 11;
                        }
                    }
                    ThreadCategory::MainLoop => {
                        let evt = libc::syscall(libc::SYS_eventfd2, 0, libc::EFD_NONBLOCK);
                        if evt < 0 || libc::syscall(libc::SYS_close, evt) != 0 {
                            return 20;
                        }
                        let ep = libc::syscall(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC);
                        if ep < 0 {
                            return 21;
                        }
                        let mut events = std::mem::MaybeUninit::<[libc::epoll_event; 4]>::uninit();
                        if libc::syscall(libc::SYS_epoll_wait, ep, events.as_mut_ptr(), 4, 0) != 0 {
                            return 22;
                        }
                        let timer = libc::syscall(libc::SYS_timerfd_create, libc::CLOCK_MONOTONIC, 0);
                        if timer < 0 {
                            return 23;
                        }
                        if libc::syscall(libc::SYS_pread64, image_fd, buf_ptr, 8, 8) != 8 {
                            return 24;
                        }
                        let on: libc::c_int = 1;
                        if libc::syscall(libc::SYS_ioctl, pipe[0], libc::FIONBIO, &on) != 0 {
                            return 25;
                        }
                        if libc::syscall(libc::SYS_fcntl, pipe[0], libc::F_GETFL) < 0 {
                            return 26;
                        }
                        // Signal 0 to a thread of the process that built the filter (the parent:
                        // the list names the builder's pid): what a vCPU kick looks like to it.
                        if libc::syscall(libc::SYS_tgkill, builder_pid, builder_tid, 0) != 0 {
                            return 27;
                        }
                        if libc::syscall(libc::SYS_accept4, -1, 0, 0, libc::SOCK_CLOEXEC) != -1
                            || errno() != libc::EBADF
                        {
                            return 28;
                        }
                        let ts = libc::timespec {
                            tv_sec: 0,
                            tv_nsec: 1000,
                        };
                        if libc::syscall(libc::SYS_clock_nanosleep, libc::CLOCK_MONOTONIC, 0, &ts, 0) != 0 {
                            return 29;
                        }
                    }
                    ThreadCategory::Migration => {
                        if libc::syscall(libc::SYS_pread64, image_fd, buf_ptr, 8, 0) != 8 || *buf_ptr != 7 {
                            return 39;
                        }
                        // Socket calls pass the filter and reach the kernel, which refuses a pipe.
                        let null = std::ptr::null::<libc::sockaddr>();
                        if libc::syscall(libc::SYS_sendto, pipe[1], buf_ptr, 4, 0, null, 0) != -1
                            || errno() != libc::ENOTSOCK
                        {
                            return 40;
                        }
                        let tv = libc::timeval {
                            tv_sec: 1,
                            tv_usec: 0,
                        };
                        let size = std::mem::size_of::<libc::timeval>();
                        let set = libc::syscall(
                            libc::SYS_setsockopt,
                            pipe[0],
                            libc::SOL_SOCKET,
                            libc::SO_RCVTIMEO,
                            &tv,
                            size,
                        );
                        if set != -1 || errno() != libc::ENOTSOCK {
                            return 41;
                        }
                        let ts = libc::timespec {
                            tv_sec: 0,
                            tv_nsec: 1000,
                        };
                        if libc::syscall(libc::SYS_clock_nanosleep, libc::CLOCK_MONOTONIC, 0, &ts, 0) != 0 {
                            return 42;
                        }
                    }
                    ThreadCategory::IoWorker => {
                        if libc::syscall(libc::SYS_writev, pipe[1], &iov, 1) != 8 {
                            return 30;
                        }
                        if libc::syscall(libc::SYS_readv, pipe[0], &iov, 1) != 8 {
                            return 31;
                        }
                        if libc::syscall(libc::SYS_fdatasync, image_fd) != 0 {
                            return 32;
                        }
                        let mut events = std::mem::MaybeUninit::<[libc::epoll_event; 4]>::uninit();
                        if libc::syscall(libc::SYS_epoll_wait, -1, events.as_mut_ptr(), 4, 0) != -1
                            || errno() != libc::EBADF
                        {
                            return 33;
                        }
                    }
                }
            }
            0
        });
        assert_eq!(
            status,
            Status::Exited(0),
            "{category}: an allowed call failed (see the code)"
        );
    }
}

/// Set in the environment of the fresh test process that runs [`filtered_thread_child`].
const THREAD_CHILD_ENV: &str = "VMM_SECCOMP_THREAD_CHILD";

/// A whole Rust thread's life after its filter — allocating small and large, locking, logging,
/// handing a result over, ending, being joined — works under each category's kill filter. Runs
/// in a fresh copy of the test binary (threads cannot be spawned safely in a forked child), so a
/// missing call kills that copy, not the test run.
#[test]
fn a_rust_thread_lives_and_ends_under_each_filter() {
    let exe = std::env::current_exe().expect("test binary");
    for category in ["main", "vcpu", "io", "migration"] {
        let out = std::process::Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "seccomp::tests::filtered_thread_child",
                "--nocapture",
            ])
            .env(THREAD_CHILD_ENV, category)
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{category}: {:?} (signal 31 = SIGSYS)\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
#[ignore = "run by a_rust_thread_lives_and_ends_under_each_filter, in its own process"]
fn filtered_thread_child() {
    use std::io::Write;

    let category = match std::env::var(THREAD_CHILD_ENV).as_deref() {
        Ok("main") => ThreadCategory::MainLoop,
        Ok("vcpu") => ThreadCategory::Vcpu,
        Ok("io") => ThreadCategory::IoWorker,
        Ok("migration") => ThreadCategory::Migration,
        _ => return,
    };
    let filter = SeccompFilter::build(category, SeccompMode::Kill).expect("filter builds");
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("filtered".into())
        .spawn(move || {
            filter.apply().expect("filter installs");
            let big = vec![1u8; 16 << 20];
            let small: Vec<String> = (0..10_000).map(|i| format!("line {i}")).collect();
            let mut grown = Vec::new();
            for chunk in 0..64 {
                grown.extend_from_slice(&[chunk as u8; 64 << 10]);
            }
            let lock = std::sync::Mutex::new(0usize);
            *lock.lock().expect("lock") += big.len() + small.len() + grown.len();
            let started = std::time::Instant::now();
            let _ = writeln!(
                std::io::stderr(),
                "filtered {category} thread: {:?}",
                started.elapsed()
            );
            let total = *lock.lock().expect("lock");
            tx.send(total).expect("send");
        })
        .expect("spawn");
    let total = rx.recv().expect("the filtered thread's result");
    thread.join().expect("the filtered thread ends");
    assert_eq!(total, (16 << 20) + 10_000 + 64 * (64 << 10));
}
