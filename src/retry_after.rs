//! Reading `Retry-After`: the one parser, for the upstream client (a floor on its retry
//! backoff) and the `warm` command (how long to wait after `503 overloaded`).

use http::HeaderMap;
use http::header::RETRY_AFTER;
use std::time::Duration;

/// The wait a `Retry-After` header asks for, in its delay-seconds form (RFC 9110 §10.2.3);
/// `None` when there is none or it cannot be read. Callers cap it to what they will wait.
/// The HTTP-date form is not read: neither the discount service nor the proxy sends it.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    let seconds = value.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(seconds))
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
        assert_eq!(retry_after(&header("Wed, 21 Oct 2015 07:28:00 GMT")), None);
    }
}
