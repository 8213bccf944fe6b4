//! Bucket arithmetic is tested with made-up instants, so nothing depends on how fast the test runs;
//! only the timerfd tests use real time, and they wait for readiness rather than measure it.

use std::os::unix::io::AsRawFd;

use super::*;
use crate::virtio::test_utils::readable_within;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn bucket_config(size: u64, one_time_burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
    TokenBucketConfig {
        size,
        one_time_burst,
        refill_time_ms,
    }
}

fn limiter(bandwidth: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) -> RateLimiter {
    RateLimiter::new(&RateLimiterConfig { bandwidth, ops }).unwrap()
}

/// Generous: these tests wait for timers of a few milliseconds, and must not flake on a loaded host.
const PATIENCE_MS: i32 = 10_000;

#[test]
fn new_rejects_zero_and_out_of_range_buckets() {
    let t0 = Instant::now();
    assert!(TokenBucket::new_at(0, 10, 100, t0).is_none());
    assert!(TokenBucket::new_at(10, 10, 0, t0).is_none());
    assert!(TokenBucket::new_at(10, 0, MAX_REFILL_TIME_MS + 1, t0).is_none());
    let b = TokenBucket::new(10, 5, 100).unwrap();
    assert_eq!(
        (
            b.capacity(),
            b.budget(),
            b.one_time_burst(),
            b.initial_one_time_burst()
        ),
        (10, 10, 5, 5)
    );
    assert_eq!(b.refill_time_ms(), 100);
    assert_eq!(b.config(), bucket_config(10, 5, 100));
}

#[test]
fn refills_with_elapsed_time_up_to_capacity() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new_at(1000, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(1000, t0), BucketReduction::Success);
    assert_eq!(b.reduce_at(1, t0), BucketReduction::Failure);
    assert_eq!(b.budget(), 0);

    // One token per millisecond.
    assert_eq!(b.reduce_at(501, t0 + ms(500)), BucketReduction::Failure);
    assert_eq!(b.budget(), 500);
    assert_eq!(b.reduce_at(500, t0 + ms(500)), BucketReduction::Success);
    assert_eq!(b.reduce_at(1, t0 + ms(500)), BucketReduction::Failure);

    // Long idle time fills the bucket, no more.
    b.refill(t0 + ms(60_000));
    assert_eq!(b.budget(), 1000);
    // Time spent full is not credited later.
    assert_eq!(b.reduce_at(1000, t0 + ms(120_000)), BucketReduction::Success);
    b.refill(t0 + ms(120_010));
    assert_eq!(b.budget(), 10);
}

#[test]
fn fractions_of_a_token_carry_over() {
    let t0 = Instant::now();
    // One token every 333.3 ms.
    let mut b = TokenBucket::new_at(3, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(3, t0), BucketReduction::Success);
    b.refill(t0 + ms(400));
    assert_eq!(b.budget(), 1);
    // 300 ms since the last refill earns nothing alone, but 700 ms in total earn 2 tokens.
    b.refill(t0 + ms(700));
    assert_eq!(b.budget(), 2);
    // Many tiny steps earn as much as one big one.
    let mut b = TokenBucket::new_at(1000, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(1000, t0), BucketReduction::Success);
    for step in 1..=1000u64 {
        b.refill(t0 + Duration::from_micros(step * 300));
    }
    assert_eq!(b.budget(), 300);
}

#[test]
fn one_time_burst_is_spent_first_and_not_refilled() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new_at(100, 50, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(30, t0), BucketReduction::Success);
    assert_eq!((b.one_time_burst(), b.budget()), (20, 100));
    // Straddles the burst and the budget.
    assert_eq!(b.reduce_at(40, t0), BucketReduction::Success);
    assert_eq!((b.one_time_burst(), b.budget()), (0, 80));
    b.refill(t0 + ms(10_000));
    assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    assert_eq!(b.initial_one_time_burst(), 50);
}

#[test]
fn failure_leaves_the_bucket_untouched() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new_at(100, 10, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(110, t0), BucketReduction::Success);
    let before = b.clone();
    assert_eq!(b.reduce_at(50, t0), BucketReduction::Failure);
    assert_eq!(b, before);
}

#[test]
fn oversized_request_passes_when_full_and_leaves_a_debt() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new_at(100, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(250, t0), BucketReduction::OverConsumption(1.5));
    assert_eq!(b.budget(), 0);
    // The 150-token debt takes 1.5 s to pay off; nothing is earned before that.
    assert_eq!(b.reduce_at(1, t0 + ms(1400)), BucketReduction::Failure);
    assert_eq!(b.wait_time_at(1, t0 + ms(1400)), ms(110));
    b.refill(t0 + ms(1500));
    assert_eq!(b.budget(), 0);
    // A full bucket a second after that.
    assert_eq!(b.reduce_at(100, t0 + ms(2500)), BucketReduction::Success);

    // Not full: the oversized request waits until it is, then passes.
    let mut b = TokenBucket::new_at(100, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(50, t0), BucketReduction::Success);
    assert_eq!(b.reduce_at(250, t0), BucketReduction::Failure);
    assert_eq!(b.wait_time_at(250, t0), ms(500));
    assert_eq!(
        b.reduce_at(250, t0 + ms(500)),
        BucketReduction::OverConsumption(1.5)
    );

    // The burst counts towards an oversized request.
    let mut b = TokenBucket::new_at(100, 100, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(250, t0), BucketReduction::OverConsumption(0.5));
    assert_eq!((b.one_time_burst(), b.budget()), (0, 0));
}

#[test]
fn wait_time_covers_the_shortfall_with_a_floor() {
    let t0 = Instant::now();
    // One token per millisecond.
    let mut b = TokenBucket::new_at(1000, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(1000, t0), BucketReduction::Success);
    assert_eq!(b.wait_time_at(100, t0), ms(100));
    assert_eq!(b.wait_time_at(100, t0 + ms(30)), ms(70));
    // Waking for a single token would be wasteful: wait MIN_WAIT.
    assert_eq!(b.wait_time_at(1, t0 + Duration::from_micros(10)), MIN_WAIT);
    // Waiting the computed time always earns the tokens, despite rounding (1 token per 333.3 ms).
    let mut b = TokenBucket::new_at(3, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(3, t0), BucketReduction::Success);
    let wait = b.wait_time_at(1, t0);
    assert_eq!(b.reduce_at(1, t0 + wait), BucketReduction::Success);
    // ...but never past the moment the bucket is full: 1 ms refill, 9 of 10 tokens left.
    let mut b = TokenBucket::new_at(10, 0, 1, t0).unwrap();
    assert_eq!(b.reduce_at(1, t0), BucketReduction::Success);
    assert_eq!(b.wait_time_at(10, t0), Duration::from_micros(100));
    // The burst still available counts.
    let mut b = TokenBucket::new_at(1000, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(1000, t0), BucketReduction::Success);
    b.one_time_burst = 40;
    assert_eq!(b.wait_time_at(100, t0), ms(60));
}

#[test]
fn force_replenish_refills_budget_then_burst_and_pays_debt() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new_at(100, 50, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(120, t0), BucketReduction::Success);
    assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
    b.force_replenish_at(120, t0);
    assert_eq!((b.one_time_burst(), b.budget()), (50, 100));
    // Never beyond the configured sizes.
    b.force_replenish_at(u64::MAX, t0);
    assert_eq!((b.one_time_burst(), b.budget()), (50, 100));

    let mut b = TokenBucket::new_at(100, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(300, t0), BucketReduction::OverConsumption(2.0));
    // 2 s of debt; giving back 100 tokens removes 1 s of it.
    b.force_replenish_at(100, t0);
    assert_eq!(b.last_update, t0 + ms(1000));
    assert_eq!(b.budget(), 0);
    // Giving back more than the debt clears it and refills with the rest.
    b.force_replenish_at(150, t0);
    assert_eq!(b.last_update, t0);
    assert_eq!(b.budget(), 50);
}

#[test]
fn huge_values_do_not_overflow() {
    let t0 = Instant::now();
    let far = t0 + Duration::from_secs(100 * 365 * 24 * 3600);
    let mut b = TokenBucket::new_at(u64::MAX, u64::MAX, MAX_REFILL_TIME_MS, t0).unwrap();
    assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
    assert_eq!(b.reduce_at(u64::MAX, t0), BucketReduction::Success);
    assert_eq!(b.reduce_at(1, t0), BucketReduction::Failure);
    assert!(b.wait_time_at(u64::MAX, t0) <= ms(MAX_REFILL_TIME_MS));
    b.refill(far);
    assert_eq!(b.budget(), u64::MAX);
    assert_eq!(b.tokens_in(Duration::MAX), u64::MAX);

    // The smallest bucket and the slowest refill, asked for everything: the debt is capped.
    let mut b = TokenBucket::new_at(1, 0, MAX_REFILL_TIME_MS, t0).unwrap();
    assert!(matches!(
        b.reduce_at(u64::MAX, t0),
        BucketReduction::OverConsumption(_)
    ));
    assert_eq!(b.time_for(u64::MAX), MAX_WAIT);
    assert!(b.wait_time_at(u64::MAX, t0) >= MAX_WAIT);
    assert_eq!(b.reduce_at(1, far), BucketReduction::Failure);
    b.force_replenish_at(u64::MAX, t0);
    assert_eq!(b.budget(), 1);

    // Any duration added to an instant is capped rather than overflowing.
    assert_eq!(add_capped(t0, Duration::MAX), t0 + MAX_WAIT);
}

#[test]
fn unlimited_never_blocks() {
    let mut l = RateLimiter::unlimited().unwrap();
    assert!(l.is_unlimited());
    for _ in 0..1000 {
        assert!(l.consume(u64::MAX, TokenType::Bytes));
        assert!(l.consume(u64::MAX, TokenType::Ops));
    }
    assert!(!l.is_blocked());
    // It never needs the clock.
    assert!(l.consume_with_clock(1, TokenType::Bytes, || unreachable!()));
    assert!(!readable_within(l.as_raw_fd(), 0));
    assert!(matches!(l.event_handler(), Err(RateLimiterError::SpuriousEvent)));
    l.manual_replenish(10, TokenType::Ops);
    assert_eq!(l.config(), RateLimiterConfig::default());
    // All-zero buckets are unlimited too.
    let l = limiter(Some(bucket_config(0, 0, 0)), None);
    assert!(l.is_unlimited());
}

#[test]
fn blocked_limiter_arms_timer_and_unblocks_on_event() {
    // 1000 bytes per 20 ms: the timer fires within milliseconds.
    let mut l = limiter(Some(bucket_config(1000, 0, 20)), None);
    assert!(l.consume(1000, TokenType::Bytes));
    assert!(!l.is_blocked());
    assert!(!l.consume(500, TokenType::Bytes));
    assert!(l.is_blocked());
    // While blocked, everything waits, even the unlimited ops.
    assert!(!l.consume(1, TokenType::Ops));
    assert!(!l.consume(1, TokenType::Bytes));

    assert!(readable_within(l.as_raw_fd(), PATIENCE_MS));
    l.event_handler().unwrap();
    assert!(!l.is_blocked());
    assert!(!readable_within(l.as_raw_fd(), 0));
    // The timer fired when the tokens were there.
    assert!(l.consume(500, TokenType::Bytes));
    assert!(matches!(l.event_handler(), Err(RateLimiterError::SpuriousEvent)));
}

#[test]
fn event_before_the_timer_fires_is_spurious() {
    let mut l = limiter(None, Some(bucket_config(1, 0, MAX_REFILL_TIME_MS)));
    assert!(l.consume(1, TokenType::Ops));
    assert!(!l.consume(1, TokenType::Ops));
    assert!(matches!(l.event_handler(), Err(RateLimiterError::SpuriousEvent)));
    assert!(l.is_blocked());
    // Bytes are unlimited, but a blocked limiter blocks them too.
    assert!(!l.consume(1, TokenType::Bytes));
}

#[test]
fn over_consumption_passes_then_blocks() {
    let mut l = limiter(Some(bucket_config(100, 0, 10)), None);
    assert!(l.consume(150, TokenType::Bytes));
    assert!(l.is_blocked());
    assert!(!l.consume(1, TokenType::Bytes));
    assert!(readable_within(l.as_raw_fd(), PATIENCE_MS));
    l.event_handler().unwrap();
    assert!(!l.is_blocked());
}

#[test]
fn manual_replenish_returns_tokens_to_the_right_bucket() {
    let mut l = limiter(
        Some(bucket_config(1000, 0, MAX_REFILL_TIME_MS)),
        Some(bucket_config(10, 0, MAX_REFILL_TIME_MS)),
    );
    // One instant for every call, so no tokens accrue in between.
    let t = Instant::now();
    assert!(l.consume_with_clock(1, TokenType::Ops, || t));
    assert!(l.consume_with_clock(600, TokenType::Bytes, || t));
    // The next request gets its op but not its bytes, so the op goes back.
    assert!(l.consume_with_clock(1, TokenType::Ops, || t));
    assert!(!l.consume_with_clock(600, TokenType::Bytes, || t));
    l.ops.as_mut().unwrap().force_replenish_at(1, t);
    assert_eq!(l.ops().unwrap().budget(), 9);
    assert_eq!(l.bandwidth().unwrap().budget(), 400);
}

#[test]
fn invalid_config_is_rejected_naming_the_field() {
    let config = RateLimiterConfig {
        bandwidth: Some(bucket_config(10, 0, 0)),
        ops: None,
    };
    let err = RateLimiter::try_from(&config).unwrap_err();
    assert!(matches!(
        &err,
        RateLimiterError::Config(RateLimiterConfigError::Invalid {
            field: "bandwidth.refill_time_ms",
            ..
        })
    ));
    let mut l = RateLimiter::unlimited().unwrap();
    assert!(l.update_buckets(&config).is_err());
    assert!(l.is_unlimited());
}

#[test]
fn update_buckets_at_run_time() {
    let slow = MAX_REFILL_TIME_MS;
    let mut l = limiter(Some(bucket_config(1000, 0, slow)), None);
    // One instant for every call, so no tokens accrue in between.
    let t = Instant::now();
    assert!(l.consume_with_clock(600, TokenType::Bytes, || t));

    // Shrinking keeps what is left, up to the new size.
    let config = RateLimiterConfig {
        bandwidth: Some(bucket_config(300, 0, slow)),
        ops: Some(bucket_config(5, 0, slow)),
    };
    l.update_buckets_at(&config, t).unwrap();
    assert_eq!(l.config(), config);
    assert_eq!(l.bandwidth().unwrap().budget(), 300);
    // A new bucket starts full.
    assert_eq!(l.ops().unwrap().budget(), 5);
    // Growing does not hand out tokens.
    let config = RateLimiterConfig {
        bandwidth: Some(bucket_config(2000, 0, slow)),
        ..config
    };
    l.update_buckets_at(&config, t).unwrap();
    assert_eq!(l.bandwidth().unwrap().budget(), 300);
    assert!(l.consume_with_clock(300, TokenType::Bytes, || t));

    // Blocked, then the limit is lifted: the timer fires right away and the device can go on.
    assert!(!l.consume_with_clock(1, TokenType::Bytes, || t));
    assert!(l.is_blocked());
    l.update_buckets(&RateLimiterConfig {
        bandwidth: Some(bucket_config(0, 0, 0)),
        ops: config.ops,
    })
    .unwrap();
    assert_eq!(l.bandwidth(), None);
    assert!(readable_within(l.as_raw_fd(), PATIENCE_MS));
    l.event_handler().unwrap();
    assert!(l.consume(u64::MAX, TokenType::Bytes));

    l.update_buckets(&RateLimiterConfig::default()).unwrap();
    assert!(l.is_unlimited());
}

#[test]
fn updated_bucket_keeps_spent_burst_and_debt() {
    let t0 = Instant::now();
    let old = TokenBucket::new_at(100, 100, 1000, t0).unwrap();
    let mut spent = old.clone();
    assert_eq!(spent.reduce_at(30, t0), BucketReduction::Success);

    // Unchanged: the very same bucket.
    let same = TokenBucket::updated(Some(spent.clone()), Some(&old.config()), t0).unwrap();
    assert_eq!(same, spent);
    // 30 of the burst were spent, whatever the new burst.
    let b = TokenBucket::updated(Some(spent.clone()), Some(&bucket_config(100, 50, 1000)), t0).unwrap();
    assert_eq!((b.one_time_burst(), b.initial_one_time_burst()), (20, 50));
    let b = TokenBucket::updated(Some(spent.clone()), Some(&bucket_config(100, 20, 1000)), t0).unwrap();
    assert_eq!(b.one_time_burst(), 0);
    assert_eq!(b.budget(), 100);
    assert!(TokenBucket::updated(Some(spent), None, t0).is_none());

    // A debt of 100 tokens (1 s at the old rate) becomes 0.5 s at twice the rate.
    let mut b = TokenBucket::new_at(100, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(200, t0), BucketReduction::OverConsumption(1.0));
    let b = TokenBucket::updated(Some(b), Some(&bucket_config(100, 0, 500)), t0).unwrap();
    assert_eq!(b.budget(), 0);
    assert_eq!(b.last_update, t0 + ms(500));
    // Tokens earned before the change are kept.
    let mut b = TokenBucket::new_at(100, 0, 1000, t0).unwrap();
    assert_eq!(b.reduce_at(100, t0), BucketReduction::Success);
    let b = TokenBucket::updated(Some(b), Some(&bucket_config(1000, 0, 1000)), t0 + ms(250)).unwrap();
    assert_eq!(b.budget(), 25);
}
