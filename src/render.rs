//! Response bodies written straight into one buffer. Cached discount JSON is spliced in as
//! bytes, never parsed again; only SNs and messages go through a JSON string escaper.

use crate::lookup::{Batch, Outcome, Source, Summary};

/// The `{"results": [...], "summary": {...}}` body of a batch lookup.
pub fn batch(batch: &Batch) -> Vec<u8> {
    let payload: usize = batch
        .outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Found { discount, .. } => discount.len(),
            _ => 0,
        })
        .sum();
    let mut buf = Vec::with_capacity(payload + batch.order.len() * 80 + 256);
    buf.extend_from_slice(b"{\"results\":[");
    for (position, (sn, outcome)) in batch.in_request_order().enumerate() {
        if position > 0 {
            buf.push(b',');
        }
        item_into(&mut buf, sn, outcome);
    }
    buf.extend_from_slice(b"],\"summary\":");
    // A derived Serialize of plain integers cannot fail.
    let _ = serde_json::to_writer(&mut buf, &batch.summary);
    buf.push(b'}');
    buf
}

/// One result item: `{"sn": ..., "status": ..., "source"|"error": ...}`.
pub fn item(sn: &str, outcome: &Outcome) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128);
    item_into(&mut buf, sn, outcome);
    buf
}

fn item_into(buf: &mut Vec<u8>, sn: &str, outcome: &Outcome) {
    buf.extend_from_slice(b"{\"sn\":");
    string_into(buf, sn);
    match outcome {
        Outcome::Found { discount, source } => {
            buf.extend_from_slice(b",\"status\":\"ok\",\"source\":\"");
            buf.extend_from_slice(source.as_str().as_bytes());
            buf.extend_from_slice(b"\",\"discount\":");
            buf.extend_from_slice(discount);
        }
        Outcome::NotFound { source } => {
            buf.extend_from_slice(b",\"status\":\"not_found\",\"source\":\"");
            buf.extend_from_slice(source.as_str().as_bytes());
            buf.push(b'"');
        }
        Outcome::Invalid(err) => {
            buf.extend_from_slice(b",\"status\":\"invalid\",");
            error_field_into(buf, "invalid_sn", &err.to_string());
        }
        Outcome::Failed(err) => {
            buf.extend_from_slice(b",\"status\":\"error\",");
            error_field_into(buf, err.code(), &err.to_string());
        }
    }
    buf.push(b'}');
}

/// A single GET's `404`: the item, plus the `error` object every error response carries.
pub fn not_found_single(sn: &str, source: Source) -> Vec<u8> {
    let mut buf = item(sn, &Outcome::NotFound { source });
    buf.pop(); // the item's closing brace
    buf.push(b',');
    error_field_into(&mut buf, "not_found", "no discount exists for this SN");
    buf.push(b'}');
    buf
}

/// `{"summary": {...}}`, the last line of a streamed lookup.
pub fn summary(summary: &Summary) -> Vec<u8> {
    let mut buf = Vec::with_capacity(192);
    buf.extend_from_slice(b"{\"summary\":");
    // A derived Serialize of plain integers cannot fail.
    let _ = serde_json::to_writer(&mut buf, summary);
    buf.push(b'}');
    buf
}

/// One NDJSON line: the JSON, then a newline (the JSON itself is single-line: upstream bodies
/// are compacted before they are stored, and a cached value with a raw line break is refused
/// when read, see `cache/entry.rs`).
pub fn line(mut json: Vec<u8>) -> bytes::Bytes {
    json.push(b'\n');
    json.into()
}

/// The body of every error response: `{"error": {"code": ..., "message": ...}}`.
pub fn error(code: &str, message: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + message.len());
    buf.push(b'{');
    error_field_into(&mut buf, code, message);
    buf.push(b'}');
    buf
}

fn error_field_into(buf: &mut Vec<u8>, code: &str, message: &str) {
    buf.extend_from_slice(b"\"error\":{\"code\":");
    string_into(buf, code);
    buf.extend_from_slice(b",\"message\":");
    string_into(buf, message);
    buf.push(b'}');
}

fn string_into(buf: &mut Vec<u8>, value: &str) {
    // The common SN needs no escaping: printable ASCII without quotes or backslashes.
    if value
        .bytes()
        .all(|byte| byte.is_ascii_graphic() && byte != b'"' && byte != b'\\')
    {
        buf.push(b'"');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'"');
        return;
    }
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::{ItemError, Summary};
    use crate::sn::SnError;
    use bytes::Bytes;
    use serde_json::{Value, json};

    #[test]
    fn batch_bodies_are_valid_json_in_request_order() {
        let batch = Batch {
            distinct: vec![
                "A\"1".to_owned(),
                "B".to_owned(),
                "".to_owned(),
                "D".to_owned(),
            ],
            outcomes: vec![
                Outcome::Found {
                    discount: Bytes::from_static(br#"{"ratio":"0.35"}"#),
                    source: Source::Cache,
                },
                Outcome::NotFound {
                    source: Source::Upstream,
                },
                Outcome::Invalid(SnError::Empty),
                Outcome::Failed(ItemError::DeadlineExceeded),
            ],
            order: vec![0, 1, 0, 2, 3],
            summary: Summary {
                requested: 5,
                unique: 4,
                ..Summary::default()
            },
        };
        let body: Value = serde_json::from_slice(&super::batch(&batch)).unwrap();
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 5);
        assert_eq!(
            results[0],
            json!({"sn": "A\"1", "status": "ok", "source": "cache", "discount": {"ratio": "0.35"}})
        );
        assert_eq!(
            results[1],
            json!({"sn": "B", "status": "not_found", "source": "upstream"})
        );
        assert_eq!(results[2], results[0]);
        assert_eq!(results[3]["error"]["code"], "invalid_sn");
        assert_eq!(results[4]["error"]["code"], "deadline_exceeded");
        assert_eq!(body["summary"]["requested"], 5);
    }

    #[test]
    fn strings_are_escaped_only_when_they_need_it() {
        for value in [
            "SN-001",
            "a\\b",
            "q\"uote",
            "caf\u{e9}",
            "tab\there",
            "</script>",
        ] {
            let mut buf = Vec::new();
            string_into(&mut buf, value);
            let back: String = serde_json::from_slice(&buf).unwrap();
            assert_eq!(back, value);
        }
    }

    #[test]
    fn error_bodies_escape_messages() {
        let body: Value =
            serde_json::from_slice(&error("invalid_json", "bad \"quote\"\n")).unwrap();
        assert_eq!(
            body,
            json!({"error": {"code": "invalid_json", "message": "bad \"quote\"\n"}})
        );
    }
}
