//! The downtime a client of the guest sees: an endpoint on the guest's network sends a numbered
//! UDP datagram every few milliseconds to the guest probe's UDP echo (`net-udp-echo`), and the
//! longest gap between the echoes that come back while a migration runs is that migration's
//! downtime from the outside, whatever each VMM counts as its own downtime. The interval bounds
//! the resolution. On the kvm_pvm development host a guest spends about 14 ms of vCPU time per
//! echo (the same under QEMU: waking an idle PVM vCPU is that dear), so one every 20 ms already
//! keeps it 70 % busy and one every 5 ms starves the rest of it; hardware KVM takes 1 ms.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use harness::NetNs;

/// A running stream of probes and the arrival times of their echoes.
pub struct EchoStream {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Instant>>>,
}

impl EchoStream {
    /// Starts probing `guest` every `interval` from a socket inside `ns`.
    pub fn start(ns: &NetNs, guest: SocketAddr, interval: Duration) -> Result<EchoStream> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = ns.spawn(move || probe(guest, interval, &stopped))?;
        Ok(EchoStream { stop, thread })
    }

    /// Stops probing and returns when each echo arrived, in order.
    pub fn finish(self) -> Result<Vec<Instant>> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| anyhow!("the probe thread panicked"))?
    }
}

fn probe(guest: SocketAddr, interval: Duration, stop: &AtomicBool) -> Result<Vec<Instant>> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(guest)?;
    let mut arrivals = Vec::new();
    let mut seq: u64 = 0;
    let mut next_send = Instant::now();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now >= next_send {
            seq += 1;
            // A full socket buffer or a route that is not there yet: the echo is missing, which
            // is what is being measured.
            let _ = socket.send(&seq.to_le_bytes());
            next_send += interval;
            if next_send < now {
                next_send = now + interval;
            }
        }
        let wait = next_send
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(100));
        socket.set_read_timeout(Some(wait))?;
        match socket.recv(&mut buf) {
            Ok(8) if u64::from_le_bytes(buf[..8].try_into()?) <= seq => arrivals.push(Instant::now()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // ECONNREFUSED from an ICMP error while the guest's port is not there: keep going.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => bail!("probe socket: {e}"),
        }
    }
    Ok(arrivals)
}

/// Waits until echoes come back (the guest's network is up): at least `count` within `timeout`.
pub fn wait_echoes(ns: &NetNs, guest: SocketAddr, count: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let stream = EchoStream::start(ns, guest, Duration::from_millis(10))?;
        std::thread::sleep(Duration::from_millis(200));
        if stream.finish()?.len() >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no UDP echoes from {guest} within {timeout:?}");
        }
    }
}

/// The longest time without an echo between `from` and the last echo before `to`, `from`
/// counted as an echo: what a client probing all along saw of the guest's absence. None
/// if no echo came in the window (the guest never answered again).
pub fn longest_gap(arrivals: &[Instant], from: Instant, to: Instant) -> Option<Duration> {
    let mut previous = from;
    let mut longest = None;
    for &t in arrivals.iter().filter(|t| **t >= from && **t <= to) {
        longest = longest.max(Some(t - previous));
        previous = t;
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_silence_inside_the_window_counts() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let arrivals = [at(1), at(2), at(3), at(40), at(41), at(100), at(300)];
        assert_eq!(
            longest_gap(&arrivals, at(0), at(120)),
            Some(Duration::from_millis(59))
        );
        // A window that starts in a silence counts it from its start.
        assert_eq!(
            longest_gap(&arrivals, at(10), at(45)),
            Some(Duration::from_millis(30))
        );
        assert_eq!(longest_gap(&arrivals, at(301), at(400)), None);
    }
}
