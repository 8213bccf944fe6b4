//! A VMM process under test: spawned with its output captured, killed when dropped.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::boot_gate::BootPermit;
use crate::images::workspace_root;
use crate::output::{format_tail, Line, LineHook, OutputLog, Stream, WaitFailure};

/// How many lines of output an error message shows.
const TAIL_LINES: usize = 40;

/// Panics unless `/dev/kvm` can be opened read-write. End-to-end tests call this first so that they
/// FAIL (not skip) on a host without KVM.
pub fn require_kvm() {
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!(
            "/dev/kvm cannot be opened read-write ({e}): these tests need KVM; \
             run them on a host with /dev/kvm and access to it"
        );
    }
}

/// The `vmm` binary under test: `$VMM_BIN` if set, else `<workspace>/target/release/vmm` if it exists,
/// else `<workspace>/target/debug/vmm`. Errors if that file does not exist.
pub fn try_vmm_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("VMM_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            let release = workspace_root().join("target/release/vmm");
            if release.exists() {
                release
            } else {
                workspace_root().join("target/debug/vmm")
            }
        }
    };
    if !path.exists() {
        bail!(
            "vmm binary not found at {}: run `cargo build --release -p vmm` (or set VMM_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// Like [`try_vmm_binary`], but panics with its message when the binary is missing.
pub fn vmm_binary() -> PathBuf {
    try_vmm_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// Lets the child of `cmd` inherit `fd` under the same number, for `vmm --fd NAME=N`, and returns
/// the number. Only that child gets it: the descriptor stays close-on-exec in this process (std
/// opens everything so), so children other tests spawn meanwhile do not inherit it. Keep `fd` open
/// until the command has been spawned.
pub fn inherit_fd(cmd: &mut Command, fd: &impl AsFd) -> RawFd {
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe, on a descriptor number the fork copied from this process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    raw
}

/// Builds the command line of a `vmm` run and spawns it as a [`Guest`].
///
/// Runs `vmm --kernel K [--initrd I] --cmdline C --vcpus N --memory-mib M --serial stdout [ARGS...]`.
/// Defaults: cmdline `console=ttyS0`, 1 vCPU, 128 MiB.
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    binary: Option<PathBuf>,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    vcpus: u32,
    memory_mib: u32,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    hook: Option<LineHookDebug>,
}

/// A [`LineHook`] that can sit in a `#[derive(Debug)]` struct.
#[derive(Clone)]
struct LineHookDebug(LineHook);

impl std::fmt::Debug for LineHookDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineHook")
    }
}

impl GuestBuilder {
    /// A guest that boots `kernel` (an ELF vmlinux or a bzImage).
    pub fn new(kernel: &Path) -> Self {
        GuestBuilder {
            binary: None,
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: "console=ttyS0".to_string(),
            vcpus: 1,
            memory_mib: 128,
            args: Vec::new(),
            envs: Vec::new(),
            hook: None,
        }
    }

    /// Passes `--initrd path`.
    pub fn initrd(mut self, path: &Path) -> Self {
        self.initrd = Some(path.to_path_buf());
        self
    }

    /// The guest kernel command line (see [`crate::probe_cmdline`]).
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_string();
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// Guest memory size in MiB.
    pub fn memory_mib(mut self, n: u32) -> Self {
        self.memory_mib = n;
        self
    }

    /// Appends one raw argument after the generated ones.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Sets an environment variable of the VMM process (e.g. `VMM_LOG`).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Runs this binary instead of [`vmm_binary`].
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    /// Calls `hook` on every output line as soon as it is read (see [`LineHook`]).
    pub fn on_line(mut self, hook: LineHook) -> Self {
        self.hook = Some(LineHookDebug(hook));
        self
    }

    /// The command this builder runs.
    pub fn command(&self) -> Result<Command> {
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => try_vmm_binary()?,
        };
        let mut cmd = Command::new(binary);
        cmd.arg("--kernel").arg(&self.kernel);
        if let Some(initrd) = &self.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        cmd.arg("--cmdline").arg(&self.cmdline);
        cmd.arg("--vcpus").arg(self.vcpus.to_string());
        cmd.arg("--memory-mib").arg(self.memory_mib.to_string());
        cmd.args(["--serial", "stdout"]);
        cmd.args(&self.args);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        Ok(cmd)
    }

    /// Spawns the `vmm` process once its vCPUs fit among the guests booting in this process (see
    /// [`Guest::spawn_booting`]).
    pub fn spawn(self) -> Result<Guest> {
        let cmd = self.command()?;
        Guest::spawn_booting(cmd, self.vcpus, self.hook.map(|h| h.0))
    }
}

/// A guest's boot slot, shared by its output hook (which frees it at `BOOT-COMPLETE`) and the
/// [`Guest`] (which frees it when the process ends).
type SharedPermit = Arc<Mutex<Option<BootPermit>>>;

fn release(permit: &SharedPermit) {
    let taken = permit
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    drop(taken);
}

/// A spawned VMM process whose stdout and stderr are read line by line, each line timestamped on
/// arrival. Dropping it kills the process, so a failing test leaks no VM.
pub struct Guest {
    child: Child,
    program: String,
    started_at: Instant,
    log: Arc<OutputLog>,
    exit: Option<(ExitStatus, Instant)>,
    boot_permit: Option<SharedPermit>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("program", &self.program)
            .field("pid", &self.child.id())
            .field("exit", &self.exit.map(|(status, _)| status))
            .finish()
    }
}

impl Guest {
    /// Spawns `cmd`, a VMM that boots a guest of `vcpus` vCPUs (now, or once it is configured over
    /// its socket), when those vCPUs fit among the guests booting in this process (see
    /// `boot_gate.rs`: overcommitted boots under kvm_pvm stall). Its slot frees when the guest
    /// prints `BOOT-COMPLETE`, or the process exits or is dropped.
    pub fn spawn_booting(cmd: Command, vcpus: u32, hook: Option<LineHook>) -> Result<Guest> {
        let permit = Arc::new(Mutex::new(Some(BootPermit::acquire(vcpus)?)));
        let booted = Arc::clone(&permit);
        let gated: LineHook = Arc::new(move |pid, line| {
            if line.text.contains("BOOT-COMPLETE") {
                release(&booted);
            }
            if let Some(hook) = &hook {
                hook(pid, line);
            }
        });
        let mut guest = Guest::spawn_command(cmd, Some(gated))?;
        guest.boot_permit = Some(permit);
        Ok(guest)
    }

    /// Spawns any command (e.g. QEMU) the same way [`GuestBuilder::spawn`] spawns `vmm`: stdin from
    /// /dev/null, stdout and stderr piped into the timestamped log, `hook` called on every line.
    /// [`Guest::started_at`] is taken right before the spawn.
    pub fn spawn_command(mut cmd: Command, hook: Option<LineHook>) -> Result<Guest> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started_at = Instant::now();
        let child = cmd.spawn().with_context(|| format!("cannot spawn {program}"))?;
        let pid = child.id();
        let log = OutputLog::new();
        let mut guest = Guest {
            child,
            program,
            started_at,
            log,
            exit: None,
            boot_permit: None,
        };
        let stdout = guest
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("stdout not piped"))?;
        let stderr = guest
            .child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("stderr not piped"))?;
        // On error, dropping `guest` kills the child.
        guest
            .log
            .spawn_reader(stdout, Stream::Stdout, pid, hook.clone())
            .context("reader thread")?;
        guest
            .log
            .spawn_reader(stderr, Stream::Stderr, pid, hook)
            .context("reader thread")?;
        Ok(guest)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The instant taken right before the process was spawned.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Waits for a line containing `pattern` on stdout or stderr (lines already printed count) and
    /// returns the first such line. Errors, with the last 40 lines of output, on timeout or when the
    /// process closes its output without printing it.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> Result<Line> {
        self.log
            .wait_for(|line| line.text.contains(pattern), timeout)
            .map_err(|failure| {
                let why = match failure {
                    WaitFailure::Timeout => format!("no line containing {pattern:?} within {timeout:?}"),
                    WaitFailure::Ended => {
                        format!("{} closed its output without printing {pattern:?}", self.program)
                    }
                };
                anyhow!("{why}; last output:\n{}", self.output_tail())
            })
    }

    /// Waits for the first line (lines already printed count) that contains any of `patterns`, e.g.
    /// a success marker and the markers of known failures (`"Kernel panic"`); check which one with
    /// `line.text.contains(..)`. Errors like [`Guest::wait_for_line`].
    pub fn wait_for_any_line(&self, patterns: &[&str], timeout: Duration) -> Result<Line> {
        self.log
            .wait_for(|line| patterns.iter().any(|p| line.text.contains(p)), timeout)
            .map_err(|failure| {
                let why = match failure {
                    WaitFailure::Timeout => {
                        format!("no line containing any of {patterns:?} within {timeout:?}")
                    }
                    WaitFailure::Ended => {
                        format!(
                            "{} closed its output without printing any of {patterns:?}",
                            self.program
                        )
                    }
                };
                anyhow!("{why}; last output:\n{}", self.output_tail())
            })
    }

    /// The first line so far that contains any of `patterns`, without waiting.
    pub fn find_line(&self, patterns: &[&str]) -> Option<Line> {
        self.log
            .wait_for(
                |line| patterns.iter().any(|p| line.text.contains(p)),
                Duration::ZERO,
            )
            .ok()
    }

    /// Every line so far, stdout and stderr interleaved in arrival order.
    pub fn lines(&self) -> Vec<Line> {
        self.log.lines()
    }

    /// All stdout lines so far (the guest console), joined with `\n`.
    pub fn stdout_text(&self) -> String {
        self.stream_text(Stream::Stdout)
    }

    /// All stderr lines so far (the VMM's logs), joined with `\n`.
    pub fn stderr_text(&self) -> String {
        self.stream_text(Stream::Stderr)
    }

    fn stream_text(&self, stream: Stream) -> String {
        let lines = self.log.lines();
        let texts: Vec<&str> = lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.as_str())
            .collect();
        texts.join("\n")
    }

    /// The last 40 lines of output, formatted for an error message.
    pub fn output_tail(&self) -> String {
        format_tail(&self.log.lines(), TAIL_LINES, self.started_at)
    }

    /// Waits for the process to exit. On timeout it kills the process and errors.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.kill();
                bail!(
                    "{} did not exit within {timeout:?} (killed); last output:\n{}",
                    self.program,
                    self.output_tail()
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.poll_exit()
    }

    /// When the process was first seen exited (by [`Guest::wait_exit`], [`Guest::try_exit_status`] or
    /// [`Guest::kill`]); `None` while it runs. `wait_exit` polls every 2 ms.
    pub fn exited_at(&self) -> Option<Instant> {
        self.exit.map(|(_, at)| at)
    }

    fn poll_exit(&mut self) -> Result<Option<ExitStatus>> {
        if let Some((status, _)) = self.exit {
            return Ok(Some(status));
        }
        let status = self.child.try_wait().context("waitpid")?;
        if let Some(status) = status {
            self.exited(status);
        }
        Ok(status)
    }

    /// Kills the process (SIGKILL) and reaps it. Does nothing if it has already exited.
    pub fn kill(&mut self) -> Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        // Fails only if the process was already reaped, which `exit` rules out; ignore a race with
        // its own exit.
        let _ = self.child.kill();
        let status = self.child.wait().context("waitpid")?;
        self.exited(status);
        Ok(())
    }

    fn exited(&mut self, status: ExitStatus) {
        self.exit = Some((status, Instant::now()));
        if let Some(permit) = &self.boot_permit {
            release(permit);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.kill();
        if let Some(permit) = &self.boot_permit {
            release(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[test]
    fn waits_for_lines_on_both_streams_and_exit() {
        let mut guest = Guest::spawn_command(
            sh("echo hello; echo 'log: x' >&2; sleep 0.1; echo BOOT-COMPLETE"),
            None,
        )
        .unwrap();
        let line = guest
            .wait_for_line("BOOT-COMPLETE", Duration::from_secs(10))
            .unwrap();
        assert_eq!(line.stream, Stream::Stdout);
        assert!(line.at >= guest.started_at());
        let line = guest.wait_for_line("log:", Duration::from_secs(10)).unwrap();
        assert_eq!(line.stream, Stream::Stderr);
        let line = guest
            .wait_for_any_line(&["nothing", "hello"], Duration::from_secs(10))
            .unwrap();
        assert_eq!(line.text, "hello");
        let err = guest
            .wait_for_any_line(&["x1", "x2"], Duration::from_millis(1))
            .unwrap_err();
        assert!(err.to_string().contains(r#"["x1", "x2"]"#), "{err}");
        assert_eq!(guest.find_line(&["zzz", "BOOT"]).unwrap().text, "BOOT-COMPLETE");
        assert_eq!(guest.find_line(&["x1"]), None);
        let status = guest.wait_exit(Duration::from_secs(10)).unwrap();
        assert!(status.success());
        assert!(guest.exited_at().is_some());
        assert_eq!(guest.stdout_text(), "hello\nBOOT-COMPLETE");
        assert_eq!(guest.stderr_text(), "log: x");
    }

    #[test]
    fn timeout_error_shows_output_tail() {
        let guest = Guest::spawn_command(sh("echo first; sleep 30"), None).unwrap();
        let err = guest
            .wait_for_line("never", Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("within") && err.contains("stdout| first"), "{err}");
    }

    #[test]
    fn ended_output_fails_fast() {
        let guest = Guest::spawn_command(sh("echo bye"), None).unwrap();
        let started = Instant::now();
        let err = guest
            .wait_for_line("never", Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(err.contains("closed its output"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn wait_exit_kills_on_timeout_and_drop_kills() {
        let mut guest = Guest::spawn_command(sh("sleep 30"), None).unwrap();
        assert!(guest.wait_exit(Duration::from_millis(100)).is_err());
        assert!(guest.exited_at().is_some());

        let guest = Guest::spawn_command(sh("sleep 30"), None).unwrap();
        let proc_dir = PathBuf::from(format!("/proc/{}", guest.pid()));
        assert!(proc_dir.exists());
        drop(guest);
        assert!(!proc_dir.exists());
    }

    #[test]
    fn builder_makes_vmm_command_line() {
        let cmd = GuestBuilder::new(Path::new("/k/vmlinux"))
            .binary(Path::new("/bin/vmm"))
            .initrd(Path::new("/k/initrd"))
            .cmdline("console=ttyS0 quiet")
            .vcpus(2)
            .memory_mib(256)
            .arg("--extra")
            .command()
            .unwrap();
        assert_eq!(cmd.get_program(), "/bin/vmm");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--kernel",
                "/k/vmlinux",
                "--initrd",
                "/k/initrd",
                "--cmdline",
                "console=ttyS0 quiet",
                "--vcpus",
                "2",
                "--memory-mib",
                "256",
                "--serial",
                "stdout",
                "--extra"
            ]
        );
    }
}
