//! Saving and restoring a [`RateLimiter`] for snapshots and migration.
//!
//! Instants mean nothing in another process, so the state holds what the buckets hold *now*: budgets
//! refilled up to the moment of saving, and any over-consumption debt as a duration still to wait. Less
//! than one token's worth of accrued time is dropped. The timer is not saved: a restored limiter starts
//! unblocked, and the device, which retries its queues on resume, blocks it again if tokens are short.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{add_capped, RateLimiter, RateLimiterError, TokenBucket, MAX_WAIT};

/// A [`TokenBucket`] at the moment it was saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    /// Capacity in tokens.
    pub size: u64,
    /// The one-time burst as configured.
    pub one_time_burst: u64,
    /// Time for an empty bucket to fill, in milliseconds.
    pub refill_time_ms: u64,
    /// What was left of the one-time burst.
    pub one_time_burst_left: u64,
    /// Tokens available.
    pub budget: u64,
    /// Over-consumption debt still to be waited out before the bucket refills, in nanoseconds.
    pub debt_ns: u64,
}

/// A [`RateLimiter`] at the moment it was saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RateLimiterState {
    /// The bytes bucket, if any.
    pub bandwidth: Option<TokenBucketState>,
    /// The operations bucket, if any.
    pub ops: Option<TokenBucketState>,
}

impl TokenBucket {
    fn save_at(&self, now: Instant) -> TokenBucketState {
        let mut current = self.clone();
        current.refill(now);
        let debt = current.last_update.saturating_duration_since(now);
        TokenBucketState {
            size: current.size,
            one_time_burst: current.initial_one_time_burst,
            refill_time_ms: current.refill_time_ms,
            one_time_burst_left: current.one_time_burst,
            budget: current.budget,
            // Debts are capped at MAX_WAIT, well within u64 nanoseconds.
            debt_ns: u64::try_from(debt.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    fn restore_at(state: &TokenBucketState, now: Instant) -> Result<Self, RateLimiterError> {
        let mut bucket = TokenBucket::new_at(state.size, state.one_time_burst, state.refill_time_ms, now)
            .ok_or(RateLimiterError::InvalidState(
                "bucket size or refill time out of range",
            ))?;
        if state.budget > state.size {
            return Err(RateLimiterError::InvalidState("budget exceeds bucket size"));
        }
        if state.one_time_burst_left > state.one_time_burst {
            return Err(RateLimiterError::InvalidState(
                "remaining burst exceeds configured burst",
            ));
        }
        let debt = Duration::from_nanos(state.debt_ns);
        if debt > MAX_WAIT {
            return Err(RateLimiterError::InvalidState("debt too large"));
        }
        if !debt.is_zero() && state.budget != 0 {
            return Err(RateLimiterError::InvalidState("budget left while in debt"));
        }
        bucket.one_time_burst = state.one_time_burst_left;
        bucket.budget = state.budget;
        bucket.last_update = add_capped(now, debt);
        Ok(bucket)
    }
}

impl RateLimiter {
    /// The limiter's buckets as they are now.
    pub fn save(&self) -> RateLimiterState {
        let now = Instant::now();
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(|b| b.save_at(now)),
            ops: self.ops.as_ref().map(|b| b.save_at(now)),
        }
    }

    /// A new limiter (with its own timerfd) holding `state`, which is checked for consistency since it
    /// comes from a file or a peer.
    pub fn restore(state: &RateLimiterState) -> Result<Self, RateLimiterError> {
        let now = Instant::now();
        let bandwidth = state
            .bandwidth
            .as_ref()
            .map(|s| TokenBucket::restore_at(s, now))
            .transpose()?;
        let ops = state
            .ops
            .as_ref()
            .map(|s| TokenBucket::restore_at(s, now))
            .transpose()?;
        RateLimiter::with_buckets(bandwidth, ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::BucketReduction;

    fn state(size: u64, burst: u64, refill: u64, left: u64, budget: u64, debt_ns: u64) -> TokenBucketState {
        TokenBucketState {
            size,
            one_time_burst: burst,
            refill_time_ms: refill,
            one_time_burst_left: left,
            budget,
            debt_ns,
        }
    }

    #[test]
    fn save_refills_up_to_now_and_keeps_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(1000, 100, 1000, t0).unwrap();
        assert_eq!(b.reduce_at(600, t0), BucketReduction::Success);
        // 100 from the burst, 500 from the budget; 250 ms later 250 tokens are back.
        let s = b.save_at(t0 + Duration::from_millis(250));
        assert_eq!(s, state(1000, 100, 1000, 0, 750, 0));

        let mut b = TokenBucket::new_at(1000, 0, 1000, t0).unwrap();
        assert!(matches!(
            b.reduce_at(3000, t0),
            BucketReduction::OverConsumption(_)
        ));
        // 2000 tokens of debt at 1 token/ms: 2 s, of which 0.5 s have passed.
        let s = b.save_at(t0 + Duration::from_millis(500));
        assert_eq!(s, state(1000, 0, 1000, 0, 0, 1_500_000_000));
    }

    #[test]
    fn restore_round_trips() {
        let t0 = Instant::now();
        for s in [
            state(1000, 100, 1000, 40, 750, 0),
            state(1000, 0, 1000, 0, 0, 1_500_000_000),
            state(u64::MAX, u64::MAX, 3_600_000, 0, u64::MAX, 0),
        ] {
            let b = TokenBucket::restore_at(&s, t0).unwrap();
            assert_eq!(b.save_at(t0), s);
        }

        let saved = RateLimiterState {
            bandwidth: Some(state(1 << 20, 0, 100, 0, 12345, 0)),
            ops: None,
        };
        let limiter = RateLimiter::restore(&saved).unwrap();
        assert!(!limiter.is_blocked());
        assert_eq!(limiter.ops(), None);
        let bw = limiter.bandwidth().unwrap();
        assert_eq!((bw.capacity(), bw.refill_time_ms()), (1 << 20, 100));
        // Saving again can only have gained tokens since.
        assert!(limiter.save().bandwidth.unwrap().budget >= 12345);
        assert_eq!(
            RateLimiter::restore(&RateLimiterState::default()).unwrap().save(),
            RateLimiterState::default()
        );
    }

    #[test]
    fn restore_rejects_inconsistent_states() {
        let cases = [
            state(0, 0, 1000, 0, 0, 0),
            state(10, 0, 0, 0, 0, 0),
            state(10, 0, 3_600_001, 0, 0, 0),
            state(10, 0, 1000, 0, 11, 0),
            state(10, 5, 1000, 6, 10, 0),
            state(10, 0, 1000, 0, 1, 1),
            state(10, 0, 1000, 0, 0, u64::MAX),
        ];
        for s in cases {
            let limiter_state = RateLimiterState {
                bandwidth: None,
                ops: Some(s.clone()),
            };
            assert!(
                matches!(
                    RateLimiter::restore(&limiter_state),
                    Err(RateLimiterError::InvalidState(_))
                ),
                "{s:?}"
            );
        }
    }
}
