//! The state file's framing: magic, format version, a bincode body, and a CRC-64 over all of it.
//!
//! ```text
//! 0   8  magic "VMMSNAP\0"
//! 8   4  format version (little endian)
//! 12  8  body length
//! 20  n  body (bincode, fixed-width little-endian integers)
//! 20+n 8 CRC-64/XZ of bytes 0..20+n
//! ```
//! Reading is bounded: the length is checked against [`MAX_STATE_BYTES`] and the file's size before
//! anything is allocated, the checksum before anything is decoded, and bincode's own limit stops a
//! crafted body from asking for more memory than the file holds.

use std::io::{Read, Write};
use std::path::Path;

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::crc64::Crc64;

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
pub use vmm_api::snapshot::FORMAT_VERSION;
/// Largest state file read (vCPU state is ~10 KiB per vCPU; devices and config are small).
pub const MAX_STATE_BYTES: u64 = 16 << 20;

const HEADER_BYTES: usize = 20;

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a state file.
    #[error("{0}: not a snapshot state file (bad magic)")]
    Magic(String),
    /// Written by another format version.
    #[error("{path}: snapshot format version {found}, this VMM reads version {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Its version.
        found: u32,
    },
    /// Length fields that do not fit the file or the limit.
    #[error("{0}: truncated or oversized state file")]
    Size(String),
    /// The checksum does not match: the file is damaged.
    #[error("{0}: checksum mismatch (the state file is damaged)")]
    Checksum(String),
    /// The body could not be encoded or decoded.
    #[error("{path}: state body: {source}")]
    Codec {
        /// The file.
        path: String,
        /// Why.
        source: bincode::Error,
    },
}

fn codec(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit)
        .reject_trailing_bytes()
}

/// Encodes `body` as a framed, checksummed state (what a state file holds).
pub fn encode<T: Serialize>(body: &T, name: &str) -> Result<Vec<u8>, FormatError> {
    let encoded = codec(MAX_STATE_BYTES)
        .serialize(body)
        .map_err(|source| FormatError::Codec {
            path: name.to_string(),
            source,
        })?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + encoded.len() + 8);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(encoded.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&encoded);
    let crc = Crc64::of(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Encodes `body` and writes the framed file at `path` (created; it must not exist), synced.
/// Returns the file's size.
pub fn write_state<T: Serialize>(path: &Path, body: &T) -> Result<u64, FormatError> {
    let name = path.display().to_string();
    let bytes = encode(body, &name)?;
    let io = |source| FormatError::Io {
        path: name.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(bytes.len() as u64)
}

/// Reads and checks the framed file at `path` and decodes its body.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let name = path.display().to_string();
    let io = |source| FormatError::Io {
        path: name.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    if file_len > MAX_STATE_BYTES + HEADER_BYTES as u64 + 8 {
        return Err(FormatError::Size(name));
    }
    let mut bytes = Vec::with_capacity(file_len as usize);
    file.take(file_len).read_to_end(&mut bytes).map_err(io)?;
    decode(&bytes, &name)
}

/// Checks and decodes framed state bytes (from a file or a migration stream named `name`).
pub fn decode<T: DeserializeOwned>(bytes: &[u8], name: &str) -> Result<T, FormatError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::Magic(name.into()));
    }
    let header = bytes
        .get(..HEADER_BYTES)
        .ok_or_else(|| FormatError::Size(name.into()))?;
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            path: name.into(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[12..20]);
    let body_len = u64::from_le_bytes(len);
    if body_len > MAX_STATE_BYTES || body_len + HEADER_BYTES as u64 + 8 != bytes.len() as u64 {
        return Err(FormatError::Size(name.into()));
    }
    let (framed, crc) = bytes.split_at(bytes.len() - 8);
    let mut want = [0u8; 8];
    want.copy_from_slice(crc);
    if Crc64::of(framed) != u64::from_le_bytes(want) {
        return Err(FormatError::Checksum(name.into()));
    }
    codec(body_len)
        .deserialize(&framed[HEADER_BYTES..])
        .map_err(|source| FormatError::Codec {
            path: name.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Body {
        name: String,
        values: Vec<u64>,
    }

    fn body() -> Body {
        Body {
            name: "vm".into(),
            values: vec![1, 2, 3],
        }
    }

    fn encoded() -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!(
            "vmm-format-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let len = write_state(&path, &body()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(read_state::<Body>(&path).unwrap(), body());
        std::fs::remove_dir_all(&dir).unwrap();
        bytes
    }

    #[test]
    fn round_trips_and_refuses_every_damage() {
        let good = encoded();
        assert_eq!(decode::<Body>(&good, "s").unwrap(), body());
        // Any one flipped byte is caught: the magic, the version, the length, or the checksum.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode::<Body>(&bad, "s").is_err(), "flip at {i} accepted");
        }
        for cut in [0, 4, 19, 20, good.len() - 1] {
            assert!(
                decode::<Body>(&good[..cut], "s").is_err(),
                "cut at {cut} accepted"
            );
        }
        let mut newer = good.clone();
        newer[8] = FORMAT_VERSION as u8 + 1;
        assert!(matches!(
            decode::<Body>(&newer, "s"),
            Err(FormatError::Version { found, .. }) if found == FORMAT_VERSION + 1
        ));
    }

    #[test]
    fn a_body_claiming_huge_lengths_allocates_nothing_big() {
        // A valid frame around a body whose string length says 2^60 bytes.
        let mut body = Vec::new();
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        let crc = Crc64::of(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode::<Body>(&bytes, "s"),
            Err(FormatError::Codec { .. })
        ));
    }
}
