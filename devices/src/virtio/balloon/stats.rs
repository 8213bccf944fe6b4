//! The statistics queue's payload: tagged 64-bit values (virtio 1.2, 5.5.6.3).

use vmm_api::balloon::GuestMemoryStats;

/// Bytes of one `struct virtio_balloon_stat` (`le16 tag; le64 val`, packed).
pub const STAT_BYTES: usize = 10;
/// Most statistics read from one buffer; the spec defines 16 tags, and a driver sending more than
/// this is not worth reading further.
pub const MAX_STATS: usize = 64;

/// Parses the statistics in `bytes` into `out`. Unknown tags are ignored (newer drivers send tags
/// this device does not know); a trailing partial entry is ignored too. Returns the number of
/// entries with a known tag.
pub fn parse(bytes: &[u8], out: &mut GuestMemoryStats) -> usize {
    let mut known = 0;
    for entry in bytes.chunks_exact(STAT_BYTES).take(MAX_STATS) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&entry[2..STAT_BYTES]);
        let value = Some(u64::from_le_bytes(raw));
        let field = match tag {
            0 => &mut out.swap_in,
            1 => &mut out.swap_out,
            2 => &mut out.major_faults,
            3 => &mut out.minor_faults,
            4 => &mut out.free_memory,
            5 => &mut out.total_memory,
            6 => &mut out.available_memory,
            7 => &mut out.disk_caches,
            8 => &mut out.hugetlb_allocations,
            9 => &mut out.hugetlb_failures,
            10 => &mut out.oom_kills,
            11 => &mut out.alloc_stalls,
            12 => &mut out.async_scans,
            13 => &mut out.direct_scans,
            14 => &mut out.async_reclaims,
            15 => &mut out.direct_reclaims,
            _ => continue,
        };
        *field = value;
        known += 1;
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(tag: u16, value: u64) -> Vec<u8> {
        let mut v = tag.to_le_bytes().to_vec();
        v.extend_from_slice(&value.to_le_bytes());
        v
    }

    #[test]
    fn known_tags_fill_fields_unknown_ones_are_skipped() {
        let mut bytes = stat(4, 1 << 20);
        bytes.extend(stat(99, 7));
        bytes.extend(stat(5, 2 << 20));
        bytes.extend(stat(10, 3));
        bytes.extend([1, 2, 3]); // a partial entry
        let mut s = GuestMemoryStats::default();
        assert_eq!(parse(&bytes, &mut s), 3);
        assert_eq!(s.free_memory, Some(1 << 20));
        assert_eq!(s.total_memory, Some(2 << 20));
        assert_eq!(s.oom_kills, Some(3));
        assert_eq!(s.swap_in, None);
    }

    #[test]
    fn at_most_max_stats_entries_are_read() {
        let bytes: Vec<u8> = (0..MAX_STATS as u64 + 10).flat_map(|i| stat(4, i)).collect();
        let mut s = GuestMemoryStats::default();
        assert_eq!(parse(&bytes, &mut s), MAX_STATS);
        assert_eq!(s.free_memory, Some(MAX_STATS as u64 - 1));
    }
}
