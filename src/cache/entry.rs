//! The bytes stored per SN: a short text header (kind, fetch time) and the upstream's JSON.
//!
//! Layout: `dp1` + `+` (found) or `-` (not found) + the fetch time in Unix milliseconds as 13
//! digits + a space + the discount JSON (empty for not-found). A hit is answered by slicing
//! the JSON out of the stored bytes; it is never parsed again.
//!
//! The JSON we write is always on one line (the upstream's body is compacted first), so a
//! value whose JSON holds a line break was written by someone else: spliced into an NDJSON
//! response it would end a line early and inject the rest as lines of its own. Decoding
//! refuses it, which costs one scan of the bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 3] = b"dp1";
const TIME_DIGITS: usize = 13;
const HEADER_LEN: usize = MAGIC.len() + 1 + TIME_DIGITS + 1;

/// Whether the upstream knew the SN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// The upstream returned a discount; the entry holds its JSON.
    Found,
    /// The upstream answered `404`; the entry remembers that the SN does not exist.
    NotFound,
}

/// A stored value that could not be decoded; treated as a miss and overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cache entry is not in the dp1 format")]
pub struct EntryError;

/// A decoded cache entry, holding the stored bytes without copying them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    kind: EntryKind,
    fetched_at_ms: u64,
    raw: Bytes,
}

impl Entry {
    /// An entry for a discount the upstream returned at `fetched_at`.
    pub fn found(discount_json: &[u8], fetched_at: SystemTime) -> Self {
        Self::encode(EntryKind::Found, discount_json, fetched_at)
    }

    /// A negative entry: the upstream said the SN does not exist.
    pub fn not_found(fetched_at: SystemTime) -> Self {
        Self::encode(EntryKind::NotFound, b"", fetched_at)
    }

    fn encode(kind: EntryKind, payload: &[u8], fetched_at: SystemTime) -> Self {
        let fetched_at_ms = unix_millis(fetched_at);
        let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
        buf.put_slice(MAGIC);
        buf.put_u8(match kind {
            EntryKind::Found => b'+',
            EntryKind::NotFound => b'-',
        });
        // Into the buffer directly: no temporary string per write-back.
        let _ = write!(buf, "{fetched_at_ms:0TIME_DIGITS$}");
        buf.put_u8(b' ');
        buf.put_slice(payload);
        Self {
            kind,
            fetched_at_ms,
            raw: buf.freeze(),
        }
    }

    /// Decodes stored bytes.
    ///
    /// # Errors
    /// Bytes that are not a `dp1` entry we could have written: another writer's, a truncated
    /// value, or JSON on more than one line.
    pub fn decode(raw: Bytes) -> Result<Self, EntryError> {
        let (kind, fetched_at_ms) = parse(&raw)?;
        Ok(Self {
            kind,
            fetched_at_ms,
            raw,
        })
    }

    /// Whether `raw` is an entry we could have written, without keeping it: what a tier
    /// checks before it copies a value it did not write.
    pub fn is_well_formed(raw: &[u8]) -> bool {
        parse(raw).is_ok()
    }

    /// Whether this entry is a discount or a remembered `not_found`.
    pub fn kind(&self) -> EntryKind {
        self.kind
    }

    /// The discount JSON exactly as the upstream sent it (`None` for a negative entry),
    /// taking the entry apart: no reference count is touched, which on the
    /// hit path (a hundred SNs per request, shared copies read by every thread) is measurable.
    pub fn into_discount(self) -> Option<Bytes> {
        match self.kind {
            EntryKind::Found => {
                let mut raw = self.raw;
                raw.advance(HEADER_LEN);
                Some(raw)
            }
            EntryKind::NotFound => None,
        }
    }

    /// How long ago the upstream gave this answer (zero if the clock went backwards).
    pub fn age(&self, now: SystemTime) -> Duration {
        Duration::from_millis(unix_millis(now).saturating_sub(self.fetched_at_ms))
    }

    /// The bytes to store.
    pub fn encoded(&self) -> &Bytes {
        &self.raw
    }
}

/// The kind and fetch time of a stored value, if it is an entry we could have written.
fn parse(raw: &[u8]) -> Result<(EntryKind, u64), EntryError> {
    let header = raw.get(..HEADER_LEN).ok_or(EntryError)?;
    if &header[..MAGIC.len()] != MAGIC || header[HEADER_LEN - 1] != b' ' {
        return Err(EntryError);
    }
    let kind = match header[MAGIC.len()] {
        b'+' if is_single_line_payload(&raw[HEADER_LEN..]) => EntryKind::Found,
        b'-' if raw.len() == HEADER_LEN => EntryKind::NotFound,
        _ => return Err(EntryError),
    };
    let digits = &header[MAGIC.len() + 1..HEADER_LEN - 1];
    let fetched_at_ms = parse_digits(digits).ok_or(EntryError)?;
    Ok((kind, fetched_at_ms))
}

/// A found entry's JSON as we write it: present, and on one line.
fn is_single_line_payload(json: &[u8]) -> bool {
    !json.is_empty() && !json.contains(&b'\n') && !json.contains(&b'\r')
}

fn unix_millis(time: SystemTime) -> u64 {
    let millis = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(millis).unwrap_or(u64::MAX)
}

fn parse_digits(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &digit| {
        digit
            .is_ascii_digit()
            .then(|| acc * 10 + u64::from(digit - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn found_entries_round_trip_and_splice_the_json_verbatim() {
        let json = br#"{"ratio": "0.35", "note": "\u4f18"}"#;
        let entry = Entry::found(json, at(1_732_254_000_123));
        assert!(entry.encoded().starts_with(b"dp1+1732254000123 "));
        let decoded = Entry::decode(entry.encoded().clone()).unwrap();
        assert_eq!(decoded.kind(), EntryKind::Found);
        assert_eq!(decoded.age(at(1_732_254_001_123)), Duration::from_secs(1));
        assert_eq!(decoded.into_discount().as_deref(), Some(&json[..]));
    }

    #[test]
    fn negative_entries_round_trip_without_a_payload() {
        let entry = Entry::not_found(at(5));
        let decoded = Entry::decode(entry.encoded().clone()).unwrap();
        assert_eq!(decoded.kind(), EntryKind::NotFound);
        assert_eq!(decoded.into_discount(), None);
    }

    #[test]
    fn foreign_or_truncated_values_are_rejected() {
        for raw in [
            &b""[..],
            b"{\"ratio\":1}",
            b"dp1+17322540001",
            b"dp1+1732254000123 ",
            b"dp1-1732254000123 junk",
            b"dp1*1732254000123 {}",
            b"dp1+17322540001x3 {}",
            b"dp2+1732254000123 {}",
            b"dp1+1732254000123 {\"a\":\n1}",
            b"dp1+1732254000123 {}\n{\"sn\":\"x\"}",
            b"dp1+1732254000123 {}\r",
        ] {
            assert_eq!(
                Entry::decode(Bytes::copy_from_slice(raw)),
                Err(EntryError),
                "{raw:?}"
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        /// Any JSON value, written the way the upstream client stores it: one line.
        fn discount_json() -> impl Strategy<Value = Vec<u8>> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<String>().prop_map(Value::from),
            ];
            let value = leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    proptest::collection::btree_map(any::<String>(), inner, 0..4)
                        .prop_map(|map| Value::Object(map.into_iter().collect())),
                ]
            });
            value.prop_map(|value| serde_json::to_vec(&value).unwrap())
        }

        /// Fetch times the 13 digits can hold.
        fn fetched_at() -> impl Strategy<Value = SystemTime> {
            (0u64..10_000_000_000_000).prop_map(at)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn every_found_entry_we_write_decodes_to_its_json_and_age(
                json in discount_json(),
                fetched_at in fetched_at(),
                later_ms in 0u64..1_000_000,
            ) {
                let entry = Entry::found(&json, fetched_at);
                prop_assert!(Entry::is_well_formed(entry.encoded()));
                let decoded = Entry::decode(entry.encoded().clone()).unwrap();
                prop_assert_eq!(decoded.kind(), EntryKind::Found);
                let later = fetched_at + Duration::from_millis(later_ms);
                prop_assert_eq!(decoded.age(later), Duration::from_millis(later_ms));
                let discount = decoded.into_discount();
                prop_assert_eq!(discount.as_deref(), Some(&json[..]));
            }

            #[test]
            fn every_not_found_entry_we_write_decodes_without_a_discount(
                fetched_at in fetched_at(),
            ) {
                let entry = Entry::not_found(fetched_at);
                let decoded = Entry::decode(entry.encoded().clone()).unwrap();
                prop_assert_eq!(decoded.kind(), EntryKind::NotFound);
                prop_assert_eq!(decoded.age(fetched_at), Duration::ZERO);
                prop_assert_eq!(decoded.into_discount(), None);
            }

            #[test]
            fn any_bytes_decode_cleanly_and_never_to_json_that_breaks_a_line(
                raw in prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    // Behind a valid header, so the payload checks are what is exercised.
                    (prop_oneof![Just(&b"dp1+"[..]), Just(&b"dp1-"[..])],
                     proptest::collection::vec(any::<u8>(), 0..40))
                        .prop_map(|(head, tail)| {
                            let mut raw = head.to_vec();
                            raw.extend_from_slice(b"1732254000123 ");
                            raw.extend_from_slice(&tail);
                            raw
                        }),
                ],
            ) {
                let decoded = Entry::decode(Bytes::from(raw.clone()));
                prop_assert_eq!(decoded.is_ok(), Entry::is_well_formed(&raw));
                if let Ok(entry) = decoded {
                    if let Some(json) = entry.into_discount() {
                        prop_assert!(!json.is_empty());
                        prop_assert!(!json.contains(&b'\n') && !json.contains(&b'\r'));
                    }
                }
            }
        }
    }
}
