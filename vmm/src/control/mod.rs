//! The control socket (`--api-sock PATH`): newline-delimited JSON requests from local clients,
//! served on the main event loop (protocol in `vmm_api::control`, requests carried out by
//! [`Runtime`]).
//!
//! Clients are untrusted input: lines are bounded, every malformed line gets an error answer, a
//! client that stops reading is dropped once its unsent output passes a bound, descriptors sent
//! with a line that does not take them are closed, and a client that goes away mid-request only
//! loses its own answers. Clients are watched edge-triggered for input and output, so answers and
//! events written outside of their own readiness still get flushed when the socket drains.

mod client;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_api::control::{
    ErrorKind, Event, EventLine, Outcome, RequestLine, Response, ResponseLine, MAX_LINE_BYTES,
};

use crate::builder::ProcessEvents;
use crate::runtime::{Failure, Notice, Reply, Runtime};
use crate::sync::lock;
use client::{Client, ReadOutcome};

/// Identifies a connected client (its socket descriptor).
pub type ClientId = RawFd;

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

/// The listening socket and its clients, as one event-loop subscriber.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: HashMap<ClientId, Client>,
    runtime: Arc<Mutex<Runtime>>,
    events: Arc<ProcessEvents>,
}

impl ControlServer {
    /// Listens on `path` (which must not exist).
    pub fn bind(
        path: &Path,
        runtime: Arc<Mutex<Runtime>>,
        events: Arc<ProcessEvents>,
    ) -> Result<Self, ControlError> {
        if path.symlink_metadata().is_ok() {
            return Err(ControlError::Exists(path.to_path_buf()));
        }
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        // Owner only: whoever can connect controls the VM. The path appears once it accepts.
        let listener = vmm_api::socket::bind_published(path, Some(0o600)).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            clients: HashMap::new(),
            runtime,
            events,
        })
    }

    /// Sends `event` to every client now, without waiting for slow ones.
    pub fn broadcast_now(&mut self, event: Event) {
        let Some(line) = encode(&EventLine { event }) else {
            return;
        };
        for client in self.clients.values_mut() {
            client.send(&line);
        }
    }

    /// Answers request `id` of `client` (a deferred `start`), if the client is still there.
    pub fn answer(&mut self, client: ClientId, id: u64, result: Result<Response, Failure>) {
        let line = response_line(id, result);
        if let (Some(c), Some(bytes)) = (self.clients.get_mut(&client), encode(&line)) {
            c.send(&bytes);
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
                    let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
                    if let Err(e) = ops.add(Events::with_data_raw(fd, fd as u32, set)) {
                        log::warn!("control client: cannot watch it: {e:?}");
                        continue;
                    }
                    self.clients.insert(fd, Client::new(stream));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    /// Serves one client's readiness.
    fn serve(&mut self, fd: ClientId, set: EventSet) {
        let Some(mut client) = self.clients.remove(&fd) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            client.dead = true;
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) && !client.closing {
            match client.read_available() {
                ReadOutcome::Drained => {}
                ReadOutcome::Eof => client.closing = true,
                ReadOutcome::Failed => client.dead = true,
            }
            self.answer_lines(fd, &mut client);
        }
        client.flush();
        self.clients.insert(fd, client);
    }

    /// Answers every complete line the client sent.
    fn answer_lines(&mut self, fd: ClientId, client: &mut Client) {
        while let Some((line, fds)) = client.next_line() {
            let reply = match serde_json::from_slice::<RequestLine>(&line) {
                Ok(request) => {
                    let id = request.id;
                    match lock(&self.runtime).handle(request.request, fds, fd, id) {
                        Reply::Now(result, event) => Some((response_line(id, result), event)),
                        Reply::Later => None,
                    }
                }
                Err(e) => Some((ResponseLine::error(0, ErrorKind::BadRequest, e.to_string()), None)),
            };
            if let Some((answer, event)) = reply {
                if let Some(bytes) = encode(&answer) {
                    client.send(&bytes);
                }
                if let Some(event) = event {
                    // The asking client hears it too, after its answer.
                    if let Some(bytes) = encode(&EventLine { event: event.clone() }) {
                        client.send(&bytes);
                    }
                    self.broadcast_now(event);
                }
            }
        }
        if client.line_too_long() {
            let answer = ResponseLine::error(
                0,
                ErrorKind::BadRequest,
                format!("request line longer than {MAX_LINE_BYTES} bytes"),
            );
            if let Some(bytes) = encode(&answer) {
                client.send(&bytes);
            }
            client.discard_input();
            client.closing = true;
        }
    }

    /// Drops clients that are gone, or done and fully answered.
    fn sweep(&mut self, ops: &mut EventOps) {
        let done: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.dead || (c.closing && c.flushed()))
            .map(|(&fd, _)| fd)
            .collect();
        for fd in done {
            let _ = ops.remove(Events::with_data_raw(fd, fd as u32, EventSet::empty()));
            self.clients.remove(&fd);
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.listener.as_raw_fd(),
            self.events.boot_event.as_raw_fd(),
            self.events.migration_event.as_raw_fd(),
            lock(&self.events.throttle_timer).as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, fd as u32, EventSet::IN)) {
                log::error!("cannot watch the control socket: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.events.boot_event.as_raw_fd() {
            // Reading fails only if nothing is pending: a spurious wake-up.
            let _ = self.events.boot_event.read();
            if let Some(boot) = self.events.guest_boot.get() {
                let boot_ms = u64::try_from(boot.as_millis()).unwrap_or(u64::MAX);
                self.broadcast_now(Event::GuestBootComplete { boot_ms });
            }
        } else if fd == self.events.migration_event.as_raw_fd() {
            let _ = self.events.migration_event.read();
            let notices = lock(&self.runtime).migration_tick();
            for notice in notices {
                match notice {
                    Notice::Event(event) => self.broadcast_now(event),
                    Notice::Answer(client, id, result) => self.answer(client, id, result),
                }
            }
        } else if fd == lock(&self.events.throttle_timer).as_raw_fd() {
            // A stale wake-up (the timer was re-armed or stopped since) reads nothing.
            if lock(&self.events.throttle_timer).wait().is_ok() {
                lock(&self.runtime).throttle_tick();
            }
        } else {
            self.serve(fd, events.event_set());
        }
        self.sweep(ops);
    }
}

fn response_line(id: u64, result: Result<Response, Failure>) -> ResponseLine {
    match result {
        Ok(response) => ResponseLine {
            id,
            result: Outcome::Ok(response),
        },
        Err((kind, message)) => ResponseLine::error(id, kind, message),
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Option<Vec<u8>> {
    match serde_json::to_vec(value) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            log::error!("control: cannot encode a message: {e}");
            None
        }
    }
}
