//! The control socket (`--api-sock PATH`): newline-delimited JSON requests from local clients,
//! served on the main event loop (protocol in `vmm_api::control`).
//!
//! Clients are untrusted input: lines are bounded, every malformed line gets an error answer, a
//! client that stops reading is dropped once its unsent answers pass a bound, and a client that goes
//! away mid-request only loses its own answers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind as IoErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_api::control::{
    DriveMetrics, ErrorKind, Event, EventLine, Outcome, Request, RequestLine, Response, ResponseLine,
    VmDescription, VmMetrics, VmState, MAX_LINE_BYTES,
};
use vmm_api::VmConfig;
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::BlockHandle;
use crate::exit::ExitEvents;
use crate::vstate::vcpu::ExitCounters;

/// Unsent answers a client may accumulate before it is dropped.
const MAX_PENDING_OUTPUT: usize = 1 << 20;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The path is taken (another VMM, or a stale socket someone must remove on purpose).
    #[error("control socket {0} already exists")]
    Exists(PathBuf),
    /// Binding failed.
    #[error("cannot listen on control socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the control socket can see and touch of the VM.
pub struct VmHandles {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// When the VMM process started.
    pub process_start: Instant,
    /// The drives, in guest order.
    pub blocks: Vec<BlockHandle>,
    /// To stop the VM.
    pub exits: Arc<ExitEvents>,
    /// Set by the boot timer when the guest signals boot completion.
    pub guest_boot: Arc<OnceLock<Duration>>,
    /// vCPU exits by reason.
    pub exit_counters: Arc<ExitCounters>,
    /// Raised (by the boot timer) when the guest has booted.
    pub boot_event: EventFd,
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Stop reading: the client sent an over-long line and is dropped once its answers are out.
    closing: bool,
}

/// The listening socket and its clients, as one event-loop subscriber.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: HashMap<RawFd, Client>,
    vm: VmHandles,
    /// `/proc/self/statm`, opened here because the main loop's seccomp filter allows no `openat`.
    statm: Option<File>,
}

impl ControlServer {
    /// Listens on `path` (which must not exist).
    pub fn bind(path: &Path, vm: VmHandles) -> Result<Self, ControlError> {
        if path.symlink_metadata().is_ok() {
            return Err(ControlError::Exists(path.to_path_buf()));
        }
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            clients: HashMap::new(),
            vm,
            statm: File::open("/proc/self/statm").ok(),
        })
    }

    /// Sends `event` to every client now, without waiting for slow ones.
    fn broadcast(&mut self, event: Event, ops: &mut EventOps) {
        let Some(line) = event_line(event) else {
            return;
        };
        let fds: Vec<RawFd> = self.clients.keys().copied().collect();
        for fd in fds {
            if let Some(client) = self.clients.get_mut(&fd) {
                client.output.extend_from_slice(&line);
            }
            self.serve(fd, EventSet::OUT, ops);
        }
    }

    /// Tells every client how the VM ended (best effort: the VMM exits right after).
    pub fn announce_exit(&mut self, reason: String, code: i32) {
        let Some(line) = event_line(Event::Exit { reason, code }) else {
            return;
        };
        for client in self.clients.values_mut() {
            client.output.extend_from_slice(&line);
            flush(client);
        }
    }

    /// Removes the socket file (the VMM calls this on its way out).
    pub fn remove_socket(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove control socket {}: {e}", self.path.display());
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("control client: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::with_data_raw(fd, fd as u32, EventSet::IN)) {
                        log::warn!("control client: cannot watch it: {e:?}");
                        continue;
                    }
                    let client = Client {
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        closing: false,
                    };
                    self.clients.insert(fd, client);
                }
                Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    /// Serves one client's readiness, dropping it when it is gone, done, or too far behind.
    fn serve(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        let Some(mut client) = self.clients.remove(&fd) else {
            return;
        };
        let mut alive = !set.contains(EventSet::ERROR);
        if alive && set.contains(EventSet::IN) && !client.closing {
            alive = self.read_requests(&mut client);
        }
        if alive {
            alive = flush(&mut client) && client.output.len() <= MAX_PENDING_OUTPUT;
        }
        if alive && client.closing && client.output.is_empty() {
            alive = false;
        }
        if !alive {
            let _ = ops.remove(Events::with_data_raw(fd, fd as u32, EventSet::empty()));
            return;
        }
        let wanted = if client.output.is_empty() {
            EventSet::IN
        } else {
            EventSet::IN | EventSet::OUT
        };
        let _ = ops.modify(Events::with_data_raw(fd, fd as u32, wanted));
        self.clients.insert(fd, client);
    }

    /// Reads what the client sent and answers every complete line. False when the client is gone.
    fn read_requests(&mut self, client: &mut Client) -> bool {
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => client.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
                Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if client.input.len() > MAX_LINE_BYTES {
                break;
            }
        }
        while let Some(end) = client.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = client.input.drain(..=end).collect();
            let answer = self.answer(&line[..end]);
            push_answer(client, &answer);
        }
        if client.input.len() > MAX_LINE_BYTES {
            let answer = ResponseLine::error(
                0,
                ErrorKind::BadRequest,
                format!("request line longer than {MAX_LINE_BYTES} bytes"),
            );
            push_answer(client, &answer);
            client.input.clear();
            client.closing = true;
        }
        // A client that closed its side is served what it sent, then dropped.
        if eof {
            client.closing = true;
        }
        true
    }

    fn answer(&mut self, line: &[u8]) -> ResponseLine {
        let request: RequestLine = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => return ResponseLine::error(0, ErrorKind::BadRequest, e.to_string()),
        };
        let id = request.id;
        match self.handle(request.request) {
            Ok(response) => ResponseLine {
                id,
                result: Outcome::Ok(response),
            },
            Err((kind, message)) => ResponseLine::error(id, kind, message),
        }
    }

    fn handle(&mut self, request: Request) -> Result<Response, (ErrorKind, String)> {
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::Describe => Ok(Response::Description(VmDescription {
                config: self.vm.config.clone(),
                state: VmState::Running,
                uptime_ms: millis(self.vm.process_start.elapsed()),
                vcpus: self.vm.config.machine.vcpus,
                memory_mib: self.vm.config.machine.memory_mib,
                vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            })),
            Request::Metrics => Ok(Response::Metrics(self.metrics())),
            Request::Stop => {
                ExitEvents::raise(&self.vm.exits.stop);
                Ok(Response::Stopping)
            }
            Request::UpdateRateLimiter { drive, rate_limiter } => {
                let block = self
                    .vm
                    .blocks
                    .iter()
                    .find(|b| lock(b).device().id() == drive)
                    .ok_or_else(|| (ErrorKind::NotFound, format!("no drive {drive:?}")))?;
                lock(block)
                    .device_mut()
                    .update_rate_limiter(&rate_limiter)
                    .map_err(|e| (ErrorKind::InvalidArgument, error_chain(&e)))?;
                Ok(Response::RateLimiterUpdated)
            }
        }
    }

    fn metrics(&self) -> VmMetrics {
        let drives = self
            .vm
            .blocks
            .iter()
            .map(|b| {
                let transport = lock(b);
                let m = transport.device().metrics().snapshot();
                DriveMetrics {
                    id: transport.device().id().to_string(),
                    reads: m.reads,
                    writes: m.writes,
                    flushes: m.flushes,
                    discards: m.discards,
                    read_bytes: m.read_bytes,
                    write_bytes: m.write_bytes,
                    invalid_requests: m.invalid_requests,
                    io_errors: m.io_errors,
                    throttled: m.throttled,
                    interrupts: m.interrupts,
                }
            })
            .collect();
        VmMetrics {
            guest_boot_ms: self.vm.guest_boot.get().map(|d| millis(*d)),
            vmm_rss_kib: rss_kib(self.statm.as_ref()).unwrap_or(0),
            vcpu_exits: self
                .vm
                .exit_counters
                .snapshot()
                .into_iter()
                .map(|(reason, count)| (reason.to_string(), count))
                .collect(),
            drives,
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.listener.as_raw_fd(), self.vm.boot_event.as_raw_fd()] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, fd as u32, EventSet::IN)) {
                log::error!("cannot watch the control socket: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.vm.boot_event.as_raw_fd() {
            // Reading fails only if nothing is pending: a spurious wake-up.
            let _ = self.vm.boot_event.read();
            if let Some(boot) = self.vm.guest_boot.get() {
                let event = Event::GuestBootComplete {
                    boot_ms: millis(*boot),
                };
                self.broadcast(event, ops);
            }
        } else {
            self.serve(fd, events.event_set(), ops);
        }
    }
}

fn event_line(event: Event) -> Option<Vec<u8>> {
    match serde_json::to_vec(&EventLine { event }) {
        Ok(mut line) => {
            line.push(b'\n');
            Some(line)
        }
        Err(e) => {
            log::error!("control: cannot encode an event: {e}");
            None
        }
    }
}

fn push_answer(client: &mut Client, answer: &ResponseLine) {
    match serde_json::to_vec(answer) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            client.output.extend_from_slice(&bytes);
        }
        Err(e) => log::error!("control: cannot encode an answer: {e}"),
    }
}

/// Writes what the socket takes now. False when the client is gone.
fn flush(client: &mut Client) -> bool {
    while !client.output.is_empty() {
        match client.stream.write(&client.output) {
            Ok(0) => return false,
            Ok(n) => {
                client.output.drain(..n);
            }
            Err(e) if e.kind() == IoErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

fn lock(
    block: &BlockHandle,
) -> std::sync::MutexGuard<'_, devices::virtio::mmio::MmioTransport<devices::virtio::block::Block>> {
    block.lock().unwrap_or_else(|p| p.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Resident set size of this process from `/proc/self/statm` (opened once, re-read from the start).
fn rss_kib(statm: Option<&File>) -> Option<u64> {
    let mut buf = [0u8; 256];
    let n = statm?.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(buf.get(..n)?).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}
