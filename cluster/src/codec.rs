//! How values are written to disk and to the Raft log: a format byte, then the value.
//!
//! Every stored value starts with a version byte ([`FORMAT_V1`]) so that a later release
//! can read what an earlier one wrote, and refuse (with
//! [`ClusterError::UnsupportedFormat`]) what it cannot. Cohort's own types are
//! bincode-encoded ([`encode`] / [`decode`]); Raft's protobuf messages keep their protobuf
//! encoding behind the same byte ([`encode_pb`] / [`decode_pb`]), and opaque bytes (the
//! state machine's snapshot inside a Raft snapshot) are stored as they are behind it
//! ([`encode_bytes`] / [`decode_bytes`]).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ClusterError;

/// The first (and current) format: bincode 2 `standard()` configuration, or protobuf for
/// Raft's messages.
pub const FORMAT_V1: u8 = 1;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` as `FORMAT_V1` followed by its bincode encoding.
///
/// # Panics
///
/// Only if `T`'s `Serialize` implementation fails under bincode: a sequence or map of
/// unknown length (`#[serde(flatten)]`, `serialize_seq(None)`), or a custom error. That is
/// a bug in the type, never a property of the data; the types of this crate always encode
/// (their tests prove it). Use [`try_encode`] for types that may fail.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    match try_encode(value) {
        Ok(bytes) => bytes,
        Err(e) => panic!("a value of this type cannot be bincode-encoded: {e}"),
    }
}

/// Like [`encode`], but returns bincode's error instead of panicking.
pub fn try_encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ClusterError> {
    let mut out = vec![FORMAT_V1];
    out.extend(bincode::serde::encode_to_vec(value, config())?);
    Ok(out)
}

/// Decodes what [`encode`] wrote. Rejects an unknown format byte, truncated input, and
/// trailing bytes after the value.
///
/// Safe on hostile input: bincode allocates a string or byte buffer as large as the length
/// written in front of it before reading it, so the decoder runs under a limit that
/// an honest value of this size never reaches: at most 64 times the input's length.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClusterError> {
    let body = strip_format(bytes)?;
    let (value, read) = decode_limited(body)?;
    if read != body.len() {
        return Err(ClusterError::Corrupt(format!(
            "{} trailing bytes after the value",
            body.len() - read
        )));
    }
    Ok(value)
}

/// Bytes bincode may claim per input byte for an honest value: an integer claims its
/// full width (16 bytes for a `u128`) however few bytes its varint took; strings and byte
/// buffers claim one byte per byte.
const CLAIM_PER_INPUT_BYTE: usize = 16;

/// Decodes `body` with a bincode limit of at least 16 times its length (the most an honest
/// value claims, see [`CLAIM_PER_INPUT_BYTE`]) and at most 4 times that, so a forged length
/// prefix cannot make the decoder allocate more than 64 times the input. Limits are
/// compile-time constants in bincode, hence the steps.
fn decode_limited<T: DeserializeOwned>(
    body: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    let need = body.len().saturating_mul(CLAIM_PER_INPUT_BYTE);
    macro_rules! within {
        ($($shift:literal)*) => {
            $(
                if need <= 1usize << $shift {
                    return bincode::serde::decode_from_slice(
                        body,
                        config().with_limit::<{ 1usize << $shift }>(),
                    );
                }
            )*
        };
    }
    within!(20 22 24 26 28 30 32 34 36 38 40);
    Err(bincode::error::DecodeError::LimitExceeded)
}

/// Encodes a Raft protobuf message as `FORMAT_V1` followed by its protobuf encoding.
pub fn encode_pb<M: protobuf::Message>(msg: &M) -> Result<Vec<u8>, ClusterError> {
    let mut out = vec![FORMAT_V1];
    msg.write_to_vec(&mut out)?;
    Ok(out)
}

/// Decodes what [`encode_pb`] wrote.
pub fn decode_pb<M: protobuf::Message>(bytes: &[u8]) -> Result<M, ClusterError> {
    let body = strip_format(bytes)?;
    Ok(M::parse_from_bytes(body)?)
}

/// Puts the format byte in front of opaque bytes (a state-machine snapshot).
pub fn encode_bytes(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(FORMAT_V1);
    out.extend_from_slice(data);
    out
}

/// Checks the format byte in front of what [`encode_bytes`] wrote and returns the bytes.
pub fn decode_bytes(bytes: &[u8]) -> Result<&[u8], ClusterError> {
    strip_format(bytes)
}

/// Checks the format byte and returns what follows it.
fn strip_format(bytes: &[u8]) -> Result<&[u8], ClusterError> {
    match bytes.split_first() {
        None => Err(ClusterError::MissingFormat),
        Some((&FORMAT_V1, body)) => Ok(body),
        Some((&found, _)) => Err(ClusterError::UnsupportedFormat {
            found,
            supported: FORMAT_V1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use raft::eraftpb::Entry;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u128,
        name: String,
        tags: BTreeMap<String, u32>,
        blob: Vec<u8>,
        maybe: Option<f64>,
    }

    fn sample() -> Sample {
        Sample {
            id: u128::MAX - 7,
            name: "gpu-box-1".into(),
            tags: [("zone".to_string(), 3)].into_iter().collect(),
            blob: vec![0, 1, 2, 255],
            maybe: Some(0.75),
        }
    }

    #[test]
    fn roundtrip() {
        let bytes = encode(&sample());
        assert_eq!(bytes[0], FORMAT_V1);
        let back: Sample = decode(&bytes).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn try_encode_reports_unencodable_values() {
        struct Unsized;
        impl Serialize for Unsized {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeSeq;
                s.serialize_seq(None)?.end()
            }
        }
        assert!(matches!(try_encode(&Unsized), Err(ClusterError::Encode(_))));
        assert_eq!(try_encode(&sample()).unwrap(), encode(&sample()));
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut bytes = encode(&sample());
        bytes[0] = 2;
        let err = decode::<Sample>(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                ClusterError::UnsupportedFormat {
                    found: 2,
                    supported: FORMAT_V1
                }
            ),
            "{err:?}"
        );
        let err = decode_pb::<Entry>(&[0, 8, 1]).unwrap_err();
        assert!(matches!(
            err,
            ClusterError::UnsupportedFormat { found: 0, .. }
        ));
    }

    #[test]
    fn empty_input_is_rejected() {
        assert!(matches!(
            decode::<Sample>(&[]).unwrap_err(),
            ClusterError::MissingFormat
        ));
        assert!(matches!(
            decode_pb::<Entry>(&[]).unwrap_err(),
            ClusterError::MissingFormat
        ));
    }

    #[test]
    fn truncated_input_is_rejected() {
        let bytes = encode(&sample());
        for len in 1..bytes.len() {
            let err = decode::<Sample>(&bytes[..len]).unwrap_err();
            assert!(matches!(err, ClusterError::Decode(_)), "len {len}: {err:?}");
        }
    }

    #[test]
    fn forged_lengths_do_not_allocate_wildly() {
        // A string claiming about 2^59 bytes, then nothing.
        let mut bytes = vec![FORMAT_V1, 253];
        bytes.extend_from_slice(&(1u64 << 59).to_le_bytes());
        let err = decode::<String>(&bytes).unwrap_err();
        assert!(matches!(err, ClusterError::Decode(_)), "{err:?}");
        let err = decode::<Sample>(&bytes).unwrap_err();
        assert!(matches!(err, ClusterError::Decode(_)), "{err:?}");
    }

    #[test]
    fn values_near_the_claim_bound_decode() {
        // u128s of value 0 take one byte each but claim sixteen.
        let ids = vec![0u128; 200_000];
        let back: Vec<u128> = decode(&encode(&ids)).unwrap();
        assert_eq!(back, ids);
        let blob = vec![7u8; 3 << 20];
        let back: Vec<u8> = decode(&encode(&blob)).unwrap();
        assert_eq!(back, blob);
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&sample());
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes).unwrap_err(),
            ClusterError::Corrupt(_)
        ));
    }

    #[test]
    fn protobuf_roundtrip_and_truncation() {
        let e = Entry {
            index: 42,
            term: 7,
            data: b"payload".to_vec().into(),
            ..Default::default()
        };
        let bytes = encode_pb(&e).unwrap();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(decode_pb::<Entry>(&bytes).unwrap(), e);
        let err = decode_pb::<Entry>(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(matches!(err, ClusterError::Protobuf(_)), "{err:?}");
    }
}
