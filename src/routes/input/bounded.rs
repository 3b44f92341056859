//! The `{"sns": [...]}` body, parsed with `server.max_batch` enforced while parsing: the SN
//! past the bound ends the parse, so a body of millions of tiny strings never becomes
//! millions of `String`s.
//!
//! Everything else is refused exactly as a derived `Deserialize` would refuse it (missing or
//! duplicate `sns`, wrong types, syntax), and unknown fields are ignored as before.

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;
use std::fmt;

/// Why a body is not a batch of at most `max` SNs.
#[derive(Debug)]
pub(in crate::routes) enum BodyError {
    /// The `sns` array holds more than `max` elements; parsing stopped at the first past it.
    TooMany,
    /// Not JSON, or JSON of another shape; serde_json's own error, to classify.
    Json(serde_json::Error),
}

/// Parses `{"sns": [...]}` from `body`, stopping with [`BodyError::TooMany`] as soon as the
/// array holds more than `max` elements.
///
/// # Errors
/// [`BodyError::TooMany`] past the bound; [`BodyError::Json`] for anything serde_json refuses.
pub(in crate::routes) fn parse_sns(body: &[u8], max: usize) -> Result<Vec<String>, BodyError> {
    // The bound's error travels through serde_json as a plain `Data` error; this flag is
    // what tells it apart from a wrong type without comparing messages.
    let over = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = SnsBody { max, over: &over }
        .deserialize(&mut deserializer)
        .and_then(|sns| deserializer.end().map(|()| sns));
    parsed.map_err(|err| {
        if over.get() {
            BodyError::TooMany
        } else {
            BodyError::Json(err)
        }
    })
}

/// The body's fields: `sns`, and anything else, which is skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Sns,
    #[serde(other)]
    Other,
}

/// The whole body, as the derive for `struct SnsBody { sns: Vec<String> }` reads it.
#[derive(Clone, Copy)]
struct SnsBody<'a> {
    max: usize,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for SnsBody<'_> {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<String>, D::Error> {
        deserializer.deserialize_struct("SnsBody", &["sns"], self)
    }
}

impl<'de> Visitor<'de> for SnsBody<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct SnsBody")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let sns = self.bounded_sns();
        seq.next_element_seed(sns)?
            .ok_or_else(|| de::Error::invalid_length(0, &"struct SnsBody with 1 element"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
        let mut sns = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Sns if sns.is_some() => return Err(de::Error::duplicate_field("sns")),
                Field::Sns => sns = Some(map.next_value_seed(self.bounded_sns())?),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        sns.ok_or_else(|| de::Error::missing_field("sns"))
    }
}

impl<'a> SnsBody<'a> {
    fn bounded_sns(self) -> BoundedSns<'a> {
        BoundedSns {
            max: self.max,
            over: self.over,
        }
    }
}

/// The `sns` array: strings, at most `max` of them.
struct BoundedSns<'a> {
    max: usize,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for BoundedSns<'_> {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<String>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedSns<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut sns = Vec::new();
        while let Some(sn) = seq.next_element::<String>()? {
            if sns.len() == self.max {
                self.over.set(true);
                return Err(de::Error::custom(format_args!(
                    "more than {} SNs",
                    self.max
                )));
            }
            sns.push(sn);
        }
        Ok(sns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the parser gave before the bound moved into it: a derived struct, counted after.
    #[derive(Deserialize)]
    struct Derived {
        #[allow(dead_code)]
        sns: Vec<String>,
    }

    fn is_data_error(result: &Result<Vec<String>, BodyError>) -> bool {
        matches!(result, Err(BodyError::Json(err)) if err.classify() == serde_json::error::Category::Data)
    }

    #[test]
    fn parsing_stops_at_the_first_sn_past_the_bound() {
        // Three SNs allowed; the fourth ends the parse, so the garbage after it is never read.
        let body = br#"{"sns": ["A", "B", "C", "D", this is not JSON"#;
        assert!(matches!(parse_sns(body, 3), Err(BodyError::TooMany)));
        assert!(matches!(parse_sns(body, 4), Err(BodyError::Json(_))));
    }

    #[test]
    fn other_shapes_are_refused_as_the_derived_parser_refused_them() {
        for body in [
            r#"{}"#,
            r#"{"sns": "C1"}"#,
            r#"{"sns": [1]}"#,
            r#"{"sns": null}"#,
            r#"["C1"]"#,
            r#"[]"#,
            r#"{"sns": ["A"], "sns": ["B"]}"#,
            r#"{"sns": ["A"]} trailing"#,
            "\u{feff}{\"sns\": [\"A\"]}",
            r#"{"sns": ["A""#,
            r#"{"other": 1, "sns": ["A"], "more": {"x": [1, 2]}}"#,
            r#"[["A", "B"]]"#,
            r#"{"s\u006es": ["A"]}"#,
        ] {
            let derived = serde_json::from_str::<Derived>(body).map(|d| d.sns);
            let bounded = parse_sns(body.as_bytes(), 10);
            match (&derived, &bounded) {
                (Ok(derived), Ok(bounded)) => assert_eq!(derived, bounded, "{body}"),
                (Err(derived), Err(BodyError::Json(bounded))) => {
                    assert_eq!(derived.classify(), bounded.classify(), "{body}");
                }
                _ => panic!("{body}: derived {derived:?}, bounded {bounded:?}"),
            }
        }
        assert!(is_data_error(&parse_sns(
            br#"{"sns": ["A"], "sns": []}"#,
            10
        )));
    }

    /// Bodies made of JSON tokens, so that many of them are nearly or entirely a batch.
    fn json_ish() -> impl Strategy<Value = Vec<u8>> {
        let tokens = vec![
            "{", "}", "[", "]", ":", ",", " ", "\"sns\"", "\"x\"", "\"A\"", "\"\"", "1", "null",
        ];
        proptest::collection::vec(proptest::sample::select(tokens), 0..30)
            .prop_map(|tokens| tokens.concat().into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_list_within_the_bound_comes_back_whole_and_any_longer_one_is_too_many(
            sns in proptest::collection::vec(any::<String>(), 0..40),
            max in 0usize..40,
        ) {
            let body = serde_json::to_vec(&serde_json::json!({ "sns": sns })).unwrap();
            match parse_sns(&body, max) {
                Ok(parsed) => {
                    prop_assert!(sns.len() <= max);
                    prop_assert_eq!(parsed, sns);
                }
                Err(BodyError::TooMany) => prop_assert!(sns.len() > max),
                Err(BodyError::Json(err)) => prop_assert!(false, "{}", err),
            }
        }

        #[test]
        fn any_bytes_are_a_clean_answer_and_agree_with_the_derived_parser(
            body in prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), json_ish()],
        ) {
            let derived = serde_json::from_slice::<Derived>(&body).map(|d| d.sns);
            match (derived, parse_sns(&body, usize::MAX)) {
                (Ok(derived), Ok(bounded)) => prop_assert_eq!(derived, bounded),
                (Err(derived), Err(BodyError::Json(bounded))) => {
                    prop_assert_eq!(derived.classify(), bounded.classify());
                }
                (derived, bounded) => prop_assert!(false, "{:?} vs {:?}", derived, bounded),
            }
        }

        #[test]
        fn a_body_past_the_bound_is_too_many_whatever_follows_the_sn_past_it(
            max in 0usize..20,
            tail in proptest::collection::vec(any::<u8>(), 0..50),
        ) {
            let mut body = b"{\"sns\": [".to_vec();
            for _ in 0..=max {
                body.extend_from_slice(b"\"\",");
            }
            body.extend_from_slice(&tail);
            prop_assert!(matches!(parse_sns(&body, max), Err(BodyError::TooMany)));
        }
    }
}
