//! Rate limiters, pause and resume, interrupt suppression, reset.

use super::*;

fn ops_limit(size: u64, refill_ms: u64) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: refill_ms,
        }),
    }
}

#[test]
fn rate_limiter_holds_transmit_frames_until_its_timer_fires() {
    let limiter = RateLimiter::new(&ops_limit(1, 50)).unwrap();
    let mut r = rig_opts(0, QUEUE_SIZE, unlimited(), limiter);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100, i)).collect();
    for f in &frames {
        r.queue_tx(f);
    }
    r.kick_tx();
    let mut got = r.peer.recv_all();
    assert_eq!(got.len(), 1, "one frame fits the bucket");
    // Kicks while throttled change nothing.
    r.kick_tx();
    assert!(r.peer.recv_all().is_empty());
    let timer = r.source_fd(TOKEN_TX_LIMITER);
    while got.len() < 3 {
        assert!(readable_within(timer, 5000), "rate limiter timer never fired");
        r.dev_mut().handle_event(TOKEN_TX_LIMITER);
        got.extend(r.peer.recv_all());
    }
    assert_eq!(got, frames);
    assert_eq!(r.driver.take_used_from(TXQ).len(), 3);
    assert!(r.metrics().tx_throttled >= 2);

    // Lifting the limit at run time; an invalid configuration changes nothing.
    let bad = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: u64::MAX,
        }),
    };
    assert!(r
        .dev_mut()
        .update_rate_limiters(Some(&bad), Some(&RateLimiterConfig::default()))
        .is_err());
    assert_eq!(r.dev().rate_limiters().1, ops_limit(1, 50));
    r.dev_mut()
        .update_rate_limiters(None, Some(&RateLimiterConfig::default()))
        .unwrap();
    for f in &frames {
        r.queue_tx(f);
    }
    r.kick_tx();
    assert_eq!(r.peer.recv_all().len(), 3);
}

#[test]
fn rate_limiter_holds_receive_frames_until_its_timer_fires() {
    let limiter = RateLimiter::new(&ops_limit(1, 50)).unwrap();
    let mut r = rig_opts(0, QUEUE_SIZE, limiter, unlimited());
    for _ in 0..4 {
        r.post_rx(2048);
    }
    r.kick_rx();
    for i in 0..3 {
        r.peer.send(&frame(100, i));
    }
    r.tap_event();
    let mut used = r.driver.take_used_from(RXQ);
    assert_eq!(used.len(), 1);
    assert!(
        r.ctl.frames_read.load(Ordering::SeqCst) <= 2,
        "tap drained while throttled"
    );
    let timer = r.source_fd(TOKEN_RX_LIMITER);
    while used.len() < 3 {
        assert!(readable_within(timer, 5000), "rate limiter timer never fired");
        r.dev_mut().handle_event(TOKEN_RX_LIMITER);
        used.extend(r.driver.take_used_from(RXQ));
    }
    assert!(r.metrics().rx_throttled >= 2);
}

#[test]
fn pause_holds_traffic_and_resume_delivers_it() {
    let mut r = rig();
    for _ in 0..4 {
        r.post_rx(2048);
    }
    r.kick_rx();
    r.driver.transport.pause();
    let out = frame(100, 1);
    let inbound = frame(200, 2);
    r.queue_tx(&out);
    r.kick_tx();
    r.peer.send(&inbound);
    r.tap_event();
    r.kick_rx();
    assert!(r.peer.recv_all().is_empty(), "sent while paused");
    assert!(r.driver.take_used_from(TXQ).is_empty());
    assert!(r.driver.take_used_from(RXQ).is_empty());
    assert_eq!(
        r.ctl.frames_read.load(Ordering::SeqCst),
        0,
        "tap read while paused"
    );
    r.driver.transport.resume();
    assert_eq!(r.peer.recv_all(), vec![out]);
    assert_eq!(r.driver.take_used_from(TXQ).len(), 1);
    assert_eq!(r.driver.take_used_from(RXQ), vec![(0, inbound.len() as u32)]);
    // Pausing and resuming twice is harmless.
    r.driver.transport.pause();
    r.driver.transport.pause();
    r.driver.transport.resume();
    r.driver.transport.resume();
    r.assert_still_serves();
}

#[test]
fn event_idx_suppresses_interrupts_until_the_driver_asks() {
    let mut r = rig();
    // The driver wants to hear only after the fourth used entry (index 3).
    r.driver.set_used_event(TXQ, 3);
    for i in 0..3 {
        r.queue_tx(&frame(60, i));
        r.kick_tx();
    }
    assert_eq!(r.interrupts(), 0);
    r.queue_tx(&frame(60, 3));
    r.kick_tx();
    assert_eq!(r.interrupts(), 1);
    // Transmit notifications: the device asks for the next one after what it has consumed.
    assert_eq!(r.driver.avail_event(TXQ), 4);
}

#[test]
fn reset_forgets_the_waiting_frame_and_restarts() {
    let mut r = rig();
    r.peer.send(&frame(100, 1));
    r.tap_event();
    assert!(r.dev().rx_frame_waiting());
    r.driver.write_reg(0x70, 0);
    assert!(!r.dev().rx_frame_waiting());
    let features = r.driver.device_features();
    assert_eq!(r.driver.init(features, QUEUE_SIZE) & 0x4, 0x4);
    r.next_rx = RX_AREA;
    r.assert_still_serves();
}
