//! When a failed upstream request is tried again, and after how long.

use super::UpstreamError;
use reqwest::header::HeaderMap;
use std::time::Duration;

/// Exponential backoff with full jitter (the AWS architecture blog's recommendation): retry
/// `n` waits a random time in `[0, min(max, base × 2ⁿ)]`, so clients that failed together do
/// not come back together. A `Retry-After` from the upstream is a floor on that wait.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt (`upstream.retries`).
    pub retries: u32,
    /// The cap of the first retry's wait (`upstream.retry_backoff`).
    pub base: Duration,
    /// The cap of any retry's wait, unless `Retry-After` asks for more.
    pub max: Duration,
}

impl RetryPolicy {
    /// How long to wait before retry number `retry` (0 for the first), honouring the
    /// upstream's `Retry-After` when it gave one.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(31)))
            .min(self.max);
        let jittered = cap.mul_f64(fastrand::f64());
        retry_after.map_or(jittered, |floor| jittered.max(floor))
    }
}

impl UpstreamError {
    /// Whether trying again may get an answer: timeouts, connection failures, `5xx` and
    /// `429`. Never a bad body (the upstream would send it again) nor a bad URL or token.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Connection(_) => true,
            Self::Status(status) => *status == 429 || (500..=599).contains(status),
            Self::NotJson
            | Self::TooLarge(_)
            | Self::Url(_)
            | Self::BadToken
            | Self::CircuitOpen
            | Self::Abandoned => false,
        }
    }

    /// Whether the failure says the upstream is unwell, for its circuit breaker and
    /// `/readyz`. A bad body for one SN, or a URL that cannot be built, says nothing about the
    /// others. A `429` does: an upstream shedding load is helped by fewer calls.
    pub fn counts_against_upstream(&self) -> bool {
        self.is_retryable()
    }
}

/// Longer `Retry-After`s are read as this: no lookup's deadline is that far, so the retry is
/// skipped either way, and the arithmetic stays far from overflowing.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The upstream's `Retry-After`, capped at [`MAX_RETRY_AFTER`]; a header that cannot be read
/// is ignored and the backoff alone applies.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    crate::retry_after::retry_after(headers).map(|wait| wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retries: 5,
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        }
    }

    #[test]
    fn waits_grow_exponentially_up_to_the_cap_with_full_jitter() {
        let policy = policy();
        for (retry, cap) in [
            (0, 100),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1000),
            (30, 1000),
        ] {
            let waits: Vec<Duration> = (0..500).map(|_| policy.delay(retry, None)).collect();
            let cap = Duration::from_millis(cap);
            assert!(waits.iter().all(|wait| *wait <= cap), "retry {retry}");
            // Full jitter: the waits spread over the whole range, not around the cap.
            assert!(waits.iter().any(|wait| *wait < cap / 4), "retry {retry}");
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let wait = policy().delay(0, Some(Duration::from_secs(3)));
        assert!(wait >= Duration::from_secs(3));
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(UpstreamError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(UpstreamError::Connection("reset".into()).is_retryable());
        assert!(UpstreamError::Status(503).is_retryable());
        assert!(UpstreamError::Status(429).is_retryable());
        assert!(!UpstreamError::Status(400).is_retryable());
        assert!(!UpstreamError::Status(302).is_retryable());
        assert!(!UpstreamError::NotJson.is_retryable());
        assert!(!UpstreamError::TooLarge(10).is_retryable());
        assert!(!UpstreamError::CircuitOpen.is_retryable());
    }

    #[test]
    fn a_retry_after_of_years_is_capped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "retry-after",
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
    }
}
