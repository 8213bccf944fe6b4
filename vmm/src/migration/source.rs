//! The source's migration thread: handshake, memory rounds until what is left fits the downtime
//! budget (or the timeout's policy decides), then the switch-over.

use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_api::migration::{MigrateSend, MigrationPhase, TimeoutPolicy};

use super::conn::Conn;
use super::wire::{self, Frame, Hello, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::{spawn_confined, FromMain, MainLink, MigrationError, Shared, ToMain};
use crate::seccomp::SeccompMode;
use crate::sync::lock;

/// How long one write may block (a stalled peer), and how long the destination may take to
/// build the VM and answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Most memory rounds before the timeout policy applies anyway.
const MAX_ROUNDS: u32 = 30;
/// Auto-converge: the first throttle step, the later ones, and how many rounds in a row must
/// leave more than half of what they sent dirty again before a step.
const THROTTLE_FIRST: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const ROUNDS_BEFORE_STEP: u32 = 2;

/// Auto-converge's throttle: raised a step after [`ROUNDS_BEFORE_STEP`] rounds in a row that
/// did not converge (what the guest dirtied during a round is more than half of what the round
/// sent), as QEMU does.
#[derive(Debug, Default)]
struct AutoConverge {
    percent: u32,
    high_rounds: u32,
}

impl AutoConverge {
    /// After a round that sent `sent` bytes while `dirtied` became dirty: the new throttle, if it
    /// changed.
    fn after_round(&mut self, sent: u64, dirtied: u64) -> Option<u32> {
        if dirtied.saturating_mul(2) <= sent {
            self.high_rounds = 0;
            return None;
        }
        self.high_rounds += 1;
        if self.high_rounds < ROUNDS_BEFORE_STEP
            || self.percent >= crate::vstate::vcpu_control::Throttle::MAX_PERCENT
        {
            return None;
        }
        self.high_rounds = 0;
        self.percent = match self.percent {
            0 => THROTTLE_FIRST,
            p => (p + THROTTLE_STEP).min(crate::vstate::vcpu_control::Throttle::MAX_PERCENT),
        };
        Some(self.percent)
    }
}

/// A migration for the source thread to carry out.
pub struct SourceJob {
    /// The connected stream (taken by the thread).
    pub conn: Option<UnixStream>,
    /// How.
    pub params: MigrateSend,
    /// Guest memory (read while the guest runs: what changes meanwhile is sent again).
    pub mem: GuestMemoryMmap,
    /// The handshake.
    pub hello: Hello,
    /// The pages the guest had touched when the migration began, if known: the first round sends
    /// those (the others read as zeros), not every page.
    pub touched: Option<Vec<Vec<u64>>>,
    /// To the main loop.
    pub link: MainLink,
    /// Progress and cancel.
    pub shared: Arc<Shared>,
}

/// Starts the thread that carries out source jobs, one at a time, under the migration filter.
pub fn spawn_worker(seccomp: SeccompMode) -> Result<mpsc::Sender<SourceJob>, MigrationError> {
    let (tx, rx) = mpsc::channel::<SourceJob>();
    spawn_confined("vmm-migrate", seccomp, move || {
        while let Ok(mut job) = rx.recv() {
            run(&mut job);
        }
    })?;
    Ok(tx)
}

fn run(job: &mut SourceJob) {
    let result = match job.conn.take() {
        Some(sock) => migrate(job, sock),
        None => Err(MigrationError::Vm("no connection".into())),
    };
    let outcome = result.map_err(|e| {
        let why = e.to_string();
        let mut stats = lock(&job.shared.stats);
        stats.phase = MigrationPhase::Failed;
        stats.error = Some(why.clone());
        why
    });
    if let Err(e) = job.link.tell(ToMain::SourceDone(outcome)) {
        log::error!("migration: {e}");
    }
}

/// Bytes on the wire, paced to a bandwidth limit.
struct Sender<'a> {
    out: BufWriter<Conn>,
    shared: &'a Shared,
    mem: &'a GuestMemoryMmap,
    sent: u64,
    since: Instant,
    limit: u64,
    buf: Vec<u8>,
}

impl Sender<'_> {
    fn frame(&mut self, frame: &Frame) -> Result<(), MigrationError> {
        wire::write_frame(&mut self.out, frame)?;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        self.out.flush().map_err(wire::WireError::Io)?;
        Ok(())
    }

    /// Reads the peer's next frame (after sending everything written so far).
    fn answer(&mut self) -> Result<Frame, wire::WireError> {
        self.out.flush()?;
        wire::read_frame(self.out.get_mut())
    }

    /// Sends `pages` pages from `gpa`; with `skip_zero`, only the runs that hold data (a fresh
    /// destination's memory reads as zeros).
    fn run_of_pages(&mut self, gpa: u64, pages: usize, skip_zero: bool) -> Result<(), MigrationError> {
        let len = pages * PAGE_SIZE;
        self.buf.resize(len, 0);
        self.mem
            .read_slice(&mut self.buf[..len], GuestAddress(gpa))
            .map_err(|e| MigrationError::Vm(format!("reading guest memory at {gpa:#x}: {e}")))?;
        let mut start = None;
        for page in 0..=pages {
            let data = page < pages
                && (!skip_zero
                    || self.buf[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
                        .iter()
                        .any(|b| *b != 0));
            match (data, start) {
                (true, None) => start = Some(page),
                (false, Some(first)) => {
                    let bytes = self.buf[first * PAGE_SIZE..page * PAGE_SIZE].to_vec();
                    let n = bytes.len() as u64;
                    self.frame(&Frame::Pages {
                        gpa: gpa + (first * PAGE_SIZE) as u64,
                        data: bytes,
                    })?;
                    self.sent += n;
                    lock(&self.shared.stats).memory_transferred_bytes = self.sent;
                    self.pace();
                    // Looked at per frame: a round of a large guest on a slow link takes long.
                    if self.shared.cancel.load(Ordering::Acquire) {
                        return Err(MigrationError::Cancelled);
                    }
                    start = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Sends the pages set in `bitmaps` (per region), or every page with `None`; with
    /// `skip_zero`, only those that hold data.
    fn pages(&mut self, bitmaps: Option<&[Vec<u64>]>, skip_zero: bool) -> Result<(), MigrationError> {
        let regions: Vec<(u64, u64)> = self.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        for (slot, (start, len)) in regions.into_iter().enumerate() {
            let count = (len / PAGE_SIZE as u64) as usize;
            let is_set = |page: usize| match bitmaps {
                None => true,
                Some(b) => b
                    .get(slot)
                    .and_then(|words| words.get(page / 64))
                    .is_some_and(|w| w & (1 << (page % 64)) != 0),
            };
            let mut page = 0;
            while page < count {
                if !is_set(page) {
                    page += 1;
                    continue;
                }
                let first = page;
                while page < count && page - first < MAX_PAGES_PER_FRAME && is_set(page) {
                    page += 1;
                }
                self.run_of_pages(start + (first * PAGE_SIZE) as u64, page - first, skip_zero)?;
            }
        }
        Ok(())
    }

    /// Sleeps as long as the bandwidth limit asks.
    fn pace(&self) {
        if self.limit == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.sent as f64 / self.limit as f64);
        let elapsed = self.since.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

fn count_pages(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

fn merge(into: &mut Vec<Vec<u64>>, more: Vec<Vec<u64>>) {
    if into.is_empty() {
        *into = more;
        return;
    }
    for (a, b) in into.iter_mut().zip(more) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

fn dirty_log(link: &MainLink) -> Result<Vec<Vec<u64>>, MigrationError> {
    match link.ask(ToMain::DirtyLog)? {
        FromMain::Dirty(result) => result.map_err(MigrationError::Vm),
        other => Err(MigrationError::Vm(format!("unexpected answer {other:?}"))),
    }
}

fn per_second(bytes: u64, d: Duration) -> u64 {
    let secs = d.as_secs_f64();
    if secs <= 0.0 {
        u64::MAX
    } else {
        (bytes as f64 / secs) as u64
    }
}

fn migrate(job: &SourceJob, sock: UnixStream) -> Result<(), MigrationError> {
    let started = Instant::now();
    let params = &job.params;
    let conn = Conn::source(sock, params.tls.as_ref(), READ_TIMEOUT, WRITE_TIMEOUT)?;
    let mut tx = Sender {
        out: BufWriter::with_capacity(1 << 20, conn),
        shared: &job.shared,
        mem: &job.mem,
        sent: 0,
        since: Instant::now(),
        limit: params.bandwidth_bytes_per_s,
        buf: Vec::new(),
    };
    let update = |f: &dyn Fn(&mut vmm_api::migration::MigrationStats)| {
        let mut stats = lock(&job.shared.stats);
        f(&mut stats);
        stats.elapsed_ms = started.elapsed().as_millis() as u64;
    };
    let cancelled = || job.shared.cancel.load(Ordering::Acquire);

    tx.frame(&Frame::Hello(job.hello.clone()))?;
    match tx.answer() {
        Ok(Frame::HelloAck) => {}
        Ok(other) => {
            return Err(wire::WireError::Protocol(format!("expected hello-ack, got {other:?}")).into())
        }
        Err(wire::WireError::Aborted(why)) => return Err(MigrationError::Incompatible(why)),
        Err(e) => return Err(e.into()),
    }

    // From here on every write is in the log: round 0 reads memory while the guest runs.
    dirty_log(&job.link)?;
    update(&|s| s.phase = MigrationPhase::PreCopy);
    let mut round_start = Instant::now();
    // A fresh destination's memory reads as zeros: round 0 sends only what holds data.
    tx.pages(job.touched.as_deref(), true)?;
    tx.frame(&Frame::RoundEnd(0))?;
    tx.flush()?;
    let mut last_round = (tx.sent, round_start.elapsed());
    let mut iteration = 0u32;
    let budget = Duration::from_millis(params.max_downtime_ms);
    let deadline = started + Duration::from_millis(params.timeout_ms);
    let mut throttle = AutoConverge::default();
    let mut pending;
    loop {
        if cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let dirty = dirty_log(&job.link)?;
        let remaining = count_pages(&dirty) * PAGE_SIZE as u64;
        let throughput = per_second(last_round.0, last_round.1);
        let expected = Duration::from_secs_f64(remaining as f64 / throughput.max(1) as f64);
        let dirty_rate = per_second(remaining, round_start.elapsed());
        let sent = tx.sent;
        update(&|s| {
            s.iteration = iteration;
            s.memory_transferred_bytes = sent;
            s.memory_remaining_bytes = remaining;
            s.throughput_bytes_per_s = throughput;
            s.dirty_rate_bytes_per_s = dirty_rate;
            s.expected_downtime_ms = expected.as_millis() as u64;
        });
        if expected > budget && params.auto_converge && iteration > 0 {
            if let Some(percent) = throttle.after_round(last_round.0, remaining) {
                job.link.tell(ToMain::Throttle(percent))?;
                update(&|s| s.throttle_percent = percent);
            }
        }
        job.link.tell(ToMain::Progress)?;
        pending = dirty;
        if expected <= budget {
            break;
        }
        if Instant::now() > deadline || iteration >= MAX_ROUNDS {
            match params.on_timeout {
                TimeoutPolicy::Force => break,
                TimeoutPolicy::Cancel => return Err(MigrationError::Timeout(params.timeout_ms)),
            }
        }
        iteration += 1;
        round_start = Instant::now();
        let before = tx.sent;
        tx.pages(Some(&pending), false)?;
        tx.frame(&Frame::RoundEnd(iteration))?;
        tx.flush()?;
        last_round = (tx.sent - before, round_start.elapsed());
    }

    // Switch-over: from the pause to the destination's ready answer, the guest does not run.
    update(&|s| s.phase = MigrationPhase::SwitchOver);
    let paused = Instant::now();
    let switched = match job.link.ask(ToMain::SwitchOver)? {
        FromMain::Switched(Ok(s)) => s,
        FromMain::Switched(Err(e)) => return Err(MigrationError::Vm(e)),
        other => return Err(MigrationError::Vm(format!("unexpected answer {other:?}"))),
    };
    merge(&mut pending, switched.dirty);
    tx.pages(Some(&pending), false)?;
    tx.frame(&Frame::RoundEnd(iteration + 1))?;
    tx.frame(&Frame::State(switched.state))?;
    match tx.answer() {
        Ok(Frame::Ready) => {}
        Ok(other) => return Err(wire::WireError::Protocol(format!("expected ready, got {other:?}")).into()),
        Err(e) => return Err(e.into()),
    }
    if cancelled() {
        return Err(MigrationError::Cancelled);
    }
    tx.frame(&Frame::Commit {
        resume: switched.was_running,
    })?;
    tx.flush()?;
    let downtime = paused.elapsed();
    let sent = tx.sent;
    update(&|s| {
        s.phase = MigrationPhase::Completed;
        s.iteration = iteration + 1;
        s.memory_transferred_bytes = sent;
        s.memory_remaining_bytes = 0;
        s.downtime_ms = Some(downtime.as_millis() as u64);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::AutoConverge;

    #[test]
    fn the_throttle_steps_up_after_two_rounds_that_do_not_converge() {
        let mut t = AutoConverge::default();
        // Converging rounds change nothing.
        assert_eq!(t.after_round(100, 10), None);
        assert_eq!(t.after_round(100, 60), None);
        assert_eq!(t.after_round(100, 60), Some(20));
        // A converging round in between resets the count.
        assert_eq!(t.after_round(100, 60), None);
        assert_eq!(t.after_round(100, 40), None);
        assert_eq!(t.after_round(100, 60), None);
        assert_eq!(t.after_round(100, 60), Some(30));
        let mut last = 30;
        for _ in 0..40 {
            if let Some(p) = t.after_round(100, 100) {
                assert!(p > last);
                last = p;
            }
        }
        assert_eq!(last, 99);
        assert_eq!(t.after_round(100, 100), None);
    }
}
