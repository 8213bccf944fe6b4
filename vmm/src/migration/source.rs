//! The source's migration thread: handshake, memory rounds until what is left fits the downtime
//! budget (or the timeout's policy decides), then the switch-over.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_api::migration::{MigrateSend, MigrationPhase, TimeoutPolicy};

use super::conn::Conn;
use devices::virtio::block::written::CHUNK_BYTES;
use devices::virtio::block::WrittenChunks;

use super::wire::{self, Frame, Hello, MAX_DISK_BYTES_PER_FRAME, MAX_PAGES_PER_FRAME, PAGE_SIZE};
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

/// A drive whose image the source copies (no shared storage).
pub struct SourceDisk {
    /// The drive's id.
    pub id: String,
    /// The image, through the page cache.
    pub file: File,
    /// What the guest writes to it (and the image's size).
    pub written: Arc<WrittenChunks>,
}

impl SourceDisk {
    /// The image's size.
    pub fn bytes(&self) -> u64 {
        self.written.disk_bytes()
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
    /// The drives to copy, in the order of [`Hello::disks`].
    pub disks: Vec<SourceDisk>,
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
    /// Bytes of memory pages sent.
    sent: u64,
    /// Bytes of disk contents sent.
    disk_sent: u64,
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
        for (start, end) in data_runs(&self.buf[..len], skip_zero) {
            let bytes = self.buf[start..end].to_vec();
            self.frame(&Frame::Pages {
                gpa: gpa + start as u64,
                data: bytes,
            })?;
            self.sent += (end - start) as u64;
            lock(&self.shared.stats).memory_transferred_bytes = self.sent;
            self.after_frame()?;
        }
        Ok(())
    }

    /// Paces to the bandwidth limit and looks for a cancel: per frame, as a round of a large
    /// guest on a slow link takes long.
    fn after_frame(&self) -> Result<(), MigrationError> {
        self.pace();
        if self.shared.cancel.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// Sends the pages set in `bitmaps` (per region), or every page with `None`; with
    /// `skip_zero`, only those that hold data.
    fn pages(&mut self, bitmaps: Option<&[Vec<u64>]>, skip_zero: bool) -> Result<(), MigrationError> {
        let regions: Vec<(u64, u64)> = self.mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        for (slot, (start, len)) in regions.into_iter().enumerate() {
            let count = (len / PAGE_SIZE as u64) as usize;
            let bits = bitmaps.map(|b| b.get(slot).map_or(&[][..], Vec::as_slice));
            for (first, n) in set_runs(bits, count, MAX_PAGES_PER_FRAME) {
                self.run_of_pages(start + (first * PAGE_SIZE) as u64, n, skip_zero)?;
            }
        }
        Ok(())
    }

    /// Sends `len` bytes of disk `index` from `offset`; with `skip_zero`, only the 4 KiB blocks
    /// that hold data (the destination's copy starts out as zeros).
    fn run_of_disk(
        &mut self,
        index: usize,
        disk: &SourceDisk,
        offset: u64,
        len: usize,
        skip_zero: bool,
    ) -> Result<(), MigrationError> {
        self.buf.resize(len, 0);
        disk.file
            .read_exact_at(&mut self.buf[..len], offset)
            .map_err(|e| MigrationError::Vm(format!("reading disk {index} at {offset:#x}: {e}")))?;
        for (start, end) in data_runs(&self.buf[..len], skip_zero) {
            let bytes = self.buf[start..end].to_vec();
            self.frame(&Frame::Disk {
                disk: index as u32,
                offset: offset + start as u64,
                data: bytes,
            })?;
            self.disk_sent += (end - start) as u64;
            lock(&self.shared.stats).disk_transferred_bytes = self.disk_sent;
            self.after_frame()?;
        }
        Ok(())
    }

    /// Round 0 of a disk: every part that holds data (holes and zeros are left out).
    fn whole_disk(&mut self, index: usize, disk: &SourceDisk) -> Result<(), MigrationError> {
        let ranges = devices::virtio::block::disk::data_ranges(&disk.file, disk.bytes())
            .map_err(|e| MigrationError::Vm(format!("disk {index}: {e}")))?;
        for (start, end) in ranges {
            let mut offset = start;
            while offset < end {
                let len = (end - offset).min(MAX_DISK_BYTES_PER_FRAME as u64);
                self.run_of_disk(index, disk, offset, len as usize, true)?;
                offset += len;
            }
        }
        Ok(())
    }

    /// The chunks of a disk set in `bits` (zeros included: they may overwrite data).
    fn disk_chunks(&mut self, index: usize, disk: &SourceDisk, bits: &[u64]) -> Result<(), MigrationError> {
        let chunks = disk.bytes().div_ceil(CHUNK_BYTES) as usize;
        let per_frame = MAX_DISK_BYTES_PER_FRAME / CHUNK_BYTES as usize;
        for (first, n) in set_runs(Some(bits), chunks, per_frame) {
            let offset = first as u64 * CHUNK_BYTES;
            let end = ((first + n) as u64 * CHUNK_BYTES).min(disk.bytes());
            self.run_of_disk(index, disk, offset, (end - offset) as usize, false)?;
        }
        Ok(())
    }

    /// Sends what each disk's bitmap in `written` marks.
    fn disks(&mut self, disks: &[SourceDisk], written: &[Vec<u64>]) -> Result<(), MigrationError> {
        for (index, (disk, bits)) in disks.iter().zip(written).enumerate() {
            self.disk_chunks(index, disk, bits)?;
        }
        Ok(())
    }

    /// Everything sent so far, memory and disks.
    fn total_sent(&self) -> u64 {
        self.sent + self.disk_sent
    }

    /// Sleeps as long as the bandwidth limit asks.
    fn pace(&self) {
        if self.limit == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.total_sent() as f64 / self.limit as f64);
        let elapsed = self.since.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// The byte ranges of `buf` to send, split at 4 KiB blocks that are all zeros with `skip_zero`
/// (the last block may be shorter), else the whole buffer.
fn data_runs(buf: &[u8], skip_zero: bool) -> Vec<(usize, usize)> {
    if !skip_zero {
        return if buf.is_empty() {
            Vec::new()
        } else {
            vec![(0, buf.len())]
        };
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(PAGE_SIZE).enumerate() {
        if block.iter().all(|b| *b == 0) {
            continue;
        }
        let (start, end) = (i * PAGE_SIZE, i * PAGE_SIZE + block.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// The runs of set bits among the first `count` of `bits` (all set with `None`), each at most
/// `max` long, as (first, length).
fn set_runs(bits: Option<&[u64]>, count: usize, max: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let is_set = move |n: usize| match bits {
        None => true,
        Some(words) => words.get(n / 64).is_some_and(|w| w & (1 << (n % 64)) != 0),
    };
    let mut n = 0;
    std::iter::from_fn(move || {
        while n < count && !is_set(n) {
            n += 1;
        }
        if n >= count {
            return None;
        }
        let first = n;
        while n < count && n - first < max && is_set(n) {
            n += 1;
        }
        Some((first, n - first))
    })
}

/// Each disk's chunks written since the last call.
fn written(disks: &[SourceDisk]) -> Vec<Vec<u64>> {
    disks.iter().map(|d| d.written.take()).collect()
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
        disk_sent: 0,
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

    // From here on every write is in the logs: round 0 reads memory and disks while the guest
    // runs.
    dirty_log(&job.link)?;
    written(&job.disks);
    update(&|s| s.phase = MigrationPhase::PreCopy);
    let mut round_start = Instant::now();
    // A fresh destination's memory and disk copies read as zeros: round 0 sends only what holds
    // data. Disks first: they are the bulk, and memory, which changes fastest, then goes closest
    // to the next round.
    for (index, disk) in job.disks.iter().enumerate() {
        tx.whole_disk(index, disk)?;
    }
    tx.pages(job.touched.as_deref(), true)?;
    tx.frame(&Frame::RoundEnd(0))?;
    tx.flush()?;
    let mut last_round = (tx.total_sent(), round_start.elapsed());
    let mut iteration = 0u32;
    let budget = Duration::from_millis(params.max_downtime_ms);
    let deadline = started + Duration::from_millis(params.timeout_ms);
    let mut throttle = AutoConverge::default();
    let (mut pending, mut pending_disks);
    loop {
        if cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let dirty = dirty_log(&job.link)?;
        let disks_written = written(&job.disks);
        let memory_remaining = count_pages(&dirty) * PAGE_SIZE as u64;
        let disk_remaining = count_pages(&disks_written) * CHUNK_BYTES;
        let remaining = memory_remaining + disk_remaining;
        let throughput = per_second(last_round.0, last_round.1);
        let expected = Duration::from_secs_f64(remaining as f64 / throughput.max(1) as f64);
        let dirty_rate = per_second(memory_remaining, round_start.elapsed());
        let (sent, disk_sent) = (tx.sent, tx.disk_sent);
        update(&|s| {
            s.iteration = iteration;
            s.memory_transferred_bytes = sent;
            s.memory_remaining_bytes = memory_remaining;
            s.disk_transferred_bytes = disk_sent;
            s.disk_remaining_bytes = disk_remaining;
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
        pending_disks = disks_written;
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
        let before = tx.total_sent();
        tx.pages(Some(&pending), false)?;
        tx.disks(&job.disks, &pending_disks)?;
        tx.frame(&Frame::RoundEnd(iteration))?;
        tx.flush()?;
        last_round = (tx.total_sent() - before, round_start.elapsed());
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
    // Paused, with the drives' requests drained: these are the guest's last writes.
    merge(&mut pending_disks, written(&job.disks));
    tx.pages(Some(&pending), false)?;
    tx.disks(&job.disks, &pending_disks)?;
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
    let (sent, disk_sent) = (tx.sent, tx.disk_sent);
    update(&|s| {
        s.phase = MigrationPhase::Completed;
        s.iteration = iteration + 1;
        s.memory_transferred_bytes = sent;
        s.memory_remaining_bytes = 0;
        s.disk_transferred_bytes = disk_sent;
        s.disk_remaining_bytes = 0;
        s.downtime_ms = Some(downtime.as_millis() as u64);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::AutoConverge;

    #[test]
    fn data_runs_leave_out_zero_blocks_only_when_asked() {
        use super::data_runs;
        let mut buf = vec![0u8; 4 * 4096 + 512];
        buf[5] = 1;
        buf[2 * 4096 + 7] = 1;
        buf[3 * 4096] = 1;
        buf[4 * 4096 + 511] = 1;
        assert_eq!(data_runs(&buf, true), vec![(0, 4096), (2 * 4096, 4 * 4096 + 512)]);
        assert_eq!(data_runs(&buf, false), vec![(0, buf.len())]);
        assert_eq!(data_runs(&[0; 8192], true), vec![]);
        assert_eq!(data_runs(&[], false), vec![]);
    }

    #[test]
    fn set_runs_split_at_clear_bits_and_at_the_most_per_run() {
        use super::set_runs;
        let bits = [0b1110_0111u64, 1];
        assert_eq!(
            set_runs(Some(&bits), 70, 2).collect::<Vec<_>>(),
            vec![(0, 2), (2, 1), (5, 2), (7, 1), (64, 1)]
        );
        assert_eq!(
            set_runs(Some(&bits), 6, 10).collect::<Vec<_>>(),
            vec![(0, 3), (5, 1)]
        );
        assert_eq!(
            set_runs(None, 5, 2).collect::<Vec<_>>(),
            vec![(0, 2), (2, 2), (4, 1)]
        );
        // A bitmap shorter than the count: the rest is clear.
        assert_eq!(set_runs(Some(&[]), 100, 8).count(), 0);
    }

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
