//! Token-bucket rate limiting for I/O devices (virtio-blk now, virtio-net later).
//!
//! A [`RateLimiter`] has up to two [`TokenBucket`]s: one counting bytes, one counting operations. A
//! device asks [`RateLimiter::consume`] before serving a request; when a bucket is short, the call fails
//! and arms a timerfd for the moment enough tokens will have accrued. The device stops processing its
//! queue, and its event loop watches the limiter's fd ([`AsRawFd`]); when it becomes readable the device
//! calls [`RateLimiter::event_handler`] and resumes. Nothing polls in the meantime.
//!
//! Buckets refill lazily: each call computes the tokens earned since the last one from the elapsed
//! time, in integer arithmetic wide enough that no configuration can overflow it.
//!
//! A typical request path, for a device that checks both buckets:
//!
//! ```
//! use devices::rate_limiter::{RateLimiter, TokenType};
//!
//! /// Whether a request of `len` bytes may be served now.
//! fn admit(limiter: &mut RateLimiter, len: u64) -> bool {
//!     if !limiter.consume(1, TokenType::Ops) {
//!         return false; // retry when the limiter's fd fires
//!     }
//!     if !limiter.consume(len, TokenType::Bytes) {
//!         // The request will be retried in full, so the operation it took must not count twice.
//!         limiter.manual_replenish(1, TokenType::Ops);
//!         return false;
//!     }
//!     true
//! }
//! # let mut limiter = RateLimiter::unlimited().unwrap();
//! # assert!(admit(&mut limiter, 4096));
//! ```

mod persist;

use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_api::rate_limiter::{
    RateLimiterConfig, RateLimiterConfigError, TokenBucketConfig, MAX_REFILL_TIME_MS,
};
use vmm_sys_util::timerfd::TimerFd;

pub use persist::{RateLimiterState, TokenBucketState};

const NS_PER_MS: u64 = 1_000_000;

/// The shortest the limiter sleeps once blocked (unless the bucket would be full sooner). Waking for
/// exactly the tokens of the next request would, at high rates and small requests, mean one wake-up per
/// request; sleeping a little longer lets a batch of tokens accrue at no cost to the long-run rate.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Cap on any wait or over-consumption debt (about 136 years), so that adding it to an `Instant` or
/// handing it to the timer cannot overflow whatever a guest asks for.
const MAX_WAIT: Duration = Duration::from_secs(u32::MAX as u64);

/// What went wrong in a rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// The configuration was rejected.
    #[error("invalid rate limiter config")]
    Config(#[from] RateLimiterConfigError),
    /// Creating or driving the timerfd failed.
    #[error("rate limiter timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
    /// [`RateLimiter::event_handler`] was called while the timer had not fired.
    #[error("rate limiter event without an expired timer")]
    SpuriousEvent,
    /// A saved state is inconsistent (for example a budget larger than the bucket).
    #[error("invalid rate limiter state: {0}")]
    InvalidState(&'static str),
}

/// The outcome of [`TokenBucket::reduce`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BucketReduction {
    /// Not enough tokens; nothing was taken.
    Failure,
    /// The tokens were taken.
    Success,
    /// The request was larger than the whole bucket; it was let through because the bucket was full,
    /// which emptied it and left a debt of this many bucket sizes. The bucket refills only once that
    /// debt has been paid off in time.
    OverConsumption(f64),
}

/// Which bucket a [`RateLimiter`] call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes transferred.
    Bytes,
    /// Requests.
    Ops,
}

/// A bucket of up to `size` tokens that refills from empty to full in `refill_time_ms`, plus a
/// `one_time_burst` of extra tokens spent first and never refilled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    initial_one_time_burst: u64,
    refill_time_ms: u64,
    /// What is left of the one-time burst.
    one_time_burst: u64,
    /// Tokens available now, at most `size`.
    budget: u64,
    /// The instant up to which refills have been credited. Advanced only by the time that earned whole
    /// tokens, so fractions carry over to the next refill instead of being lost. In the future while
    /// an over-consumption debt is being paid off (the budget is then 0).
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket of `size` tokens refilled over `refill_time_ms`, with an extra `one_time_burst`.
    /// `None` if `size` or `refill_time_ms` is 0 (no limit) or `refill_time_ms` exceeds
    /// [`MAX_REFILL_TIME_MS`].
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<Self> {
        Self::new_at(size, one_time_burst, refill_time_ms, Instant::now())
    }

    fn new_at(size: u64, one_time_burst: u64, refill_time_ms: u64, now: Instant) -> Option<Self> {
        // These bounds are what keeps the arithmetic below free of division by zero and overflow.
        if size == 0 || refill_time_ms == 0 || refill_time_ms > MAX_REFILL_TIME_MS {
            return None;
        }
        Some(TokenBucket {
            size,
            initial_one_time_burst: one_time_burst,
            refill_time_ms,
            one_time_burst,
            budget: size,
            last_update: now,
        })
    }

    fn from_config_at(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        Self::new_at(config.size, config.one_time_burst, config.refill_time_ms, now)
    }

    /// Capacity in tokens.
    pub fn capacity(&self) -> u64 {
        self.size
    }

    /// Time for an empty bucket to fill, in milliseconds.
    pub fn refill_time_ms(&self) -> u64 {
        self.refill_time_ms
    }

    /// Tokens available as of the last operation, not counting the one-time burst.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// The one-time burst as configured.
    pub fn initial_one_time_burst(&self) -> u64 {
        self.initial_one_time_burst
    }

    /// The configuration this bucket was built from.
    pub fn config(&self) -> TokenBucketConfig {
        TokenBucketConfig {
            size: self.size,
            one_time_burst: self.initial_one_time_burst,
            refill_time_ms: self.refill_time_ms,
        }
    }

    /// Takes `tokens` from the bucket, the one-time burst first. A request larger than the whole bucket
    /// can never be met from the budget alone, so it passes once the bucket is full and leaves a debt
    /// ([`BucketReduction::OverConsumption`]) rather than blocking forever.
    pub fn reduce(&mut self, tokens: u64) -> BucketReduction {
        self.reduce_at(tokens, Instant::now())
    }

    fn reduce_at(&mut self, tokens: u64, now: Instant) -> BucketReduction {
        if tokens <= self.one_time_burst {
            self.one_time_burst -= tokens;
            return BucketReduction::Success;
        }
        let from_budget = tokens - self.one_time_burst;
        self.refill(now);
        if from_budget <= self.budget {
            self.budget -= from_budget;
            self.one_time_burst = 0;
            BucketReduction::Success
        } else if from_budget > self.size && self.budget == self.size {
            let debt = from_budget - self.size;
            self.one_time_burst = 0;
            self.budget = 0;
            // Refills resume once the debt's worth of time has passed.
            self.last_update = add_capped(now, self.time_for(debt));
            BucketReduction::OverConsumption(debt as f64 / self.size as f64)
        } else {
            BucketReduction::Failure
        }
    }

    /// Gives back `tokens` taken by a request that did not go ahead: to the budget first (the part a
    /// request takes last), the rest to the one-time burst, never beyond their configured sizes. A
    /// pending over-consumption debt is paid off before either.
    pub fn force_replenish(&mut self, tokens: u64) {
        self.force_replenish_at(tokens, Instant::now())
    }

    fn force_replenish_at(&mut self, mut tokens: u64, now: Instant) {
        if let Some(debt) = self
            .last_update
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        {
            let refund = self.time_for(tokens);
            if refund < debt {
                // Cannot underflow: `last_update - refund` is still after `now`.
                self.last_update = self.last_update.checked_sub(refund).unwrap_or(now);
                return;
            }
            tokens = tokens.saturating_sub(self.tokens_in(debt));
            self.last_update = now;
        }
        let to_budget = tokens.min(self.size - self.budget);
        self.budget += to_budget;
        let to_burst = (tokens - to_budget).min(self.initial_one_time_burst - self.one_time_burst);
        self.one_time_burst += to_burst;
    }

    /// Credits the tokens earned since `last_update`.
    fn refill(&mut self, now: Instant) {
        if self.budget == self.size {
            // A full bucket earns nothing; counting from now stops idle time from being credited later.
            if now > self.last_update {
                self.last_update = now;
            }
            return;
        }
        // `None` while paying off a debt: nothing earned yet.
        let Some(elapsed) = now.checked_duration_since(self.last_update) else {
            return;
        };
        let earned = self.tokens_in(elapsed);
        let missing = self.size - self.budget;
        if earned >= missing {
            self.budget = self.size;
            self.last_update = now;
        } else {
            self.budget += earned;
            // The time that earned whole tokens; the remainder (under one token's worth) carries over.
            // At most `elapsed`, so this stays at or before `now`.
            self.last_update = add_capped(self.last_update, self.time_for(earned));
        }
    }

    /// Whole tokens earned in `elapsed`, saturating at `u64::MAX`.
    fn tokens_in(&self, elapsed: Duration) -> u64 {
        // elapsed_ns < 2^96 and size < 2^64 would not fit u128 in the worst case, so saturate; any
        // product that large is far beyond a full bucket anyway.
        let earned = elapsed.as_nanos().saturating_mul(u128::from(self.size)) / self.refill_ns();
        u64::try_from(earned).unwrap_or(u64::MAX)
    }

    /// Time to earn `tokens`, rounded up so that waiting this long always earns them; capped at
    /// [`MAX_WAIT`].
    fn time_for(&self, tokens: u64) -> Duration {
        // tokens < 2^64 and refill_ns <= 3.6e12 < 2^42: the product fits u128.
        let ns = (u128::from(tokens) * self.refill_ns()).div_ceil(u128::from(self.size));
        u64::try_from(ns)
            .map(Duration::from_nanos)
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT)
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_time_ms) * u128::from(NS_PER_MS)
    }

    /// How long from `now` until a request of `tokens` could pass, once [`reduce_at`](Self::reduce_at)
    /// failed for it at `now` (so refills are credited up to `now`). At least [`MIN_WAIT`] unless the
    /// bucket fills sooner, and never zero, since a zero timer would never fire.
    fn wait_time_at(&self, tokens: u64, now: Instant) -> Duration {
        let from_budget = tokens.saturating_sub(self.one_time_burst);
        // An over-sized request waits for a full bucket.
        let target = from_budget.min(self.size);
        let until = |budget: u64| {
            let deadline = add_capped(
                self.last_update,
                self.time_for(budget.saturating_sub(self.budget)),
            );
            deadline.saturating_duration_since(now)
        };
        let needed = until(target);
        let full = until(self.size);
        needed.max(MIN_WAIT.min(full)).max(Duration::from_nanos(1))
    }

    /// The bucket that replaces `old` when the configuration becomes `new` at `now`. An unchanged
    /// bucket is kept as is; a changed one keeps its budget (up to the new size), the part of its
    /// one-time burst already spent, and any debt (converted to the new rate), so that reconfiguring
    /// is not a way to get free tokens. A bucket that did not exist before starts full.
    fn updated(old: Option<TokenBucket>, new: Option<&TokenBucketConfig>, now: Instant) -> Option<Self> {
        let new = new?;
        let Some(mut old) = old else {
            return Self::from_config_at(new, now);
        };
        if old.config() == *new {
            return Some(old);
        }
        let mut bucket = Self::from_config_at(new, now)?;
        old.refill(now);
        bucket.budget = old.budget.min(bucket.size);
        let spent_burst = old.initial_one_time_burst - old.one_time_burst;
        bucket.one_time_burst = new.one_time_burst.saturating_sub(spent_burst);
        if let Some(debt) = old
            .last_update
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        {
            let debt_tokens = old.tokens_in(debt);
            bucket.budget = 0;
            bucket.last_update = add_capped(now, bucket.time_for(debt_tokens));
        }
        Some(bucket)
    }
}

fn add_capped(t: Instant, d: Duration) -> Instant {
    // `d` is at most MAX_WAIT, so this only falls back on a clock already near its end of range.
    t.checked_add(d.min(MAX_WAIT)).unwrap_or(t)
}

/// Limits a device's bytes and/or operations per unit of time; see the [module docs](self) for the
/// protocol between it and the device.
///
/// The timerfd exists even without limits so that limits can be enabled at run time, when the seccomp
/// filter may no longer allow creating one.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// Whether the timer is armed or has fired unhandled; consuming fails meanwhile.
    timer_active: bool,
    /// Whether a timer failure was already logged, so a broken timer cannot flood the log.
    timer_error_logged: bool,
}

impl RateLimiter {
    /// A limiter for `config`, which is validated first.
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        config.validate()?;
        let now = Instant::now();
        Self::with_buckets(
            config
                .enabled_bandwidth()
                .and_then(|c| TokenBucket::from_config_at(c, now)),
            config
                .enabled_ops()
                .and_then(|c| TokenBucket::from_config_at(c, now)),
        )
    }

    /// A limiter that never blocks: [`consume`](Self::consume) then costs two branches.
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        Self::with_buckets(None, None)
    }

    fn with_buckets(
        bandwidth: Option<TokenBucket>,
        ops: Option<TokenBucket>,
    ) -> Result<Self, RateLimiterError> {
        Ok(RateLimiter {
            bandwidth,
            ops,
            timer: TimerFd::new().map_err(RateLimiterError::Timer)?,
            timer_active: false,
            timer_error_logged: false,
        })
    }

    /// Takes `tokens` of `token_type`, or returns `false` if they are not available yet. After a
    /// `false` the limiter is blocked (every call fails) until its fd becomes readable and
    /// [`event_handler`](Self::event_handler) is called; retry then. Always succeeds for a type
    /// without a bucket.
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        self.consume_with_clock(tokens, token_type, Instant::now)
    }

    /// [`consume`](Self::consume) with the current time supplied by `now`, called only if a bucket is
    /// involved so the unlimited path does not read the clock.
    fn consume_with_clock(
        &mut self,
        tokens: u64,
        token_type: TokenType,
        now: impl FnOnce() -> Instant,
    ) -> bool {
        if self.timer_active {
            return false;
        }
        let Some(bucket) = self.bucket_mut(token_type) else {
            return true;
        };
        let now = now();
        match bucket.reduce_at(tokens, now) {
            BucketReduction::Success => true,
            BucketReduction::Failure => {
                let wait = bucket.wait_time_at(tokens, now);
                // Without a timer nothing would ever wake the device, so let the request through.
                !self.arm_timer(wait)
            }
            BucketReduction::OverConsumption(_) => {
                // Let this request through but block the next ones until the debt is paid.
                let wait = bucket.wait_time_at(1, now);
                self.arm_timer(wait);
                true
            }
        }
    }

    /// Gives back `tokens` of `token_type` taken by a request that then did not go ahead, typically
    /// because the other bucket was short. Does nothing for a type without a bucket.
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        if let Some(bucket) = self.bucket_mut(token_type) {
            bucket.force_replenish(tokens);
        }
    }

    /// Whether a [`consume`](Self::consume) failed (or over-consumed) and the timer has not been
    /// handled yet; the device should not process requests meanwhile.
    pub fn is_blocked(&self) -> bool {
        self.timer_active
    }

    /// Call when the limiter's fd is readable: acknowledges the timer and unblocks the limiter.
    /// Returns [`RateLimiterError::SpuriousEvent`] (and changes nothing) if the timer has not fired.
    pub fn event_handler(&mut self) -> Result<(), RateLimiterError> {
        if !self.timer_active {
            return Err(RateLimiterError::SpuriousEvent);
        }
        // The timerfd is blocking, so read it only once it has expired. A one-shot timer that was armed
        // (always with a non-zero time) and is no longer armed has expired and has a count to read.
        if self.timer.is_armed().map_err(RateLimiterError::Timer)? {
            return Err(RateLimiterError::SpuriousEvent);
        }
        self.timer.wait().map_err(RateLimiterError::Timer)?;
        self.timer_active = false;
        Ok(())
    }

    /// Replaces the limits with `config` (validated first) while the device runs. A bucket that is
    /// absent or all zero in `config` is removed; an unchanged one is untouched; a changed one keeps
    /// its current budget (at most the new size), spent burst and debt. A blocked limiter has its timer
    /// fire right away so the device retries under the new limits.
    pub fn update_buckets(&mut self, config: &RateLimiterConfig) -> Result<(), RateLimiterError> {
        self.update_buckets_at(config, Instant::now())
    }

    fn update_buckets_at(
        &mut self,
        config: &RateLimiterConfig,
        now: Instant,
    ) -> Result<(), RateLimiterError> {
        config.validate()?;
        self.bandwidth = TokenBucket::updated(self.bandwidth.take(), config.enabled_bandwidth(), now);
        self.ops = TokenBucket::updated(self.ops.take(), config.enabled_ops(), now);
        if self.timer_active {
            self.arm_timer(Duration::from_nanos(1));
        }
        Ok(())
    }

    /// The current limits, as a configuration.
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// Whether no bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// The bytes bucket, if any.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if any.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    fn bucket_mut(&mut self, token_type: TokenType) -> Option<&mut TokenBucket> {
        match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        }
    }

    /// Arms the one-shot timer for `wait` (non-zero) and blocks the limiter. Returns whether the timer
    /// is running; on failure the limiter stays unblocked, since nothing would unblock it.
    fn arm_timer(&mut self, wait: Duration) -> bool {
        match self.timer.reset(wait.max(Duration::from_nanos(1)), None) {
            Ok(()) => {
                self.timer_active = true;
                true
            }
            Err(e) => {
                if !self.timer_error_logged {
                    self.timer_error_logged = true;
                    log::error!("rate limiter: cannot arm timer, not limiting: {e}");
                }
                false
            }
        }
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd to watch for readability; call [`RateLimiter::event_handler`] when it is.
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

impl TryFrom<&RateLimiterConfig> for RateLimiter {
    type Error = RateLimiterError;

    fn try_from(config: &RateLimiterConfig) -> Result<Self, Self::Error> {
        RateLimiter::new(config)
    }
}

#[cfg(test)]
mod tests;
