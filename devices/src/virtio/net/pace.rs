//! How well the guest keeps up with the frames it is given, as the receive ring shows it: a frame
//! is only held back for merging (`rx`) while the guest is behind and known to be slow, so that a
//! guest that keeps up never waits for a merge.
//!
//! A busy spell starts when frames are given to a guest that had taken everything before, and ends
//! at the first look that finds it caught up again; the device looks at least every `HOLD_CHECK`
//! while a spell lasts. The guest counts as slow after a spell longer than [`SLOW_GUEST`], and
//! from the moment the current one gets that long; a shorter spell makes it fast again.

use std::time::{Duration, Instant};

/// A busy spell longer than this makes the guest slow.
pub const SLOW_GUEST: Duration = Duration::from_millis(1);

/// The guest's pace, from the looks the device takes at the ring.
#[derive(Debug, Default)]
pub struct Pace {
    /// Start of the current busy spell, if one is under way.
    busy_since: Option<Instant>,
    slow: bool,
}

impl Pace {
    /// Notes what a look at the ring found: whether the guest has not yet taken everything given.
    pub fn observe(&mut self, behind: bool, now: Instant) {
        match (behind, self.busy_since) {
            (false, Some(since)) => {
                self.slow = now.duration_since(since) > SLOW_GUEST;
                self.busy_since = None;
            }
            (true, Some(since)) if now.duration_since(since) > SLOW_GUEST => self.slow = true,
            // Behind without a delivery seen to start it (after a reset, say): count from now.
            (true, None) => self.busy_since = Some(now),
            _ => {}
        }
    }

    /// Notes that frames were given to the guest.
    pub fn delivered(&mut self, now: Instant) {
        self.busy_since.get_or_insert(now);
    }

    /// Whether the guest is slow: holding a frame back while it is behind costs it nothing.
    pub fn slow(&self) -> bool {
        self.slow
    }

    /// Whether the device must look for the end of the current busy spell: only until it is long
    /// enough to make the guest slow, so that a guest that never takes its frames (a stuck
    /// driver) does not keep the device awake.
    pub fn watching(&self, now: Instant) -> bool {
        self.busy_since
            .is_some_and(|since| now.duration_since(since) <= SLOW_GUEST)
    }

    /// Forgets everything (device reset).
    pub fn reset(&mut self) {
        *self = Pace::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_spell_longer_than_the_limit_makes_the_guest_slow_and_a_short_one_fast() {
        let t = Instant::now();
        let mut p = Pace::default();
        assert!(!p.slow() && !p.watching(t));
        p.delivered(t);
        assert!(p.watching(t));
        p.observe(true, t + MS / 2);
        assert!(!p.slow(), "half a millisecond behind is not slow");
        // Slow from the moment the spell gets long, before it ends.
        p.observe(true, t + 2 * MS);
        assert!(
            p.slow() && !p.watching(t + 2 * MS),
            "known slow: no need to look further"
        );
        // More deliveries within the spell do not restart it.
        p.delivered(t + 3 * MS);
        p.observe(false, t + 4 * MS);
        assert!(p.slow() && !p.watching(t + 4 * MS));
        // A guest caught up at a look is not behind; the next spell is short: fast again.
        p.observe(false, t + 5 * MS);
        p.delivered(t + 6 * MS);
        p.observe(false, t + 6 * MS + MS / 4);
        assert!(!p.slow() && !p.watching(t + 6 * MS + MS / 4));
    }

    #[test]
    fn behind_without_a_delivery_counts_from_the_first_look() {
        let t = Instant::now();
        let mut p = Pace::default();
        p.observe(true, t);
        assert!(p.watching(t) && !p.slow());
        p.observe(true, t + 2 * MS);
        assert!(p.slow());
        p.reset();
        assert!(!p.slow() && !p.watching(t));
    }
}
