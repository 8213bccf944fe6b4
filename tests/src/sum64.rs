//! The guest probe's `sum64` (`vmmprobe.net_sum=sum64`): a Fletcher-style sum that costs the
//! emulated guest one memory read per 8 bytes, where a CRC-32 costs ten.

/// Over a stream as little-endian 64-bit words, the last one zero-padded: `a += word`, `b += a`,
/// both modulo 2^64. The probe prints it as `a` then `b`, 16 hex digits each.
#[derive(Debug, Clone, Default)]
pub struct Sum64 {
    a: u64,
    b: u64,
    tail: [u8; 8],
    tail_len: usize,
}

impl Sum64 {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn word(&mut self, word: [u8; 8]) {
        self.a = self.a.wrapping_add(u64::from_le_bytes(word));
        self.b = self.b.wrapping_add(self.a);
    }

    /// Adds `bytes`, which may split words anywhere.
    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(bytes.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&bytes[..take]);
            self.tail_len += take;
            bytes = &bytes[take..];
            if self.tail_len < 8 {
                return;
            }
            self.word(self.tail);
            self.tail_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.word(word);
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// The sum of everything added, as the probe prints it.
    pub fn hex(&self) -> String {
        let mut done = self.clone();
        if done.tail_len > 0 {
            done.tail[done.tail_len..].fill(0);
            done.word(done.tail);
        }
        format!("{:016x}{:016x}", done.a, done.b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_and_padding() {
        // Two words: a = 1 then 1 + 2, b = 1 then 1 + 3.
        let bytes = [1, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut whole = Sum64::new();
        whole.update(&bytes);
        assert_eq!(whole.hex(), format!("{:016x}{:016x}", 3, 4));
        for split in 0..bytes.len() {
            let mut pieces = Sum64::new();
            pieces.update(&bytes[..split]);
            pieces.update(&bytes[split..]);
            assert_eq!(pieces.hex(), whole.hex(), "split at {split}");
        }
        // Order matters, unlike a plain sum.
        let mut swapped = Sum64::new();
        swapped.update(&[2, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_ne!(swapped.hex(), whole.hex());
        assert_eq!(Sum64::new().hex(), "0".repeat(32));
    }
}
