//! Receive segment coalescing: consecutive TCP/IPv4 segments of one connection that are queued on
//! the tap together reach the guest as one segmentation-offload frame.
//!
//! A guest pays for every frame it receives (buffer bookkeeping, GRO, the protocol stack, often an
//! ACK); merging cuts that per-frame work. The rules are those of Linux's TCP GRO: same connection,
//! the next sequence number, the same acknowledgement, window and options, only ACK and PSH set,
//! every segment but the last a full one. Two differences, both because a sender held back by a
//! slow receiver sends its segments milliseconds apart, each with a push:
//! - GRO ends a packet at a segment that pushes, so as not to wait for more behind it. Here a push
//!   does not end the frame (the merged frame pushes): `rx` only waits for more while the guest is
//!   behind, that is, has frames to work through before it would look at this one.
//! - GRO merges only identical options. Here the usual Linux options, NOP, NOP and timestamps, may
//!   differ in their timestamps if neither goes backwards; the merged frame carries the newest, as
//!   Linux's LRO did. The guest then echoes that one, which is what it would do had it received
//!   the segments together.
//!
//! On top of that only frames the host stack handed over with a partial checksum
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`, the pseudo-header sum in the TCP checksum field, checked) and
//! a correct IPv4 header checksum are merged: a frame whose checksums the guest would have to
//! verify keeps its own, so a corrupt frame is never turned into a valid one.
//!
//! The merged frame carries `VIRTIO_NET_HDR_GSO_TCPV4` with the first segment's size as
//! `gso_size`, which is only offered to a guest that accepted VIRTIO_NET_F_GUEST_TSO4 and
//! VIRTIO_NET_F_GUEST_CSUM.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
};

use super::HDR_LEN;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IP_OFF: usize = HDR_LEN + ETH_LEN;
const IP_LEN: usize = 20;
const TCP_OFF: usize = IP_OFF + IP_LEN;
const TCP_MIN_LEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
/// The IPv4 "don't fragment" bit; every other bit of the fragment field must be clear.
const IP_DF: u16 = 0x4000;
/// TCP flags.
pub(super) const TCP_ACK: u8 = 0x10;
pub(super) const TCP_PSH: u8 = 0x08;
/// Where the TCP checksum lies from the start of the TCP header.
const TCP_CSUM_OFFSET: u16 = 16;
/// Largest IPv4 datagram.
const MAX_IP_LEN: usize = 65535;

/// The facts about one mergeable segment (or already merged frame) that the rules need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    tcp_len: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    /// The segment size the frame stands for: `gso_size` of a merged frame, its payload otherwise.
    mss: usize,
}

impl Segment {
    /// Whether every segment the frame stands for is a full one, so that another may follow.
    fn ends_full(&self) -> bool {
        self.payload.is_multiple_of(self.mss)
    }
}

/// Reads `frame` (virtio-net header first) as a TCP/IPv4 segment that may be merged, or `None`.
fn segment(frame: &[u8]) -> Option<Segment> {
    if frame.len() < TCP_OFF + TCP_MIN_LEN {
        return None;
    }
    let hdr = &frame[..HDR_LEN];
    if u32::from(hdr[0]) != VIRTIO_NET_HDR_F_NEEDS_CSUM {
        return None;
    }
    let gso = u32::from(hdr[1]);
    if gso != VIRTIO_NET_HDR_GSO_NONE && gso != VIRTIO_NET_HDR_GSO_TCPV4 {
        return None;
    }
    if le16(hdr, 6) != TCP_OFF as u16 - HDR_LEN as u16 || le16(hdr, 8) != TCP_CSUM_OFFSET {
        return None;
    }
    if be16(frame, HDR_LEN + 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[IP_OFF..];
    if ip[0] != 0x45 || ip[9] != IPPROTO_TCP || be16(ip, 6) != IP_DF {
        return None;
    }
    let total = usize::from(be16(ip, 2));
    if total != frame.len() - IP_OFF || ones_complement_sum(&ip[..IP_LEN]) != 0xffff {
        return None;
    }
    let tcp = &frame[TCP_OFF..];
    let tcp_len = usize::from(tcp[12] >> 4) * 4;
    if tcp_len < TCP_MIN_LEN || IP_LEN + tcp_len >= total {
        return None;
    }
    let flags = tcp[13];
    if flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    if be16(tcp, 16) != pseudo_header_sum(ip, total - IP_LEN) {
        return None;
    }
    let payload = total - IP_LEN - tcp_len;
    let mss = if gso == VIRTIO_NET_HDR_GSO_TCPV4 {
        usize::from(le16(hdr, 4))
    } else {
        payload
    };
    if mss == 0 {
        return None;
    }
    Some(Segment {
        tcp_len,
        payload,
        seq: be32(tcp, 4),
        flags,
        mss,
    })
}

/// Whether another segment may be appended to `frame`: it is a mergeable segment that does not
/// end short. Frames that may not are delivered without looking at the tap further.
pub fn may_continue(frame: &[u8]) -> bool {
    segment(frame).is_some_and(|s| s.ends_full())
}

/// Whether holding `frame` back for the segments behind it is worth it: more may follow (it does
/// not end short) and at least one more full segment fits within `capacity` bytes and the largest
/// IPv4 datagram.
pub fn worth_holding(frame: &[u8], capacity: usize) -> bool {
    segment(frame).is_some_and(|s| {
        s.ends_full() && frame.len() + s.mss <= capacity && frame.len() - IP_OFF + s.mss <= MAX_IP_LEN
    })
}

/// Appends `next` (a frame from the tap, virtio-net header first) to the frame in
/// `held[..held_len]` if the two are consecutive segments of one connection under the rules above
/// and the result fits in `held`. Returns the merged frame's length, or `None` (nothing changed).
pub fn append(held: &mut [u8], held_len: usize, next: &[u8]) -> Option<usize> {
    let first = segment(held.get(..held_len)?)?;
    let second = segment(next)?;
    // Nothing follows a segment shorter than the rest.
    if !first.ends_full() {
        return None;
    }
    if second.payload > first.mss && second.mss != first.mss {
        return None;
    }
    if second.payload <= first.mss
        && u32::from(next[1]) == VIRTIO_NET_HDR_GSO_TCPV4
        && second.mss != first.mss
    {
        return None;
    }
    if first.tcp_len != second.tcp_len || second.seq != first.seq.wrapping_add(first.payload as u32) {
        return None;
    }
    let (a, b) = (&held[..held_len], next);
    // Ethernet addresses and type; IPv4 TOS, then TTL and protocol, addresses.
    let same = |range: std::ops::Range<usize>| a[range.clone()] == b[range];
    if !same(HDR_LEN..IP_OFF) || !same(IP_OFF + 1..IP_OFF + 2) || !same(IP_OFF + 8..IP_OFF + 10) {
        return None;
    }
    if !same(IP_OFF + 12..TCP_OFF) {
        return None;
    }
    // Ports; acknowledgement, header length; window; options.
    if !same(TCP_OFF..TCP_OFF + 4) || !same(TCP_OFF + 8..TCP_OFF + 13) || !same(TCP_OFF + 14..TCP_OFF + 16) {
        return None;
    }
    let options = TCP_OFF + TCP_MIN_LEN..TCP_OFF + first.tcp_len;
    if !options_continue(&a[options.clone()], &b[options.clone()]) {
        return None;
    }
    let ip_total = IP_LEN + first.tcp_len + first.payload + second.payload;
    let merged_len = IP_OFF + ip_total;
    if ip_total > MAX_IP_LEN || merged_len > held.len() {
        return None;
    }
    held[held_len..merged_len].copy_from_slice(&next[TCP_OFF + second.tcp_len..]);
    held[options.clone()].copy_from_slice(&next[options]);
    let mss = first.mss as u16;
    held[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    held[2..4].copy_from_slice(&((ETH_LEN + IP_LEN + first.tcp_len) as u16).to_le_bytes());
    held[4..6].copy_from_slice(&mss.to_le_bytes());
    let ip = &mut held[IP_OFF..TCP_OFF];
    ip[2..4].copy_from_slice(&(ip_total as u16).to_be_bytes());
    ip[10..12].copy_from_slice(&[0, 0]);
    let ip_csum = !ones_complement_sum(ip);
    ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let tcp_csum = pseudo_header_sum(&held[IP_OFF..TCP_OFF], ip_total - IP_LEN);
    let tcp = &mut held[TCP_OFF..];
    tcp[13] |= second.flags & TCP_PSH;
    tcp[16..18].copy_from_slice(&tcp_csum.to_be_bytes());
    Some(merged_len)
}

/// The NOP, NOP, timestamps layout of TCP options that Linux sends on every segment.
const TIMESTAMPS_ONLY: [u8; 4] = [1, 1, 8, 10];

/// Whether the options of a segment (`next`) may follow those of the segment before it (`first`):
/// the same, or both only timestamps with neither value going backwards.
fn options_continue(first: &[u8], next: &[u8]) -> bool {
    if first == next {
        return true;
    }
    if first.len() != 12 || first[..4] != TIMESTAMPS_ONLY || next[..4] != TIMESTAMPS_ONLY {
        return false;
    }
    let not_back = |at: usize| be32(next, at).wrapping_sub(be32(first, at)) < 1 << 31;
    not_back(4) && not_back(8)
}

/// The TCP pseudo-header sum, folded and not complemented: what a sender that leaves the checksum
/// to the next hop (`CHECKSUM_PARTIAL`) puts in the checksum field.
fn pseudo_header_sum(ip: &[u8], tcp_len: usize) -> u16 {
    let mut sum = u32::from(IPPROTO_TCP) + tcp_len as u32;
    for word in ip[12..20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    fold(sum)
}

/// The ones' complement sum of `bytes` (an even number of them), folded to 16 bits.
fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let sum = bytes
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    fold(sum)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A segment as the host stack hands it to a tap: partial checksum, DF, ACK, 12 bytes of
/// timestamp option.
#[cfg(test)]
pub(super) fn tcp_frame(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
    let tcp_len = 32;
    let total = IP_LEN + tcp_len + payload.len();
    let mut f = vec![0u8; IP_OFF + total];
    f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    f[6..8].copy_from_slice(&34u16.to_le_bytes());
    f[8..10].copy_from_slice(&16u16.to_le_bytes());
    f[HDR_LEN..HDR_LEN + 6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[HDR_LEN + 6..HDR_LEN + 12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[HDR_LEN + 12..IP_OFF].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ip = &mut f[IP_OFF..TCP_OFF];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_TCP;
    ip[12..16].copy_from_slice(&[10, 99, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 99, 0, 2]);
    let c = !ones_complement_sum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp_csum = pseudo_header_sum(&f[IP_OFF..TCP_OFF], total - IP_LEN);
    let tcp = &mut f[TCP_OFF..];
    tcp[0..4].copy_from_slice(&[0x23, 0x8c, 0xc3, 0x50]);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
    tcp[12] = ((tcp_len / 4) as u8) << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&502u16.to_be_bytes());
    tcp[16..18].copy_from_slice(&tcp_csum.to_be_bytes());
    tcp[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 5]);
    tcp[tcp_len..].copy_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: usize = 1448;

    /// Spoils one frame in one way.
    type Spoil = fn(&mut Vec<u8>);

    fn data(n: usize, fill: u8) -> Vec<u8> {
        (0..n).map(|i| fill.wrapping_add(i as u8)).collect()
    }

    fn held_with(first: &[u8]) -> Vec<u8> {
        let mut held = vec![0u8; super::super::MAX_FRAME_LEN + 1];
        held[..first.len()].copy_from_slice(first);
        held
    }

    /// The merged frame is what the sender's own segmentation offload would have handed over for
    /// the concatenated payload.
    #[test]
    fn consecutive_full_segments_become_one_tso_frame() {
        let (p1, p2, p3) = (data(MSS, 1), data(MSS, 2), data(100, 3));
        let f1 = tcp_frame(1000, &p1, TCP_ACK);
        let mut held = held_with(&f1);
        let len = append(&mut held, f1.len(), &tcp_frame(1000 + MSS as u32, &p2, TCP_ACK)).unwrap();
        let len = append(
            &mut held,
            len,
            &tcp_frame(1000 + 2 * MSS as u32, &p3, TCP_ACK | TCP_PSH),
        )
        .unwrap();
        let all = [p1, p2, p3].concat();
        let mut expected = tcp_frame(1000, &all, TCP_ACK | TCP_PSH);
        expected[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        expected[2..4].copy_from_slice(&(14u16 + 20 + 32).to_le_bytes());
        expected[4..6].copy_from_slice(&(MSS as u16).to_le_bytes());
        assert_eq!(len, expected.len());
        assert_eq!(&held[..len], &expected[..]);
        // A segment after a short one starts a frame of its own.
        let f4 = tcp_frame(1000 + 2 * MSS as u32 + 100, &data(MSS, 4), TCP_ACK);
        assert_eq!(append(&mut held, len, &f4), None);
        assert!(!may_continue(&held[..len]) && !worth_holding(&held[..len], held.len()));
        // A segment behind a push that is already there joins it; the frame still pushes.
        let pushed = tcp_frame(0, &data(MSS, 1), TCP_ACK | TCP_PSH);
        let mut held = held_with(&pushed);
        assert!(may_continue(&pushed) && worth_holding(&pushed, held.len()));
        let len = append(
            &mut held,
            pushed.len(),
            &tcp_frame(MSS as u32, &data(MSS, 2), TCP_ACK),
        )
        .unwrap();
        assert_eq!(held[TCP_OFF + 13], TCP_ACK | TCP_PSH);
        assert!(worth_holding(&held[..len], held.len()) && may_continue(&held[..len]));
        assert!(
            !worth_holding(&held[..len], len + MSS - 1),
            "no room for another segment"
        );
    }

    #[test]
    fn tso_frames_from_the_host_merge_when_their_segment_sizes_agree() {
        let p = data(2 * MSS, 5);
        let mut f1 = tcp_frame(0, &p, TCP_ACK);
        f1[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        f1[4..6].copy_from_slice(&(MSS as u16).to_le_bytes());
        let mut f2 = tcp_frame(2 * MSS as u32, &p, TCP_ACK);
        f2[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        f2[4..6].copy_from_slice(&(MSS as u16).to_le_bytes());
        let mut held = held_with(&f1);
        let len = append(&mut held, f1.len(), &f2).unwrap();
        assert_eq!(len, f1.len() + p.len());
        assert_eq!(segment(&held[..len]).unwrap().payload, 4 * MSS);
        // Another segment size is another frame.
        let mut f3 = tcp_frame(4 * MSS as u32, &p, TCP_ACK);
        f3[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        f3[4..6].copy_from_slice(&(MSS as u16 - 8).to_le_bytes());
        assert_eq!(append(&mut held, len, &f3), None);
    }

    #[test]
    fn anything_the_guest_gro_would_not_merge_stays_apart() {
        let f1 = tcp_frame(0, &data(MSS, 0), TCP_ACK);
        let next = || tcp_frame(MSS as u32, &data(MSS, 1), TCP_ACK);
        let cases: Vec<(&str, Spoil)> = vec![
            ("sequence gap", |f| f[TCP_OFF + 7] ^= 1),
            ("other ack", |f| f[TCP_OFF + 11] ^= 1),
            ("other window", |f| f[TCP_OFF + 15] ^= 1),
            ("timestamp going back", |f| f[TCP_OFF + 27] -= 1),
            ("echoed timestamp going back", |f| f[TCP_OFF + 31] -= 1),
            ("other options", |f| f[TCP_OFF + 20] = 4),
            ("other port", |f| f[TCP_OFF + 1] ^= 1),
            ("other source", |f| f[IP_OFF + 15] ^= 1),
            ("other MAC", |f| f[HDR_LEN + 5] ^= 1),
            ("FIN", |f| f[TCP_OFF + 13] |= 0x01),
            ("checksum to verify", |f| f[0] = 0),
            ("checksum data valid", |f| f[0] = 2),
            ("bad IP checksum", |f| f[IP_OFF + 10] ^= 1),
            ("full TCP checksum", |f| f[TCP_OFF + 17] ^= 1),
            ("fragment", |f| f[IP_OFF + 6] = 0x20),
            ("IP options", |f| f[IP_OFF] = 0x46),
            ("UDP", |f| f[IP_OFF + 9] = 17),
            ("padded", |f| f.push(0)),
        ];
        for (what, spoil) in cases {
            let mut held = held_with(&f1);
            let mut f2 = next();
            spoil(&mut f2);
            assert_eq!(append(&mut held, f1.len(), &f2), None, "{what}");
            assert_eq!(&held[..f1.len()], &f1[..], "{what}: the held frame changed");
        }
        let longer = tcp_frame(MSS as u32, &data(MSS + 4, 1), TCP_ACK);
        let mut held = held_with(&f1);
        assert_eq!(
            append(&mut held, f1.len(), &longer),
            None,
            "longer than the first"
        );
        // The same rules apply to the held frame.
        let mut held = held_with(&f1);
        held[0] = 0;
        assert_eq!(append(&mut held, f1.len(), &next()), None);
    }

    /// A paced sender's segments come milliseconds apart, each with its own timestamp.
    #[test]
    fn advancing_timestamps_merge_and_the_frame_carries_the_newest() {
        let f1 = tcp_frame(0, &data(MSS, 0), TCP_ACK | TCP_PSH);
        let mut f2 = tcp_frame(MSS as u32, &data(MSS, 1), TCP_ACK | TCP_PSH);
        f2[TCP_OFF + 24..TCP_OFF + 32].copy_from_slice(&[0, 0, 0, 32, 0, 0, 1, 5]);
        let mut held = held_with(&f1);
        let len = append(&mut held, f1.len(), &f2).unwrap();
        assert_eq!(&held[TCP_OFF + 20..TCP_OFF + 32], &f2[TCP_OFF + 20..TCP_OFF + 32]);
        // Wrapping around is moving forward too.
        let mut f3 = tcp_frame(2 * MSS as u32, &data(MSS, 2), TCP_ACK);
        f3[TCP_OFF + 24..TCP_OFF + 32].copy_from_slice(&[0, 0, 0, 40, 0, 0, 1, 5]);
        let mut wrapped = held.clone();
        wrapped[TCP_OFF + 24..TCP_OFF + 28].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(options_continue(
            &wrapped[TCP_OFF + 20..TCP_OFF + 32],
            &f3[TCP_OFF + 20..TCP_OFF + 32]
        ));
        let len = append(&mut held, len, &f3).unwrap();
        assert_eq!(segment(&held[..len]).map(|s| s.payload), Some(3 * MSS));
        assert_eq!(&held[TCP_OFF + 24..TCP_OFF + 28], &[0, 0, 0, 40]);
    }

    #[test]
    fn a_merge_stops_at_the_largest_ip_datagram_and_the_buffer() {
        let f1 = tcp_frame(0, &data(MSS, 0), TCP_ACK);
        let mut held = held_with(&f1);
        let mut len = f1.len();
        let mut seq = MSS as u32;
        let mut merged = 1;
        while let Some(l) = append(&mut held, len, &tcp_frame(seq, &data(MSS, 0), TCP_ACK)) {
            len = l;
            seq += MSS as u32;
            merged += 1;
        }
        assert_eq!(merged, (MAX_IP_LEN - IP_LEN - 32) / MSS);
        assert!(len - IP_OFF <= MAX_IP_LEN);
        let small = tcp_frame(0, &data(MSS, 0), TCP_ACK);
        let mut tight = small.clone();
        assert_eq!(
            append(
                &mut tight,
                small.len(),
                &tcp_frame(MSS as u32, &data(MSS, 0), TCP_ACK)
            ),
            None
        );
    }

    #[test]
    fn garbage_is_never_merged_and_never_panics() {
        let f1 = tcp_frame(0, &data(MSS, 0), TCP_ACK);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..2000 {
            let mut f2 = tcp_frame(MSS as u32, &data(MSS, 0), TCP_ACK);
            // Flip a few header bytes at random, or cut the frame short.
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed as usize) % (TCP_OFF + 32);
                f2[at] ^= (seed >> 32) as u8 | 1;
            }
            if round % 5 == 0 {
                f2.truncate((seed as usize) % f2.len());
            }
            let mut held = held_with(&f1);
            if let Some(len) = append(&mut held, f1.len(), &f2) {
                // Only flips that leave a frame the rules accept may merge, and then the result
                // is itself a valid segment.
                assert!(segment(&held[..len]).is_some());
            }
        }
    }
}
