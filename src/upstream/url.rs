//! Where the upstream is asked about one SN: the `{sn}` template with the SN percent-encoded.

use super::UpstreamError;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but RFC 3986's unreserved characters is percent-encoded in the SN.
const SN_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `{sn}` URL template, split once so building a URL is two copies and an encode.
/// `Debug` redacts it: its query may hold an API key.
#[derive(Clone)]
pub(super) struct UrlTemplate {
    before: String,
    after: String,
    /// `{sn}` stands in the path, where `.` and `..` would be read as dot segments.
    in_path: bool,
}

impl UrlTemplate {
    pub(super) fn parse(template: &str) -> Self {
        let (before, after) = template.split_once("{sn}").unwrap_or((template, ""));
        Self {
            before: before.to_owned(),
            after: after.to_owned(),
            in_path: !before.contains(['?', '#']),
        }
    }

    pub(super) fn url_for(&self, sn: &str) -> Result<String, UpstreamError> {
        if self.in_path && matches!(sn, "." | "..") {
            // Even percent-encoded, URL parsers resolve these, which would ask for another
            // resource and cache its answer under this SN.
            return Err(UpstreamError::Url(format!(
                "the SN {sn:?} cannot stand in a URL path"
            )));
        }
        Ok(self.url_string(sn))
    }

    fn url_string(&self, sn: &str) -> String {
        let mut url = String::with_capacity(self.before.len() + sn.len() * 3 + self.after.len());
        url.push_str(&self.before);
        url.extend(utf8_percent_encode(sn, SN_ENCODE_SET));
        url.push_str(&self.after);
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sns_are_percent_encoded_into_the_template() {
        let template = UrlTemplate::parse("http://up:8000/contract/?sn={sn}&x=1");
        assert_eq!(
            template.url_string("C2024-0001"),
            "http://up:8000/contract/?sn=C2024-0001&x=1"
        );
        assert_eq!(
            template.url_string("a/b&c=d#e"),
            "http://up:8000/contract/?sn=a%2Fb%26c%3Dd%23e&x=1"
        );
        assert_eq!(
            template.url_string("合"),
            "http://up:8000/contract/?sn=%E5%90%88&x=1"
        );
        assert_eq!(
            template.url_string("a+b%"),
            "http://up:8000/contract/?sn=a%2Bb%25&x=1"
        );
    }

    #[test]
    fn dot_sns_are_refused_only_where_they_would_be_path_segments() {
        let in_query = UrlTemplate::parse("http://up/contract/?sn={sn}");
        assert_eq!(in_query.url_for("..").unwrap(), "http://up/contract/?sn=..");
        let in_path = UrlTemplate::parse("http://up/contract/{sn}/discount");
        assert!(matches!(in_path.url_for(".."), Err(UpstreamError::Url(_))));
        assert!(matches!(in_path.url_for("."), Err(UpstreamError::Url(_))));
        assert_eq!(
            in_path.url_for("...").unwrap(),
            "http://up/contract/.../discount"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn valid_sn() -> impl Strategy<Value = String> {
            prop_oneof!["[!-~]{1,128}", "\\PC{1,40}", "\\.{1,3}"]
                .prop_filter("a valid SN", |sn| crate::sn::validate(sn).is_ok())
        }

        const IN_QUERY: &str = "http://up:8000/contract/?sn={sn}&x=1";
        const IN_PATH: &str = "https://up/v1/contract/{sn}/discount?x=1";

        /// The template's URL with a harmless SN, for what must not change.
        fn sample(template: &str) -> url::Url {
            url::Url::parse(&template.replace("{sn}", "SAMPLE")).unwrap()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn an_sn_in_the_query_is_one_value_and_adds_no_parameter(sn in valid_sn()) {
                let built = UrlTemplate::parse(IN_QUERY).url_for(&sn).unwrap();
                let url = url::Url::parse(&built).unwrap();
                let expected = sample(IN_QUERY);
                prop_assert_eq!(url.origin(), expected.origin());
                prop_assert_eq!(url.path(), expected.path());
                prop_assert_eq!(url.fragment(), None);
                let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
                prop_assert_eq!(
                    pairs,
                    vec![("sn".to_owned(), sn), ("x".to_owned(), "1".to_owned())]
                );
            }

            #[test]
            fn an_sn_in_the_path_is_one_segment_or_refused(sn in valid_sn()) {
                let Ok(built) = UrlTemplate::parse(IN_PATH).url_for(&sn) else {
                    prop_assert!(sn == "." || sn == "..", "{:?} refused", sn);
                    return Ok(());
                };
                let url = url::Url::parse(&built).unwrap();
                let expected = sample(IN_PATH);
                prop_assert_eq!(url.origin(), expected.origin());
                prop_assert_eq!(url.query(), Some("x=1"));
                prop_assert_eq!(url.fragment(), None);
                let segments: Vec<&str> = url.path_segments().unwrap().collect();
                prop_assert_eq!(segments.len(), 4);
                prop_assert_eq!(&segments[..2], &["v1", "contract"]);
                prop_assert_eq!(segments[3], "discount");
                let decoded = percent_encoding::percent_decode_str(segments[2]).decode_utf8();
                prop_assert_eq!(decoded.unwrap(), sn.as_str());
            }
        }
    }
}
