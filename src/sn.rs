//! What a valid contract serial number (SN) is, checked before any work is done for it.

/// The longest SN accepted, in bytes of UTF-8.
pub const MAX_SN_BYTES: usize = 128;

/// Why an SN was rejected; the message goes back to the client as-is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SnError {
    /// The SN is the empty string.
    #[error("SN is empty")]
    Empty,
    /// The SN is longer than `MAX_SN_BYTES`; holds its length in bytes.
    #[error("SN is {0} bytes long; at most {MAX_SN_BYTES} are allowed")]
    TooLong(usize),
    /// The SN contains a control character, such as `\r` or `\n`, that could inject commands.
    #[error("SN contains a control character")]
    ControlCharacter,
    /// The SN contains whitespace, Unicode spaces included.
    #[error("SN contains whitespace")]
    Whitespace,
    /// A percent-decoded path segment is not valid UTF-8.
    #[error("SN is not valid UTF-8")]
    NotUtf8,
}

/// Checks an SN: 1 to 128 bytes of UTF-8, no control characters, no whitespace.
///
/// Because every SN becomes part of a Redis key and an upstream URL, this is the gate that keeps
/// `"a\r\nFLUSHALL"` and friends out of both.
pub fn validate(sn: &str) -> Result<(), SnError> {
    if sn.is_empty() {
        return Err(SnError::Empty);
    }
    if sn.len() > MAX_SN_BYTES {
        return Err(SnError::TooLong(sn.len()));
    }
    // The common case, checked a byte at a time: printable ASCII, no space.
    if sn.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Ok(());
    }
    for ch in sn.chars() {
        if ch.is_control() {
            return Err(SnError::ControlCharacter);
        }
        if ch.is_whitespace() {
            return Err(SnError::Whitespace);
        }
    }
    Ok(())
}

/// Percent-decodes an SN taken from a URL path, then validates it.
pub fn decode_path_segment(raw: &str) -> Result<String, SnError> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| SnError::NotUtf8)?
        .into_owned();
    validate(&decoded)?;
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_and_unicode_sns_are_valid() {
        assert_eq!(validate("C2024-0001"), Ok(()));
        assert_eq!(validate("合同-2024/07"), Ok(()));
        assert_eq!(validate(&"a".repeat(128)), Ok(()));
    }

    #[test]
    fn bad_sns_are_rejected_with_the_reason() {
        assert_eq!(validate(""), Err(SnError::Empty));
        assert_eq!(validate(&"a".repeat(129)), Err(SnError::TooLong(129)));
        assert_eq!(validate("a\r\nFLUSHALL"), Err(SnError::ControlCharacter));
        assert_eq!(validate("a\0b"), Err(SnError::ControlCharacter));
        assert_eq!(validate("a b"), Err(SnError::Whitespace));
        assert_eq!(validate("a\u{3000}b"), Err(SnError::Whitespace));
        assert_eq!(validate("a\u{85}b"), Err(SnError::ControlCharacter));
    }

    #[test]
    fn path_segments_are_percent_decoded_before_validation() {
        assert_eq!(decode_path_segment("C%2F1").as_deref(), Ok("C/1"));
        assert_eq!(decode_path_segment("%E5%90%88").as_deref(), Ok("合"));
        assert_eq!(
            decode_path_segment("a%0D%0Ab"),
            Err(SnError::ControlCharacter)
        );
        assert_eq!(decode_path_segment("%FF"), Err(SnError::NotUtf8));
        assert_eq!(decode_path_segment("a%20b"), Err(SnError::Whitespace));
    }

    mod properties {
        use super::*;
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        use proptest::prelude::*;

        /// Strings near the boundary of valid: printable ASCII (`/`, `%`, `?`, `.` included),
        /// any non-control character, and anything at all.
        fn candidate() -> impl Strategy<Value = String> {
            prop_oneof![
                "[!-~]{0,140}",
                "\\PC{0,70}",
                any::<String>(),
                "[a-z]{0,4}[\\r\\n\\t\\u{0}\\u{85} \\u{3000}][a-z]{0,4}",
            ]
        }

        fn valid_sn() -> impl Strategy<Value = String> {
            prop_oneof!["[!-~]{1,128}", "\\PC{1,40}"]
                .prop_filter("a valid SN", |sn| validate(sn).is_ok())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn an_sn_is_valid_exactly_when_it_is_short_and_free_of_controls_and_spaces(
                sn in candidate(),
            ) {
                let clean = !sn.chars().any(|ch| ch.is_control() || ch.is_whitespace());
                let expected = !sn.is_empty() && sn.len() <= MAX_SN_BYTES && clean;
                prop_assert_eq!(validate(&sn).is_ok(), expected, "{:?}", sn);
                if expected {
                    // Nothing that could end a line, a command or a key early.
                    prop_assert!(!sn.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0 | b' ')));
                }
            }

            #[test]
            fn any_path_segment_decodes_to_a_valid_sn_or_a_clean_error(raw in candidate()) {
                if let Ok(sn) = decode_path_segment(&raw) {
                    prop_assert_eq!(validate(&sn), Ok(()));
                }
            }

            #[test]
            fn any_percent_encoded_segment_decodes_to_its_bytes_then_validates(
                bytes in proptest::collection::vec(any::<u8>(), 0..40),
            ) {
                let raw: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
                let expected = match std::str::from_utf8(&bytes) {
                    Err(_) => Err(SnError::NotUtf8),
                    Ok(text) => validate(text).map(|()| text.to_owned()),
                };
                prop_assert_eq!(decode_path_segment(&raw), expected);
            }

            #[test]
            fn every_valid_sn_survives_percent_encoding_in_a_path(sn in valid_sn()) {
                let encoded = utf8_percent_encode(&sn, NON_ALPHANUMERIC).to_string();
                prop_assert_eq!(decode_path_segment(&encoded), Ok(sn.clone()));
                // Unencoded, as a client may well send it, it is the same SN unless it holds
                // a `%` that starts an escape.
                if !sn.contains('%') {
                    prop_assert_eq!(decode_path_segment(&sn), Ok(sn));
                }
            }
        }
    }
}
