//! The start admission limit: how many guests may boot at once.
//!
//! A booting kernel is the most CPU-hungry thing a guest does, and boots that outnumber the
//! host's cores slow each other down without end (on a nested, page-table-based KVM ten cold
//! boots on two cores never finish). So a start (CreateVm, StartVm, RebootVm, a restore at
//! agent start) takes a slot before its vmm is spawned and keeps it until the guest reports its
//! boot complete, its vmm ends, or `hold_max` passes (a guest without the boot-complete signal
//! must not hold a slot for ever). Waiters are served in order. Restores from snapshots and
//! incoming migrations boot nothing and take no slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The slots of one agent.
#[derive(Debug)]
pub struct BootSlots {
    semaphore: Arc<Semaphore>,
    /// `None`: no limit.
    limit: Option<usize>,
    hold_max: Duration,
    waiting: Arc<AtomicUsize>,
}

/// A slot held by one booting guest; released when dropped.
#[derive(Debug)]
pub struct BootSlot {
    _permit: Option<OwnedSemaphorePermit>,
    taken: Instant,
    /// The vmm's CPU demand (seconds run or waited to run) at the last sample, and when.
    sample: Option<(Instant, f64)>,
    /// Cores the vmm wanted between the last two samples.
    rate: Option<f64>,
}

/// A guest still wanting this much of a core (running or runnable) is taken to be booting,
/// whatever the timeout says. A booting vCPU is runnable all the time (one core); an idle one
/// sleeps in HLT.
pub const BUSY_CORES: f64 = 0.5;
/// Past this many timeouts a slot goes even from a busy guest (one spinning without end).
pub const HARD_TIMEOUTS: u32 = 4;
/// The shortest window the CPU rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

impl BootSlot {
    /// How long the slot has been held.
    pub fn held_for(&self) -> Duration {
        self.taken.elapsed()
    }

    /// Samples the vmm's CPU demand (`demand_seconds`: how long its threads ran or waited to
    /// run; `None` if unknown) and says whether the slot should go now ([`should_release`]).
    /// Call it on every tick while the slot is held, from the start: the rate it judges by needs
    /// samples from before the timeout (sampling only from the timeout on found no rate at the
    /// first check and released every slot there, busy or not).
    pub fn check(&mut self, demand_seconds: Option<f64>, hold_max: Duration) -> bool {
        self.check_at(Instant::now(), demand_seconds, hold_max)
    }

    fn check_at(&mut self, now: Instant, demand_seconds: Option<f64>, hold_max: Duration) -> bool {
        let rate = match demand_seconds {
            Some(d) => self.observe_demand_at(now, d),
            None => None,
        };
        should_release(now.duration_since(self.taken), hold_max, rate)
    }

    fn observe_demand_at(&mut self, now: Instant, demand_seconds: f64) -> Option<f64> {
        match self.sample {
            None => self.sample = Some((now, demand_seconds)),
            Some((at, before)) if now.duration_since(at) >= RATE_WINDOW => {
                let wall = now.duration_since(at).as_secs_f64();
                self.rate = Some((demand_seconds - before).max(0.0) / wall);
                self.sample = Some((now, demand_seconds));
            }
            Some(_) => {}
        }
        self.rate
    }
}

/// Whether a slot held for `held` should go. Before `hold_max`, never. After it, if the guest is
/// not busy (`rate`, the cores its vmm wanted, running or runnable, below [`BUSY_CORES`], or
/// unknown): it booted without the signal, or waits for something. A busy one is still booting,
/// slowed by a host that is short of CPU; releasing its slot would admit one more boot into that
/// shortage, then the next (a cascade in which every boot slows down further), so it keeps the
/// slot up to [`HARD_TIMEOUTS`] times `hold_max`. The rate is demand, not CPU time: in such a
/// shortage a booting vCPU gets a small share of a core, which used to look idle and let the
/// cascade happen (seen with 50 boots on 2 cores: 15 booting at once, each getting 0.1 core).
pub fn should_release(held: Duration, hold_max: Duration, rate: Option<f64>) -> bool {
    if held < hold_max {
        return false;
    }
    if held >= hold_max.saturating_mul(HARD_TIMEOUTS) {
        return true;
    }
    rate.is_none_or(|r| r < BUSY_CORES)
}

/// Counts a waiter for as long as it waits (also when its wait is dropped half way).
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BootSlots {
    /// At most `limit` boots at once (0: no limit), each holding its slot at most `hold_max`.
    pub fn new(limit: usize, hold_max: Duration) -> Self {
        let limit = (limit > 0).then_some(limit.min(Semaphore::MAX_PERMITS));
        BootSlots {
            semaphore: Arc::new(Semaphore::new(limit.unwrap_or(0))),
            limit,
            hold_max,
            waiting: Arc::default(),
        }
    }

    /// The most boots at once; `None`: no limit.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// How long a guest may hold its slot without reporting its boot complete.
    pub fn hold_max(&self) -> Duration {
        self.hold_max
    }

    /// A slot at once, if one is free.
    pub fn try_take(&self) -> Option<BootSlot> {
        if self.limit.is_none() {
            return Some(BootSlot::unlimited());
        }
        let permit = self.semaphore.clone().try_acquire_owned().ok()?;
        Some(BootSlot::of(permit))
    }

    /// A slot, waiting in line for one.
    pub async fn take(&self) -> BootSlot {
        if let Some(slot) = self.try_take() {
            return slot;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(self.waiting.clone());
        match self.semaphore.clone().acquire_owned().await {
            Ok(permit) => BootSlot::of(permit),
            // The semaphore is never closed; should it be, booting unlimited beats hanging.
            Err(_) => BootSlot::unlimited(),
        }
    }

    /// Boots holding a slot now (0 without a limit: they are not counted then).
    pub fn in_flight(&self) -> usize {
        self.limit
            .map_or(0, |l| l.saturating_sub(self.semaphore.available_permits()))
    }

    /// Starts waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

impl BootSlot {
    fn of(permit: OwnedSemaphorePermit) -> Self {
        BootSlot {
            _permit: Some(permit),
            taken: Instant::now(),
            sample: None,
            rate: None,
        }
    }

    fn unlimited() -> Self {
        BootSlot {
            _permit: None,
            taken: Instant::now(),
            sample: None,
            rate: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_slots_in_order_as_they_are_released() {
        let slots = Arc::new(BootSlots::new(2, Duration::from_secs(60)));
        let a = slots.take().await;
        let b = slots.take().await;
        assert_eq!(slots.in_flight(), 2);
        assert!(slots.try_take().is_none());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (mine, tx) = (slots.clone(), tx.clone());
            waiters.push(tokio::spawn(async move {
                let slot = mine.take().await;
                tx.send(i).unwrap();
                slot
            }));
            // Each waiter in line before the next one joins.
            while slots.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(slots.waiting(), 3);
        drop(a);
        assert_eq!(rx.recv().await, Some(0));
        drop(b);
        assert_eq!(rx.recv().await, Some(1));
        let first = waiters.remove(0).await.unwrap();
        assert!(rx.try_recv().is_err(), "a third boot got in while two held slots");
        drop(first);
        assert_eq!(rx.recv().await, Some(2));
        for w in waiters {
            drop(w.await.unwrap());
        }
        assert_eq!(slots.in_flight(), 0);
        assert_eq!(slots.waiting(), 0);
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_no_waiter_counted() {
        let slots = BootSlots::new(1, Duration::from_secs(60));
        let held = slots.take().await;
        let timed_out = tokio::time::timeout(Duration::from_millis(20), slots.take()).await;
        assert!(timed_out.is_err());
        assert_eq!(slots.waiting(), 0);
        drop(held);
        assert!(slots.try_take().is_some());
    }

    #[test]
    fn a_busy_guest_keeps_its_slot_past_the_timeout_up_to_the_hard_limit() {
        let max = Duration::from_secs(90);
        let at = |s: u64| Duration::from_secs(s);
        assert!(!should_release(at(89), max, None));
        assert!(should_release(at(90), max, None), "unknown use: released");
        assert!(should_release(at(90), max, Some(0.02)), "an idle guest");
        assert!(!should_release(at(90), max, Some(0.98)), "still booting");
        assert!(!should_release(at(359), max, Some(1.0)));
        assert!(should_release(at(360), max, Some(1.0)), "hard limit");
    }

    #[test]
    fn a_guest_busy_through_its_timeout_keeps_its_slot_until_it_idles() {
        let max = Duration::from_secs(90);
        let first_release = |demand: &dyn Fn(u64) -> Option<f64>| {
            let slots = BootSlots::new(1, max);
            let mut slot = slots.try_take().expect("a free slot");
            let t0 = slot.taken;
            (0..1000u64).find(|&s| slot.check_at(t0 + Duration::from_secs(s), demand(s), max))
        };
        // One core of demand until 200 s (booting on a starved host), then none (booted).
        let busy_then_idle = first_release(&|s| Some(s.min(200) as f64));
        assert!(
            busy_then_idle.is_some_and(|s| (200..=210).contains(&s)),
            "released at {busy_then_idle:?}"
        );
        assert_eq!(
            first_release(&|s| Some(s as f64 * 0.1)),
            Some(90),
            "an idle guest"
        );
        assert_eq!(first_release(&|_| None), Some(90), "unknown demand");
        assert_eq!(first_release(&|s| Some(s as f64)), Some(360), "hard limit");
    }

    #[test]
    fn the_demand_rate_is_measured_over_windows_of_five_seconds() {
        let slots = BootSlots::new(1, Duration::from_secs(60));
        let mut slot = slots.try_take().expect("a free slot");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(slot.observe_demand_at(at(0), 10.0), None);
        assert_eq!(slot.observe_demand_at(at(2), 11.0), None, "window too short");
        assert_eq!(slot.observe_demand_at(at(5), 12.5), Some(0.5));
        let idle = slot.observe_demand_at(at(10), 12.6).expect("a rate");
        assert!((idle - 0.02).abs() < 1e-9, "{idle}");
    }

    #[tokio::test]
    async fn no_limit_never_waits() {
        let slots = BootSlots::new(0, Duration::from_secs(60));
        let held: Vec<_> = (0..100).map(|_| slots.try_take()).collect();
        assert!(held.iter().all(Option::is_some));
        assert_eq!(slots.limit(), None);
        assert_eq!(slots.in_flight(), 0);
    }
}
