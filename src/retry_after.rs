//! Reading `Retry-After`: the one parser, for the upstream client (a floor on its retry
//! backoff) and the `warm` command (how long to wait after `503 overloaded`).

use http::HeaderMap;
use http::header::RETRY_AFTER;
use std::time::{Duration, SystemTime};

/// The wait a `Retry-After` header asks for, in either of its forms (RFC 9110 §10.2.3):
/// delay-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`, and the two
/// obsolete date formats, which senders may still use), a date being counted from now. A
/// date already past asks for no wait. `None` when there is no header or it cannot be read.
/// Callers cap it to what they will wait.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, SystemTime::now())
}

/// [`retry_after`], with a date counted from `now`.
fn retry_after_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn header(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn seconds_are_read_whatever_their_size() {
        assert_eq!(retry_after(&header(" 2 ")), Some(Duration::from_secs(2)));
        assert_eq!(
            retry_after(&header("18446744073709551615")),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn a_missing_or_unreadable_header_is_none() {
        assert_eq!(retry_after(&HeaderMap::new()), None);
        assert_eq!(retry_after(&header("soon")), None);
        assert_eq!(retry_after(&header("-1")), None);
        assert_eq!(retry_after(&header("Wed, 32 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(&header("2015-10-21T07:28:00Z")), None);
    }

    #[test]
    fn a_date_asks_for_the_wait_until_then_in_every_format_rfc_9110_allows() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        for later in [
            "Wed, 21 Oct 2015 07:28:30 GMT",
            "Wednesday, 21-Oct-15 07:28:30 GMT",
            "Wed Oct 21 07:28:30 2015",
        ] {
            assert_eq!(
                retry_after_at(&header(later), now),
                Some(Duration::from_secs(30)),
                "{later}"
            );
        }
    }

    #[test]
    fn a_date_already_past_asks_for_no_wait() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let earlier = header("Wed, 21 Oct 2015 07:00:00 GMT");
        assert_eq!(retry_after_at(&earlier, now), Some(Duration::ZERO));
    }
}
