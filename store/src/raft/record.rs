//! Checksummed record framing shared by the log segments, the vote/meta files and the
//! snapshot file.
//!
//! A record is a 12-byte header followed by the payload:
//! `len: u32 LE | !len: u32 LE | crc32(payload): u32 LE | payload`.
//! The length is stored twice (the second copy inverted) so a damaged length field is
//! recognised as corruption instead of being mistaken for a record that runs past the end
//! of the file. This lets [`scan`] tell the two cases the recovery code must treat
//! differently (the same distinction etcd's WAL draws, where a torn final record is
//! repaired and a CRC mismatch is fatal):
//! - a **torn tail**: the file ends inside the last record, or only zero bytes follow the
//!   last good record — what an interrupted write leaves behind;
//! - **corruption**: a complete record whose header or checksum does not verify.

use serde::{de::DeserializeOwned, Serialize};

/// Size of a record header.
pub(crate) const HEADER_LEN: usize = 12;

/// Largest payload accepted when reading (guards against allocating for garbage lengths).
pub(crate) const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

/// Frames `payload` as one record.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    push_frame(&mut out, payload);
    out
}

/// Appends `payload` framed as one record to `out`.
pub(crate) fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// How a scan of a buffer of records ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    /// Every byte belonged to a complete, valid record.
    Clean,
    /// The bytes from `offset` on are an incomplete record or zero fill: an interrupted
    /// write.
    Torn {
        /// Offset of the first byte that is not part of a valid record.
        offset: usize,
    },
    /// The record at `offset` is complete but does not verify.
    Corrupt {
        /// Offset of the bad record.
        offset: usize,
        /// What did not verify.
        reason: &'static str,
    },
}

/// Splits `buf` into record payloads (with their offsets) and says how the scan ended.
pub(crate) fn scan(buf: &[u8]) -> (Vec<(usize, &[u8])>, ScanEnd) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let rest = &buf[pos..];
        if rest.iter().all(|b| *b == 0) {
            return (out, ScanEnd::Torn { offset: pos });
        }
        if rest.len() < HEADER_LEN {
            return (out, ScanEnd::Torn { offset: pos });
        }
        let len = u32_at(rest, 0);
        let check = u32_at(rest, 4);
        let crc = u32_at(rest, 8);
        if check != !len || len as usize > MAX_PAYLOAD {
            return (
                out,
                ScanEnd::Corrupt {
                    offset: pos,
                    reason: "record header does not verify",
                },
            );
        }
        let end = HEADER_LEN + len as usize;
        if rest.len() < end {
            return (out, ScanEnd::Torn { offset: pos });
        }
        let payload = &rest[HEADER_LEN..end];
        if crc32fast::hash(payload) != crc {
            return (
                out,
                ScanEnd::Corrupt {
                    offset: pos,
                    reason: "record checksum mismatch",
                },
            );
        }
        out.push((pos, payload));
        pos += end;
    }
    (out, ScanEnd::Clean)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Encodes a value with bincode's standard configuration.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
}

/// Decodes a value encoded by [`encode`], rejecting trailing bytes.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the encoded value",
            bytes.len() - used
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for p in payloads {
            push_frame(&mut buf, p);
        }
        buf
    }

    #[test]
    fn truncated_final_record_is_torn() {
        let buf = framed(&[b"one".to_vec(), b"two".to_vec()]);
        let second = HEADER_LEN + 3;
        for cut in second + 1..buf.len() {
            let (recs, end) = scan(&buf[..cut]);
            assert_eq!(recs.len(), 1);
            assert_eq!(end, ScanEnd::Torn { offset: second });
        }
    }

    #[test]
    fn flipped_payload_byte_is_corrupt() {
        let mut buf = framed(&[b"one".to_vec(), b"two".to_vec()]);
        let last = buf.len() - 1;
        buf[last] ^= 0x40;
        let (recs, end) = scan(&buf);
        assert_eq!(recs.len(), 1);
        assert!(matches!(end, ScanEnd::Corrupt { offset, .. } if offset == HEADER_LEN + 3));
    }

    #[test]
    fn damaged_length_is_corrupt_not_torn() {
        let mut buf = framed(&[b"one".to_vec(), b"two".to_vec()]);
        buf[0] = 0xff;
        let (recs, end) = scan(&buf);
        assert!(recs.is_empty());
        assert!(matches!(end, ScanEnd::Corrupt { offset: 0, .. }));
    }

    #[test]
    fn zero_fill_after_records_is_torn() {
        let mut buf = framed(&[b"one".to_vec()]);
        let at = buf.len();
        buf.extend_from_slice(&[0u8; 40]);
        assert_eq!(scan(&buf).1, ScanEnd::Torn { offset: at });
    }

    proptest! {
        #[test]
        fn roundtrip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20)) {
            let buf = framed(&payloads);
            let (recs, end) = scan(&buf);
            prop_assert_eq!(end, ScanEnd::Clean);
            let got: Vec<Vec<u8>> = recs.into_iter().map(|(_, p)| p.to_vec()).collect();
            prop_assert_eq!(got, payloads);
        }

        /// Whatever garbage follows valid records, the scan never panics, never returns
        /// more records than were written, and returns the valid prefix unchanged.
        #[test]
        fn garbage_never_panics(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..32), 1..8),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = framed(&payloads);
            buf.extend_from_slice(&garbage);
            let (recs, _) = scan(&buf);
            prop_assert!(recs.len() >= payloads.len());
            for (i, p) in payloads.iter().enumerate() {
                prop_assert_eq!(recs[i].1, p.as_slice());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = scan(&bytes);
        }
    }
}
