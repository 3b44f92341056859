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

impl std::fmt::Debug for UrlTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let template = format!("{}{{sn}}{}", self.before, self.after);
        f.debug_tuple("UrlTemplate")
            .field(&crate::config::RedactedUrl(&template))
            .finish()
    }
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
}
