//! An async client of one `vmm` control socket: newline-delimited JSON of the `vmm_api::control`
//! types. A reader task routes answers to their requests and forwards events (and the connection's
//! end) to the owner.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use vmm_api::control::{
    ControlError, Event, EventLine, Outcome, Request, RequestLine, Response, ResponseLine, MAX_LINE_BYTES,
};

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    /// Connecting or writing failed.
    #[error("control socket")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("no answer from the vmm within {0:?}")]
    Timeout(Duration),
    /// The connection closed before the answer came.
    #[error("the control connection closed")]
    Closed,
    /// The vmm refused the request.
    #[error("the vmm refused: {}", .0.message)]
    Refused(ControlError),
    /// The socket is served by another uid than the jailed vmm's: not its vmm (a jailed vmm owns
    /// its socket's directory and could have put something else there).
    #[error("the control socket is served by uid {found}, not the VM's jail uid {expected}")]
    WrongPeer { expected: u32, found: u32 },
}

/// What the reader task tells the connection's owner.
#[derive(Debug)]
pub enum ConnEvent {
    /// An event line.
    Event(Event),
    /// The connection ended (the vmm exited, or dropped us).
    Closed,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome>>>>;

/// One connection to a vmm's control socket.
pub struct ControlConn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
}

impl ControlConn {
    /// Connects to `path`; events and the end of the connection arrive on the returned receiver.
    pub async fn connect(
        path: &Path,
    ) -> Result<(ControlConn, mpsc::Receiver<ConnEvent>), ControlClientError> {
        Self::connect_as(path, None).await
    }

    /// Like [`ControlConn::connect`], checking with `expected_uid` that the process serving the
    /// socket runs as that uid (SO_PEERCRED).
    pub async fn connect_as(
        path: &Path,
        expected_uid: Option<u32>,
    ) -> Result<(ControlConn, mpsc::Receiver<ConnEvent>), ControlClientError> {
        let stream = UnixStream::connect(path).await?;
        if let Some(expected) = expected_uid {
            let found = stream.peer_cred()?.uid();
            if found != expected {
                return Err(ControlClientError::WrongPeer { expected, found });
            }
        }
        let (read, write) = stream.into_split();
        let pending: Pending = Arc::default();
        let (events_tx, events_rx) = mpsc::channel(64);
        tokio::spawn(read_lines(read, pending.clone(), events_tx));
        Ok((
            ControlConn {
                writer: tokio::sync::Mutex::new(write),
                pending,
                next_id: AtomicU64::new(1),
            },
            events_rx,
        ))
    }

    /// Sends `request` and waits up to `timeout` for its answer.
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Response, ControlClientError> {
        self.request_with_fds(request, &[], timeout).await
    }

    /// Sends `request` with `fds` attached to its line (SCM_RIGHTS; for `add-fds`) and waits up
    /// to `timeout` for its answer.
    pub async fn request_with_fds(
        &self,
        request: Request,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Response, ControlClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let result = tokio::time::timeout(timeout, async {
            let mut line = serde_json::to_vec(&RequestLine { id, request })
                .map_err(|e| ControlClientError::Io(e.into()))?;
            line.push(b'\n');
            let mut writer = self.writer.lock().await;
            let sent = if fds.is_empty() {
                0
            } else {
                send_with_fds(writer.as_ref(), &line, fds).await?
            };
            writer.write_all(&line[sent..]).await?;
            rx.await.map_err(|_| ControlClientError::Closed)
        })
        .await;
        lock(&self.pending).remove(&id);
        match result {
            Err(_) => Err(ControlClientError::Timeout(timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Outcome::Ok(response))) => Ok(response),
            Ok(Ok(Outcome::Error(e))) => Err(ControlClientError::Refused(e)),
        }
    }
}

/// Sends the start of `bytes` with `fds` in one `sendmsg`; returns how much of `bytes` went.
async fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    loop {
        sock.writable().await?;
        let sent = sock.try_io(tokio::io::Interest::WRITABLE, || {
            let mut space =
                vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(std::io::Error::other("too many descriptors for one message"));
            }
            sendmsg(
                sock,
                &[std::io::IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn read_lines(
    read: tokio::net::unix::OwnedReadHalf,
    pending: Pending,
    events: mpsc::Sender<ConnEvent>,
) {
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded: a line longer than the protocol allows ends the connection.
        let mut limited = (&mut reader).take(MAX_LINE_BYTES as u64 * 16);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) if !line.ends_with(b"\n") => break,
            Ok(_) => {}
        }
        if let Ok(event) = serde_json::from_slice::<EventLine>(&line) {
            if events.send(ConnEvent::Event(event.event)).await.is_err() {
                return;
            }
            continue;
        }
        match serde_json::from_slice::<ResponseLine>(&line) {
            Ok(response) => {
                if let Some(tx) = lock(&pending).remove(&response.id) {
                    let _ = tx.send(response.result);
                }
            }
            Err(e) => tracing::warn!(error = %e, "unreadable line from the vmm"),
        }
    }
    // Wake every waiter: their answers will not come.
    lock(&pending).clear();
    let _ = events.send(ConnEvent::Closed).await;
}
