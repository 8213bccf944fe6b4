//! virtio-net end to end: a real guest kernel with two NICs on two TAP devices in a network
//! namespace the test creates (and removes, with everything in it). The host side talks to the
//! guest's in-kernel probe: ping, TCP echo, UDP echo, bulk transfers each way with checksums
//! (the one to the guest through segment coalescing), and a rate limit set at run time that caps a
//! transfer.
//!
//! Rates are small for a reason: guest kernel code is emulated instruction by instruction on
//! kvm_pvm hosts (docs/kvm_pvm.md), so the guest itself moves a few megabits per second at most.
//! The device is not what limits them.
//!
//! Every address lives in the test's namespace; nothing is sent anywhere else.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use harness::{
    probe_cmdline, probe_fields, require_kvm, vmm_binary, ControlClient, Crc32, GuestImages, NetNs,
    ProbePattern, Sum64, TempDir,
};
use vmm_api::control::Response;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Guest to host (the guest sends a repeated block, checksummed cheaply).
const BULK_TO_HOST: u64 = 64 << 20;
/// Host to guest. The guest checks every byte with the probe's `sum64`: a CRC-32 of 64 MiB would
/// take the emulated guest about 13 minutes on a kvm_pvm host.
const BULK_TO_GUEST: u64 = 64 << 20;
/// The run-time transmit limit: 1 Mbit/s, well below what the guest sends unthrottled (about
/// 3.5 Mbit/s on a kvm_pvm host; the 10 Mbit/s a hardware host would allow is out of its reach).
const LIMIT_BYTES_PER_S: u64 = 1_000_000 / 8;
/// How long the limited transfer is measured: long enough that one frame more or less (the
/// limiter lets a frame through on credit) stays within the 10%.
const LIMIT_WINDOW: Duration = Duration::from_secs(24);

/// What a host-side TCP endpoint saw of one connection.
#[derive(Debug)]
struct Received {
    bytes: u64,
    crc: u32,
}

/// Accepts one connection on `addr` (inside the namespace) and reads it to the end.
fn receive_one(ns: &NetNs, addr: &'static str) -> std::thread::JoinHandle<anyhow::Result<Received>> {
    ns.spawn(move || -> anyhow::Result<Received> {
        let listener = TcpListener::bind(addr)?;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut crc = Crc32::new();
        let mut bytes = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(Received {
                    bytes,
                    crc: crc.finish(),
                });
            }
            crc.update(&buf[..n]);
            bytes += n as u64;
        }
    })
    .expect("thread in the namespace")
}

/// What a host-side TCP endpoint sent on one connection.
#[derive(Debug)]
struct Sent {
    bytes: u64,
    sum64: String,
}

/// Accepts one connection on `addr` and sends `len` bytes of the probe pattern of `seed`.
fn send_one(
    ns: &NetNs,
    addr: &'static str,
    seed: u32,
    len: u64,
) -> std::thread::JoinHandle<anyhow::Result<Sent>> {
    ns.spawn(move || -> anyhow::Result<Sent> {
        let listener = TcpListener::bind(addr)?;
        let (mut conn, _) = listener.accept()?;
        conn.set_write_timeout(Some(Duration::from_secs(120)))?;
        let mut pattern = ProbePattern::new(seed);
        let mut sum = Sum64::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut sent = 0u64;
        while sent < len {
            let n = (len - sent).min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            conn.write_all(&buf[..n])?;
            sum.update(&buf[..n]);
            sent += n as u64;
        }
        conn.shutdown(Shutdown::Write)?;
        // Wait for the guest to close its side, so it has read everything.
        let _ = conn.read(&mut [0u8; 1]);
        Ok(Sent {
            bytes: sent,
            sum64: sum.hex(),
        })
    })
    .expect("thread in the namespace")
}

#[test]
fn two_nics_carry_ping_echo_bulk_transfers_and_a_run_time_rate_limit() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let ns = NetNs::new("net").unwrap();
    ns.add_tap("vtap0", "10.77.0.1/24").unwrap();
    ns.add_tap("vtap1", "10.78.0.1/24").unwrap();
    let dir = TempDir::new("vmm-net").unwrap();
    let sock = dir.path().join("api.sock");

    // The guest's transfers connect as soon as it runs them, retrying for up to 60 s while the host
    // refuses. Its sender is only let in after the echo checks below: the guest kernel does not
    // preempt its own threads, and a sender that always has room to send kept the UDP responder
    // from running for longer than the check waits.
    let to_guest = send_one(&ns, "10.77.0.1:9001", 42, BULK_TO_GUEST);
    let actions = [
        "net-info",
        "net-addr:eth1:10.78.0.2:24",
        "net-echo:7000",
        "net-udp-echo:7001",
        "net-send:10.77.0.1:9000:64m",
        "net-recv:10.77.0.1:9001",
        "net-send:10.77.0.1:9002:64m",
        "idle",
    ]
    .join(",");
    // tcp_min_tso_segs=44: the guest hands the device 64 KiB TSO frames, as it would on hardware.
    // Linux sizes them by the pacing rate, and an emulated guest's rate is so low that it would
    // build 2-segment frames and send 64 MiB at a fifth of the speed.
    let cmdline = format!(
        "{} vmmprobe.net_sum=sum64 sysctl.net.ipv4.tcp_min_tso_segs=44 \
         ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off",
        probe_cmdline(&actions)
    );
    let mut cmd = ns.command(&vmm_binary());
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .args(["--cmdline", &cmdline, "--memory-mib", "256"])
        .args(["--net", "tap=vtap0,mac=02:00:00:00:77:02,id=eth0"])
        .args(["--net", "tap=vtap1,mac=02:00:00:00:78:02,id=eth1"])
        .arg("--api-sock")
        .arg(&sock);
    let mut guest = harness::Guest::spawn_booting(cmd, 1, None).unwrap();

    guest
        .wait_for_line(
            "vmmprobe: net-udp-echo port=7001 listening result=0",
            BOOT_TIMEOUT,
        )
        .unwrap();
    let stdout = guest.stdout_text();
    assert!(!stdout.contains("Failed to set sysctl"), "{stdout}");
    let eth0 = probe_fields(&stdout, "net-info dev=eth0");
    assert_eq!(eth0["mac"], "02:00:00:00:77:02", "{stdout}");
    assert_eq!(eth0["ip"], "10.77.0.2");
    assert_eq!(eth0["carrier"], "1");
    assert_eq!(
        probe_fields(&stdout, "net-info dev=eth1")["mac"],
        "02:00:00:00:78:02"
    );
    assert_eq!(
        probe_fields(&stdout, "net-addr dev=eth1")["result"],
        "0",
        "{stdout}"
    );

    // Both NICs answer pings, from the host side of their own taps.
    ns.ping("10.77.0.2", 10, 1).expect("ping over eth0");
    ns.ping("10.78.0.2", 10, 1).expect("ping over eth1");
    // The guest's TCP echo server (over eth0) and UDP responder (over eth1).
    let echo = ns
        .spawn(|| -> anyhow::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(
                &"10.77.0.2:7000".parse::<SocketAddr>()?,
                Duration::from_secs(30),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let message = ProbePattern::bytes(5, 100_000);
            s.write_all(&message)?;
            let mut back = vec![0u8; message.len()];
            s.read_exact(&mut back)?;
            anyhow::ensure!(back == message, "echo differs");
            let udp = UdpSocket::bind("10.78.0.1:0")?;
            udp.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut answer = [0u8; 64];
            // UDP may lose a datagram; a few tries.
            for _ in 0..5 {
                udp.send_to(b"hello over eth1", "10.78.0.2:7001")?;
                if let Ok((n, _)) = udp.recv_from(&mut answer) {
                    return Ok(answer[..n].to_vec());
                }
            }
            anyhow::bail!("no UDP answer")
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(echo, b"hello over eth1");
    let from_guest = receive_one(&ns, "10.77.0.1:9000");

    // Bulk each way, checksums on both ends.
    let got = from_guest.join().unwrap().unwrap();
    guest
        .wait_for_line("vmmprobe: net-send total", BOOT_TIMEOUT)
        .unwrap();
    let sent = probe_fields(&guest.stdout_text(), "net-send stream=0 peer=10.77.0.1:9000");
    assert_eq!(sent["result"], "0");
    assert_eq!(got.bytes, BULK_TO_HOST);
    assert_eq!(sent["bytes"], BULK_TO_HOST.to_string());
    assert_eq!(format!("{:08x}", got.crc), sent["crc32"]);
    assert_eq!(
        got.crc,
        harness::crc32(&ProbePattern::net_send_bytes(1, BULK_TO_HOST as usize))
    );
    let put = to_guest.join().unwrap().unwrap();
    guest
        .wait_for_line("vmmprobe: net-recv total", BOOT_TIMEOUT)
        .unwrap();
    let recv = probe_fields(&guest.stdout_text(), "net-recv stream=0");
    assert_eq!(recv["result"], "0");
    assert_eq!(recv["bytes"], BULK_TO_GUEST.to_string());
    assert_eq!(put.bytes, BULK_TO_GUEST);
    assert_eq!(put.sum64, recv["sum64"]);

    // A limit on what eth0 sends, set while the VM runs, caps the next transfer: the bytes that
    // arrive over a window match the rate within 10%.
    let mut c = ControlClient::connect(&sock).unwrap();
    let limit = serde_json::json!({"id": 1, "request": {"update-net-rate-limiters": {"net": "eth0",
        "tx_rate_limiter": {"bandwidth": {"size": LIMIT_BYTES_PER_S / 10, "refill_time_ms": 100}}}}})
    .to_string();
    assert_eq!(c.ok(&limit).unwrap(), Response::RateLimiterUpdated);
    let nobody = r#"{"id": 2, "request": {"update-net-rate-limiters": {"net": "eth9"}}}"#;
    assert_eq!(c.error(nobody).unwrap().0, vmm_api::control::ErrorKind::NotFound);
    let limited = ns
        .spawn(|| -> anyhow::Result<u64> {
            let listener = TcpListener::bind("10.77.0.1:9002")?;
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut buf = vec![0u8; 1 << 16];
            // Let the bucket's initial contents and TCP's ramp-up pass, then count.
            let warmup = Instant::now() + Duration::from_secs(2);
            while Instant::now() < warmup {
                if conn.read(&mut buf)? == 0 {
                    anyhow::bail!("the guest closed the limited transfer during warm-up");
                }
            }
            let end = Instant::now() + LIMIT_WINDOW;
            let mut bytes = 0u64;
            while Instant::now() < end {
                bytes += conn.read(&mut buf)? as u64;
            }
            Ok(bytes)
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    let expected = LIMIT_BYTES_PER_S as f64 * LIMIT_WINDOW.as_secs_f64();
    let ratio = limited as f64 / expected;
    // Frames carry Ethernet/IP/TCP headers the limit counts and the payload does not (about 4%).
    assert!(
        (0.85..=1.10).contains(&ratio),
        "{limited} bytes in {LIMIT_WINDOW:?}: {ratio:.3} of the limit"
    );

    let Response::Metrics(m) = c.ok(r#"{"id": 3, "request": "metrics"}"#).unwrap() else {
        panic!("metrics")
    };
    let eth0 = m.nets.iter().find(|n| n.id == "eth0").expect("eth0 metrics");
    assert!(
        eth0.tx_bytes >= BULK_TO_HOST && eth0.rx_bytes >= BULK_TO_GUEST,
        "{eth0:?}"
    );
    assert!(eth0.throttled > 0, "{eth0:?}");
    // The guest's TSO frames reached the tap whole (with their vnet header), not cut to the MTU:
    // an average above the largest 1500-MTU frame takes frames beyond it.
    assert!(eth0.tx_bytes / eth0.tx_frames.max(1) > 1514, "{eth0:?}");
    // Under kvm_pvm the guest is always behind on the bulk transfer to it (it checksums every
    // byte in emulated code), so its TCP segments were merged before they reached it, and the
    // checksum above says the merged frames carried the data intact. A hardware guest keeps up
    // and may never need a merge.
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(eth0.rx_coalesced > 0, "no segment merged: {eth0:?}");
    }
    let eth1 = m.nets.iter().find(|n| n.id == "eth1").expect("eth1 metrics");
    assert!(eth1.rx_frames > 0 && eth1.tx_frames > 0, "{eth1:?}");

    assert_eq!(
        c.ok(r#"{"id": 4, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let status = guest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{}", guest.stderr_text());
    // Nothing left behind in the namespace but what the test made.
    let mut links = ns.links().unwrap();
    links.sort();
    assert_eq!(links, ["lo", "vtap0", "vtap1"]);
    assert!(ns.pids().unwrap().is_empty());
}

#[test]
fn a_missing_tap_and_a_too_long_name_are_clear_errors() {
    let images = GuestImages::get().unwrap();
    let ns = NetNs::new("netbad").unwrap();
    let run = |spec: &str| {
        let out = ns
            .command(&vmm_binary())
            .arg("--kernel")
            .arg(&images.vmlinux)
            .args(["--net", spec])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run("tap=nosuchtap");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("nosuchtap"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "{stderr}"
    );
    let (code, stderr) = run("tap=a-name-much-too-long-for-linux");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("nets[0].tap"), "{stderr}");
    assert!(
        ns.links().unwrap() == ["lo"],
        "the VMM must not create interfaces"
    );
}
