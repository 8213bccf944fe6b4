//! CRC-64/XZ (ECMA-182 polynomial, reflected, as in xz and Go's `crc64.ECMA`), for state files.

const POLY: u64 = 0xC96C_5795_D787_0F42;

const TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// A running checksum.
#[derive(Debug, Clone, Copy)]
pub struct Crc64(u64);

impl Default for Crc64 {
    fn default() -> Self {
        Crc64(u64::MAX)
    }
}

impl Crc64 {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = TABLE[((self.0 ^ u64::from(b)) & 0xff) as usize] ^ (self.0 >> 8);
        }
    }

    /// The checksum of everything added.
    pub fn finish(self) -> u64 {
        !self.0
    }

    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut crc = Crc64::default();
        crc.update(bytes);
        crc.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_check_value() {
        // The catalogued check value of CRC-64/XZ.
        assert_eq!(Crc64::of(b"123456789"), 0x995D_C9BB_DF19_39FA);
        assert_eq!(Crc64::of(b""), 0);
        let mut split = Crc64::default();
        split.update(b"1234");
        split.update(b"56789");
        assert_eq!(split.finish(), Crc64::of(b"123456789"));
    }
}
