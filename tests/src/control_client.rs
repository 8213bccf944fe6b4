//! A client of the `vmm` control socket for tests and benchmarks: one request line out, one answer
//! back, event lines kept aside in arrival order.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vmm_api::control::{ErrorKind, Event, EventLine, Outcome, Response, ResponseLine};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long a request's answer may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the next event may take (it may wait for a guest to boot).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(600);

/// A connection to a VMM's control socket.
pub struct ControlClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Event>,
}

impl ControlClient {
    /// Connects to `path`; waiting for an answer times out after [`ANSWER_TIMEOUT`], for an event
    /// after [`EVENT_TIMEOUT`], so a test fails rather than hangs.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path).with_context(|| format!("connect to {}", path.display()))?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(ControlClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        })
    }

    /// Waits until `path` exists (the VMM creates its socket shortly after it starts).
    pub fn wait_for_socket(path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !path.exists() {
            if Instant::now() > deadline {
                bail!(
                    "control socket {} did not appear within {timeout:?}",
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The raw socket, for tests that misbehave on purpose.
    pub fn stream(&self) -> &UnixStream {
        &self.writer
    }

    /// Sends one raw line (a newline is added) and reads its answer, keeping events that come first.
    pub fn call(&mut self, line: &str) -> Result<ResponseLine> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.answer()
    }

    /// Sends one line with `fds` attached (SCM_RIGHTS) and reads its answer.
    pub fn call_with_fds(&mut self, line: &str, fds: &[RawFd]) -> Result<ResponseLine> {
        let bytes = format!("{line}\n");
        let sent = self.writer.send_with_fds(&[bytes.as_bytes()], fds)?;
        if sent != bytes.len() {
            // The descriptors went with the first part; the rest is plain data.
            self.writer.write_all(&bytes.as_bytes()[sent..])?;
        }
        self.answer()
    }

    /// Sends one line without waiting for its answer (for requests answered later).
    pub fn send(&mut self, line: &str) -> Result<()> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        Ok(())
    }

    /// Waits up to `timeout` for the next answer (to a request sent with [`ControlClient::send`]),
    /// keeping events that come first.
    pub fn wait_answer(&mut self, timeout: Duration) -> Result<ResponseLine> {
        self.writer.set_read_timeout(Some(timeout))?;
        let answer = self.answer();
        self.writer.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        answer
    }

    fn answer(&mut self) -> Result<ResponseLine> {
        loop {
            let text = self.read_line()?;
            if let Ok(event) = serde_json::from_str::<EventLine>(&text) {
                self.events.push(event.event);
                continue;
            }
            return serde_json::from_str(&text).with_context(|| format!("bad answer {text:?}"));
        }
    }

    /// One line from the VMM; an error if it closed the connection.
    pub fn read_line(&mut self) -> Result<String> {
        let mut text = String::new();
        let n = self
            .reader
            .read_line(&mut text)
            .context("read from the control socket")?;
        if n == 0 {
            bail!("the VMM closed the connection");
        }
        Ok(text)
    }

    /// The next event line (one received earlier first).
    pub fn next_event(&mut self) -> Result<Event> {
        if !self.events.is_empty() {
            return Ok(self.events.remove(0));
        }
        // Events wait for the guest (a boot under load takes minutes here), answers only for the
        // VMM.
        self.writer.set_read_timeout(Some(EVENT_TIMEOUT))?;
        let text = self.read_line();
        self.writer.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let text = text?;
        Ok(serde_json::from_str::<EventLine>(&text)
            .with_context(|| format!("expected an event, got {text:?}"))?
            .event)
    }

    /// Reads events until one satisfies `want` (others, such as the boot event, are skipped).
    /// Panics if the connection ends first: for tests.
    pub fn wait_event(&mut self, want: impl Fn(&Event) -> bool) -> Event {
        loop {
            let event = self.next_event().expect("an event");
            if want(&event) {
                return event;
            }
        }
    }

    /// Events received so far while waiting for answers, taken.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Sends `line` and returns the successful answer.
    pub fn ok(&mut self, line: &str) -> Result<Response> {
        match self.call(line)?.result {
            Outcome::Ok(r) => Ok(r),
            Outcome::Error(e) => Err(anyhow!("{line}: {} ({:?})", e.message, e.kind)),
        }
    }

    /// Sends `line`, expects a failure, and returns its kind and message.
    pub fn error(&mut self, line: &str) -> Result<(ErrorKind, String)> {
        match self.call(line)?.result {
            Outcome::Error(e) => Ok((e.kind, e.message)),
            Outcome::Ok(r) => Err(anyhow!("{line}: expected an error, got {r:?}")),
        }
    }

    /// The socket's descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.writer.as_raw_fd()
    }
}
