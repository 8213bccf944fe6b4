//! Tests on a real tap, created in a fresh network namespace so they touch nothing on the host.
//! They need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and fail, saying so, without it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
};

use super::tap::offload_flags;
use super::*;
use crate::rate_limiter::RateLimiter;
use crate::virtio::test_utils::{readable_within, Desc, TestDriver, DATA_START};
use crate::virtio::{feature, VirtioDevice};

const NAME: &str = "vmmnet0";
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Local experimental EtherTypes, so other traffic on the interface is told apart.
const ETH_TO_HOST: u16 = 0x88b5;
const ETH_TO_GUEST: u16 = 0x88b6;

/// Runs `test` on a thread of its own in a new network namespace (which dies with the thread).
fn in_netns(test: impl FnOnce() + Send + 'static) {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces; no memory is involved.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "this test needs root to create a network namespace and a tap (unshare: {})",
                io::Error::last_os_error()
            );
        }
        create_persistent_tap(NAME);
        test();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// What an operator does before starting the VMM (`ip tuntap add`): the VMM only attaches.
fn create_persistent_tap(name: &str) {
    // SAFETY: a NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    check(fd, "open /dev/net/tun");
    // SAFETY: `fd` was just opened and nothing else owns it.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ifr = ifreq_for(name);
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq on this stack frame.
    check(
        unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) },
        "TUNSETIFF",
    );
    // SAFETY: TUNSETPERSIST takes its argument by value.
    check(
        unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) },
        "TUNSETPERSIST",
    );
}

fn check(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", io::Error::last_os_error());
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data for which all zeroes is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (o, b) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    ifr
}

fn set_up(name: &str) {
    // SAFETY: creates a socket we own below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(s, "socket");
    // SAFETY: `s` was just created and nothing else owns it.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut ifr = ifreq_for(name);
    // SAFETY: SIOCGIFFLAGS reads and writes one ifreq on this stack frame.
    check(
        unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) },
        "SIOCGIFFLAGS",
    );
    // SAFETY: SIOCGIFFLAGS succeeded, so the flags member is the one set.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one ifreq on this stack frame.
    check(
        unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) },
        "SIOCSIFFLAGS",
    );
}

/// A packet socket on the interface: the host side of the wire.
fn packet_socket(name: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: creates a socket we own below.
    let s = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    check(s, "packet socket");
    // SAFETY: `s` was just created and nothing else owns it.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(index, 0, "if_nametoindex: {}", io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain old data for which all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads one sockaddr_ll of the size given.
    check(
        unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        },
        "bind",
    );
    s
}

fn eth_frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i % 251) as u8));
    f
}

#[test]
fn real_tap_ioctls_work() {
    in_netns(|| {
        let tap = Tap::open(NAME).unwrap_or_else(|e| panic!("this test needs root: {e}"));
        assert_eq!(tap.if_name(), NAME);
        let flags = tap.flags().unwrap();
        for bit in [libc::IFF_TAP, libc::IFF_NO_PI, libc::IFF_VNET_HDR] {
            assert_ne!(flags & bit, 0, "flag {bit:#x} missing in {flags:#x}");
        }
        assert_eq!(tap.vnet_hdr_size().unwrap(), HDR_LEN as i32);
        let mut tap = tap;
        let offered = [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
        ]
        .into_iter()
        .fold(0, |acc, bit| acc | feature(bit));
        tap.set_offload(offload_flags(offered))
            .expect("TUNSETOFFLOAD with every offload the device offers");
        tap.set_offload(0).expect("TUNSETOFFLOAD with none");

        // A second attach of the same (single-queue) tap is refused, clearly.
        match Tap::open(NAME) {
            Err(TapError::Busy(name)) => assert_eq!(name, NAME),
            other => panic!("expected Busy, got {other:?}"),
        }
        // A tap that does not exist is not created behind the operator's back.
        match Tap::open("vmmnosuch0") {
            Err(TapError::NoSuchInterface(name)) => assert_eq!(name, "vmmnosuch0"),
            other => panic!("expected NoSuchInterface, got {other:?}"),
        }
        // An interface that is not a tap.
        match Tap::open("lo") {
            Err(TapError::NotATapInterface(name)) => assert_eq!(name, "lo"),
            other => panic!("expected NotATapInterface, got {other:?}"),
        }
        // A descriptor passed by a supervisor is accepted once checked.
        // SAFETY: dup returns a new descriptor that we own below.
        let dup = unsafe { libc::dup(tap.as_raw_fd()) };
        check(dup, "dup");
        // SAFETY: `dup` was just created and nothing else owns it.
        let passed = Tap::from_fd(unsafe { OwnedFd::from_raw_fd(dup) }).expect("from_fd");
        assert_eq!(passed.if_name(), NAME);
    });
}

/// Frames cross a real tap in both directions through the device, with their headers.
#[test]
fn frames_cross_a_real_tap_through_the_device() {
    in_netns(|| {
        let tap = Tap::open(NAME).unwrap_or_else(|e| panic!("this test needs root: {e}"));
        set_up(NAME);
        let wire = packet_socket(NAME);
        let net = Net::new(NetSpec {
            id: "real".into(),
            tap: Box::new(tap),
            mac: GUEST_MAC,
            rx_rate_limiter: RateLimiter::unlimited().unwrap(),
            tx_rate_limiter: RateLimiter::unlimited().unwrap(),
        })
        .unwrap();
        let tap_fd = net
            .event_sources()
            .into_iter()
            .find(|s| s.token == TOKEN_TAP)
            .unwrap()
            .fd;
        let mut d = TestDriver::new(net);
        let features = d.device_features();
        assert_eq!(d.init(features, QUEUE_SIZE) & 0x4, 0x4);

        // Guest to host.
        let out = eth_frame([0xff; 6], GUEST_MAC, ETH_TO_HOST, 200);
        let addr = DATA_START + 0x80_0000;
        d.write(addr, &[0u8; HDR_LEN]);
        d.write(addr + HDR_LEN as u64, &out);
        d.add_chain_to(
            1,
            &[
                Desc::readable(addr, HDR_LEN as u32),
                Desc::readable(addr + HDR_LEN as u64, out.len() as u32),
            ],
        );
        d.kick_queue(1);
        let mut buf = vec![0u8; 4096];
        let mut seen = false;
        for _ in 0..50 {
            if !readable_within(wire.as_raw_fd(), 2000) {
                break;
            }
            let n = super::tap::read_fd(wire.as_raw_fd(), &mut buf).unwrap();
            if buf[..n] == out[..] {
                seen = true;
                break;
            }
        }
        assert!(seen, "the guest's frame never reached the host side");
        assert_eq!(d.take_used_from(1).len(), 1);

        // Host to guest.
        let rx_base = DATA_START + 0x10_0000;
        for i in 0..16u64 {
            d.add_chain_to(0, &[Desc::writable(rx_base + i * 0x1000, 0x1000)]);
        }
        d.kick_queue(0);
        let inbound = eth_frame(GUEST_MAC, HOST_MAC, ETH_TO_GUEST, 300);
        // SAFETY: send reads `inbound.len()` bytes from `inbound`.
        let n = unsafe { libc::send(wire.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(n, inbound.len() as isize, "send: {}", io::Error::last_os_error());
        let mut delivered = None;
        'wait: for _ in 0..50 {
            if !readable_within(tap_fd, 2000) {
                break;
            }
            d.transport.device_mut().handle_event(TOKEN_TAP);
            for (head, len) in d.take_used_from(0) {
                let got = d.read(rx_base + u64::from(head) * 0x1000, len as usize);
                if got.len() == HDR_LEN + inbound.len() && got[HDR_LEN..] == inbound[..] {
                    delivered = Some(got);
                    break 'wait;
                }
            }
        }
        let got = delivered.expect("the host's frame never reached the guest");
        // A plain frame: no offload flags, no segmentation, one buffer.
        assert_eq!(got[0], 0, "flags");
        assert_eq!(got[1], 0, "gso_type");
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        let m = d.transport.device().metrics().snapshot();
        assert!(m.tx_frames >= 1 && m.rx_frames >= 1, "{m:?}");
    });
}
