//! The balloon against the in-memory driver: what a Linux guest does, and what a hostile one might.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;

use super::device::{MAX_PFNS_PER_BUFFER, TOKEN_STATS_TIMER};
use super::*;
use crate::bus::BusDevice;
use crate::virtio::test_utils::{readable_within, Desc, TestDriver, DATA_START, F_NEXT, MEM_SIZE};
use crate::virtio::{feature, VirtioDevice, VIRTIO_F_VERSION_1};

const INFLATE: u16 = 0;
const DEFLATE: u16 = 1;
const PAGE: u64 = BALLOON_PAGE_SIZE;
/// Page numbers of the data area, well clear of the rings and of PFN buffers (at DATA_START).
const FIRST_PFN: u32 = ((DATA_START + (1 << 20)) / PAGE) as u32;
/// Where tests put the buffers they send.
const BUF: u64 = DATA_START;

fn spec() -> BalloonSpec {
    BalloonSpec {
        target_pages: 0,
        deflate_on_oom: true,
        stats_interval_s: 1,
        free_page_reporting: true,
    }
}

fn all_features() -> u64 {
    feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_BALLOON_F_STATS_VQ)
        | feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        | feature(VIRTIO_BALLOON_F_REPORTING)
}

fn started(spec: BalloonSpec, features: u64) -> TestDriver<Balloon> {
    let mut d = TestDriver::new(Balloon::new(spec).unwrap());
    let status = d.init(features, QUEUE_SIZE);
    assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0, "status {status:#x}");
    d
}

fn counters(d: &TestDriver<Balloon>) -> vmm_api::balloon::BalloonCounters {
    d.transport.device().metrics().snapshot()
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Fills page `pfn` with a non-zero byte.
fn fill(d: &TestDriver<Balloon>, pfn: u32) {
    d.write(u64::from(pfn) * PAGE, &[0xa5; PAGE as usize]);
}

fn is_zero(d: &TestDriver<Balloon>, pfn: u32) -> bool {
    d.read(u64::from(pfn) * PAGE, PAGE as usize)
        .iter()
        .all(|&b| b == 0)
}

/// Sends `pfns` on queue `q` in one readable buffer and lets the device serve it.
fn send_pfns(d: &mut TestDriver<Balloon>, q: u16, pfns: &[u32]) -> Vec<(u32, u32)> {
    let bytes = pfn_bytes(pfns);
    d.write(BUF, &bytes);
    d.add_chain_to(q, &[Desc::readable(BUF, bytes.len() as u32)]);
    d.kick_queue(q);
    d.take_used_from(q)
}

fn stat(tag: u16, value: u64) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend_from_slice(&value.to_le_bytes());
    v
}

#[test]
fn offers_features_per_configuration_and_shows_the_target() {
    let mut d = TestDriver::new(Balloon::new(spec()).unwrap());
    assert_eq!(d.device_features(), all_features());
    assert_eq!(d.read_reg(0x008), TYPE_BALLOON);
    let plain = Balloon::new(BalloonSpec::default()).unwrap();
    assert_eq!(plain.avail_features(), feature(VIRTIO_F_VERSION_1));
    assert_eq!(plain.queue_max_sizes().len(), 2);
    assert!(Balloon::new(BalloonSpec {
        stats_interval_s: 3601,
        ..BalloonSpec::default()
    })
    .is_err());

    let mut d = started(spec(), all_features());
    d.transport.device_mut().set_target_pages(1234);
    let generation = d.read_reg(0xfc);
    d.transport.notify_config_change();
    assert_ne!(d.read_reg(0xfc), generation);
    assert_eq!(d.read_reg(0x060) & 2, 2, "configuration change interrupt");
    assert_eq!(d.read_reg(0x100), 1234);
    // The driver writes `actual`, byte by byte or whole; num_pages and beyond are read-only.
    d.write_reg(0x104, 1000);
    d.write_reg(0x100, 7);
    d.transport.write(0x105, &[0x10]);
    d.transport.write(0x10c, &[0xff; 4]);
    assert_eq!(d.read_reg(0x100), 1234);
    assert_eq!(d.read_reg(0x104), 0x10e8);
    assert_eq!(d.read_reg(0x10c), 0);
    let info = d.transport.device().info();
    assert_eq!(
        (info.target_pages, info.actual_pages, info.target_mib),
        (1234, 0x10e8, 4)
    );
}

#[test]
fn inflation_releases_pages_and_deflation_only_counts() {
    let mut d = started(spec(), all_features());
    let pfns = [FIRST_PFN, FIRST_PFN + 1, FIRST_PFN + 2, FIRST_PFN + 10];
    for &p in &pfns {
        fill(&d, p);
    }
    fill(&d, FIRST_PFN + 3);
    assert!(!is_zero(&d, FIRST_PFN));
    while readable_within(d.irq.as_raw_fd(), 0) {
        let _ = d.irq.read();
    }
    let used = send_pfns(&mut d, INFLATE, &pfns);
    assert_eq!(used.len(), 1);
    assert!(readable_within(d.irq.as_raw_fd(), 0), "used buffer interrupt");
    for &p in &pfns {
        assert!(is_zero(&d, p), "page {p} released");
    }
    assert!(
        !is_zero(&d, FIRST_PFN + 3),
        "a page not in the balloon is untouched"
    );
    assert_eq!(counters(&d).inflated_pages, 4);

    fill(&d, FIRST_PFN);
    let used = send_pfns(&mut d, DEFLATE, &pfns[..2]);
    assert_eq!(used.len(), 1);
    assert!(!is_zero(&d, FIRST_PFN), "deflation leaves memory alone");
    let c = counters(&d);
    assert_eq!((c.deflated_pages, c.invalid_pages, c.invalid_requests), (2, 0, 0));
}

#[test]
fn page_numbers_outside_guest_ram_are_counted_and_skipped() {
    let mut d = started(spec(), all_features());
    fill(&d, FIRST_PFN);
    let beyond = (MEM_SIZE as u64 / PAGE) as u32;
    let used = send_pfns(&mut d, INFLATE, &[beyond, u32::MAX, FIRST_PFN, beyond + 1]);
    assert_eq!(used.len(), 1);
    assert!(is_zero(&d, FIRST_PFN));
    let c = counters(&d);
    assert_eq!((c.inflated_pages, c.invalid_pages), (1, 3));
}

#[test]
fn malformed_buffers_are_refused_and_the_queue_keeps_working() {
    let mut d = started(spec(), all_features());
    fill(&d, FIRST_PFN);
    d.write(BUF, &pfn_bytes(&[FIRST_PFN]));
    // Wrong direction, a length that is not whole page numbers, a buffer outside guest memory,
    // one with more page numbers than allowed.
    d.add_chain_to(INFLATE, &[Desc::writable(BUF, 4)]);
    d.add_chain_to(INFLATE, &[Desc::readable(BUF, 3)]);
    d.add_chain_to(INFLATE, &[Desc::readable(MEM_SIZE as u64 - 2, 4)]);
    d.add_chain_to(
        INFLATE,
        &[Desc::readable(BUF, 4 * (MAX_PFNS_PER_BUFFER as u32 + 1))],
    );
    d.add_chain_to(INFLATE, &[Desc::readable(u64::MAX - 3, 4)]);
    d.kick_queue(INFLATE);
    assert_eq!(d.take_used_from(INFLATE).len(), 5);
    assert!(!is_zero(&d, FIRST_PFN), "nothing was released");
    assert_eq!(counters(&d).invalid_requests, 5);

    // A chain that loops on itself ends at the queue size: the same page, many times.
    d.write_desc_to(INFLATE, 20, Desc::readable(BUF, 4), 20);
    d.write_desc_to(
        INFLATE,
        20,
        Desc {
            addr: BUF,
            len: 4,
            flags: F_NEXT,
        },
        20,
    );
    d.publish_to(INFLATE, 20);
    d.kick_queue(INFLATE);
    assert_eq!(d.take_used_from(INFLATE).len(), 1);

    // And a proper one still works.
    fill(&d, FIRST_PFN + 1);
    assert_eq!(send_pfns(&mut d, INFLATE, &[FIRST_PFN + 1]).len(), 1);
    assert!(is_zero(&d, FIRST_PFN + 1));
}

#[test]
fn a_driver_that_lies_about_its_ring_gets_nothing_served() {
    let mut d = started(spec(), all_features());
    fill(&d, FIRST_PFN);
    d.write(BUF, &pfn_bytes(&[FIRST_PFN]));
    d.add_chain_to(INFLATE, &[Desc::readable(BUF, 4)]);
    d.set_avail_idx_of(INFLATE, 1000);
    d.kick_queue(INFLATE);
    assert!(d.take_used_from(INFLATE).is_empty());
    assert!(!is_zero(&d, FIRST_PFN));
    // Out-of-range descriptor heads in the available ring are refused by the queue, too.
    let mut d = started(spec(), all_features());
    d.publish_to(INFLATE, QUEUE_SIZE + 5);
    d.kick_queue(INFLATE);
    assert!(d.take_used_from(INFLATE).is_empty());
}

#[test]
fn statistics_are_parsed_held_and_returned_on_each_poll() {
    let mut d = started(spec(), all_features());
    let mut bytes = stat(4, 100 << 20);
    bytes.extend(stat(5, 256 << 20));
    bytes.extend(stat(200, 1)); // unknown tag
    d.write(BUF, &bytes);
    let head = d.add_chain_to(2, &[Desc::readable(BUF, bytes.len() as u32)]);
    d.kick_queue(2);
    assert!(d.take_used_from(2).is_empty(), "held until the next poll");
    let info = d.transport.device().info();
    let stats = info.stats.unwrap();
    assert_eq!(stats.free_memory, Some(100 << 20));
    assert_eq!(stats.total_memory, Some(256 << 20));
    assert_eq!(info.counters.stats_updates, 1);

    d.transport.device_mut().handle_event(TOKEN_STATS_TIMER);
    assert_eq!(d.take_used_from(2), vec![(u32::from(head), 0)]);
    // A poll with nothing held does nothing.
    d.transport.device_mut().handle_event(TOKEN_STATS_TIMER);
    assert!(d.take_used_from(2).is_empty());

    // A write-only statistics buffer is refused but still held (the driver waits for it).
    d.add_chain_to(2, &[Desc::writable(BUF, 10)]);
    d.kick_queue(2);
    assert_eq!(counters(&d).invalid_requests, 1);
    // A second buffer while one is held returns the first at once.
    d.add_chain_to(2, &[Desc::readable(BUF, 10)]);
    d.kick_queue(2);
    assert_eq!(d.take_used_from(2).len(), 1);

    assert!(d.transport.device_mut().set_stats_interval(5).is_ok());
    assert!(d.transport.device_mut().set_stats_interval(0).is_err());
    let mut plain = Balloon::new(BalloonSpec::default()).unwrap();
    assert!(matches!(
        plain.set_stats_interval(1),
        Err(BalloonError::StatsDisabled)
    ));
}

#[test]
fn the_statistics_timer_fires_on_its_own() {
    let d = started(spec(), all_features());
    let sources = d.transport.device().event_sources();
    let timer = sources.iter().find(|s| s.token == TOKEN_STATS_TIMER).unwrap();
    assert!(readable_within(timer.fd, 3000), "timer armed with a 1 s period");
}

#[test]
fn free_page_reports_release_whole_pages_inside_guest_ram() {
    let mut d = started(spec(), all_features());
    for p in FIRST_PFN..FIRST_PFN + 8 {
        fill(&d, p);
    }
    let at = |p: u32| u64::from(p) * PAGE;
    d.add_chain_to(
        3,
        &[
            Desc::writable(at(FIRST_PFN), 2 * PAGE as u32),
            // Unaligned: only the whole page inside is released.
            Desc::writable(at(FIRST_PFN + 4) - 100, PAGE as u32 + 200),
            Desc::writable(MEM_SIZE as u64 - PAGE, 2 * PAGE as u32),
            Desc::readable(at(FIRST_PFN + 6), PAGE as u32),
            Desc::writable(at(FIRST_PFN + 7), 10),
        ],
    );
    d.kick_queue(3);
    assert_eq!(d.take_used_from(3).len(), 1);
    for p in [FIRST_PFN, FIRST_PFN + 1, FIRST_PFN + 4, FIRST_PFN + 6] {
        assert!(is_zero(&d, p), "page {p}");
    }
    for p in [FIRST_PFN + 2, FIRST_PFN + 3, FIRST_PFN + 5, FIRST_PFN + 7] {
        assert!(!is_zero(&d, p), "page {p}");
    }
    let c = counters(&d);
    assert_eq!((c.reports, c.reported_bytes, c.invalid_pages), (1, 4 * PAGE, 2));
}

#[test]
fn optional_queues_shift_down_when_their_feature_is_not_taken() {
    // Statistics offered but not accepted: queue 2 is the reporting queue.
    let features = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BALLOON_F_REPORTING);
    let mut d = started(spec(), features);
    assert_eq!(d.transport.device().live_queues().len(), 3);
    fill(&d, FIRST_PFN);
    d.add_chain_to(2, &[Desc::writable(u64::from(FIRST_PFN) * PAGE, PAGE as u32)]);
    d.kick_queue(2);
    assert_eq!(d.take_used_from(2).len(), 1);
    assert!(is_zero(&d, FIRST_PFN));
    // Events for the queue the driver did not set up are consumed and ignored.
    d.kick_queue(3);
    assert!(d.transport.device().info().stats.is_none());
}

#[test]
fn pause_holds_buffers_until_resume() {
    let mut d = started(spec(), all_features());
    fill(&d, FIRST_PFN);
    d.transport.pause();
    assert!(send_pfns(&mut d, INFLATE, &[FIRST_PFN]).is_empty());
    assert!(!is_zero(&d, FIRST_PFN));
    d.transport.resume();
    assert_eq!(d.take_used_from(INFLATE).len(), 1);
    assert!(is_zero(&d, FIRST_PFN));
}

#[test]
fn state_survives_save_and_restore_including_the_held_statistics_buffer() {
    let mut d = started(spec(), all_features());
    d.transport.device_mut().set_target_pages(512);
    d.write_reg(0x104, 300);
    d.write(BUF, &stat(4, 1));
    let head = d.add_chain_to(2, &[Desc::readable(BUF, 10)]);
    d.kick_queue(2);
    d.transport.pause();
    let device_state = d.transport.device().save_state();
    let transport_state = d.transport.save();
    assert_eq!(device_state.stats_head, Some(head));
    assert_eq!(transport_state.queues.len(), 4);

    let mut restored = TestDriver::new(Balloon::new(spec()).unwrap());
    // The same guest memory: the rings live there.
    restored.transport = crate::virtio::mmio::MmioTransport::new(
        Balloon::new(spec()).unwrap(),
        d.mem.clone(),
        std::sync::Arc::new(crate::virtio::Interrupt::new(restored.irq.try_clone().unwrap())),
    );
    restored
        .transport
        .device_mut()
        .restore_state(&device_state)
        .unwrap();
    restored.transport.restore(&transport_state).unwrap();
    restored.transport.resume();
    let info = restored.transport.device().info();
    assert_eq!((info.target_pages, info.actual_pages), (512, 300));
    restored.transport.device_mut().handle_event(TOKEN_STATS_TIMER);
    let used_idx: u16 =
        vm_memory::Bytes::read_obj(&d.mem, vm_memory::GuestAddress(2 * 0x1_0000 + 0x9000 + 2)).unwrap();
    assert_eq!(
        used_idx, 1,
        "the held statistics buffer came back after the restore"
    );

    let mut other = Balloon::new(BalloonSpec::default()).unwrap();
    assert!(other.restore_state(&device_state).is_err());
    assert!(d.transport.device().metrics().events.load(Ordering::Relaxed) > 0);
}
