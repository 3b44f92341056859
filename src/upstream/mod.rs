//! The client for the upstream discount service: one SN per request, bounded concurrency
//! shared by every lookup, a timeout per request, bodies size-checked while they stream in,
//! bounded retries with backoff, and a circuit breaker that stops calling a failing upstream.
//! Each attempt tells the circuit its SN, so SNs that keep failing are written off one by
//! one instead of opening the circuit for every SN (see [`crate::circuit`]).

mod retry;
mod url;

pub use self::retry::RetryPolicy;

use self::url::UrlTemplate;

use crate::circuit::{Circuit, CircuitSettings, CircuitState};
use crate::metrics::{Metrics, UpstreamOutcome};
use crate::secret::Secret;
use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::debug;

/// How [`UpstreamClient`] talks to the discount service. Deliberately not `Debug`: its URL
/// may hold an API key (the config's `Debug` prints it redacted).
#[derive(Clone)]
pub struct UpstreamSettings {
    /// The URL with `{sn}` where the percent-encoded SN goes (`upstream.url`).
    pub url_template: String,
    /// Sent as `Authorization: Token <token>` when set (`upstream.token`).
    pub token: Option<Secret>,
    /// Most requests in flight across all lookups (`upstream.concurrency`).
    pub concurrency: usize,
    /// Time allowed for one request, body included (`upstream.timeout`).
    pub timeout: Duration,
    /// Time allowed for the TCP connect (`upstream.connect_timeout`).
    pub connect_timeout: Duration,
    /// Largest body accepted; a larger one is an `upstream_error` (`upstream.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Which failures are tried again, and after how long.
    pub retry: RetryPolicy,
    /// When to stop calling a failing upstream (`upstream.circuit`).
    pub circuit: CircuitSettings,
}

impl From<&crate::config::UpstreamConfig> for UpstreamSettings {
    fn from(config: &crate::config::UpstreamConfig) -> Self {
        Self {
            url_template: config.url.clone(),
            token: config.token.clone(),
            concurrency: config.concurrency,
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            max_body_bytes: config.max_body_bytes,
            retry: RetryPolicy {
                retries: config.retries,
                base: config.retry_backoff,
                max: config.retry_backoff_max,
            },
            circuit: config.circuit.clone(),
        }
    }
}

/// A definite answer from the upstream: the only kind that is ever cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// `200` with a JSON body, kept as the upstream's bytes.
    Found(Bytes),
    /// `404`: the SN does not exist.
    NotFound,
}

/// Why the upstream gave no definite answer. Never cached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The request and its body took longer than `upstream.timeout` (`upstream_timeout`).
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The upstream answered neither `200` nor `404` (a `5xx`, a `429`, a redirect).
    #[error("the upstream answered HTTP {0}")]
    Status(u16),
    /// The upstream answered `200` but the body is not one JSON value.
    #[error("the upstream answered 200 with a body that is not JSON")]
    NotJson,
    /// The body is bigger than `upstream.max_body_bytes`, declared or streamed.
    #[error("the upstream answered with a body larger than {0} bytes")]
    TooLarge(usize),
    /// The connection was refused or broke, or the HTTP client could not be built.
    #[error("could not reach the upstream: {0}")]
    Connection(String),
    /// No valid URL could be made for the SN, such as `.` or `..` where `{sn}` is in the path.
    #[error("could not build the upstream URL: {0}")]
    Url(String),
    /// `upstream.token` has characters an HTTP header cannot carry; found at start.
    #[error("the upstream token holds characters a header cannot carry")]
    BadToken,
    /// The upstream kept failing, so its circuit is open: it was not called
    /// (`upstream_unavailable`).
    #[error("the upstream is failing; it is not called until its circuit closes")]
    CircuitOpen,
    /// The task fetching the SN ended without an answer (it panicked or was cancelled):
    /// the proxy's failure, not the upstream's; the next lookup fetches again.
    #[error("the fetch ended without an answer; try again")]
    Abandoned,
}

impl UpstreamError {
    /// The API error code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "upstream_timeout",
            Self::CircuitOpen => "upstream_unavailable",
            _ => "upstream_error",
        }
    }
}

/// The upstream client. One instance is shared by every request, and so is its limit.
pub struct UpstreamClient {
    http: reqwest::Client,
    template: UrlTemplate,
    /// `Token <token>`, built once and marked sensitive so no HTTP layer ever logs it.
    authorization: Option<HeaderValue>,
    limit: Semaphore,
    concurrency: usize,
    timeout: Duration,
    max_body_bytes: usize,
    retry: RetryPolicy,
    circuit: Circuit,
    metrics: Arc<Metrics>,
}

/// One attempt's failure, with the upstream's `Retry-After` when it sent one.
struct AttemptError {
    error: UpstreamError,
    retry_after: Option<Duration>,
}

impl From<UpstreamError> for AttemptError {
    fn from(error: UpstreamError) -> Self {
        Self {
            error,
            retry_after: None,
        }
    }
}

impl UpstreamClient {
    /// Builds the client with a keep-alive pool sized to the concurrency limit.
    ///
    /// # Errors
    /// The TLS stack could not be set up.
    pub fn new(settings: &UpstreamSettings, metrics: Arc<Metrics>) -> Result<Self, UpstreamError> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .pool_max_idle_per_host(settings.concurrency)
            .tcp_nodelay(true)
            // A redirect is not the answer the contract asks for: it is an upstream_error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| UpstreamError::Connection(err.without_url().to_string()))?;
        Ok(Self {
            http,
            template: UrlTemplate::parse(&settings.url_template),
            authorization: settings.token.as_ref().map(authorization).transpose()?,
            limit: Semaphore::new(settings.concurrency),
            concurrency: settings.concurrency,
            timeout: settings.timeout,
            max_body_bytes: settings.max_body_bytes,
            retry: settings.retry.clone(),
            circuit: Circuit::new("upstream", settings.circuit.clone()),
            metrics,
        })
    }

    /// Most requests in flight at once (`upstream.concurrency`).
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The circuit breaker's state, for `/readyz`.
    pub fn circuit_state(&self) -> CircuitState {
        self.circuit.state()
    }

    /// Fetches one SN, retrying transient failures (with backoff) while a retry can still
    /// start before `retry_until`.
    ///
    /// Each attempt waits for a slot under the global limit; the backoff between attempts
    /// holds no slot. The timeout covers one attempt and its body, not the wait for a slot.
    /// `retry_until` does not cut an attempt short either: a fetch whose requester gave up
    /// still runs and is written back, so a retry of the lookup finds it cached.
    ///
    /// # Errors
    /// Anything but a `200` with a JSON body or a `404`, after the last retry; or
    /// [`UpstreamError::CircuitOpen`] without a call while the upstream's circuit is open.
    pub async fn fetch(&self, sn: &str, retry_until: Instant) -> Result<Fetched, UpstreamError> {
        let mut retry = 0;
        loop {
            let failure = match self.attempt(sn).await {
                Ok(fetched) => return Ok(fetched),
                Err(failure) => failure,
            };
            let error = failure.error;
            if !error.is_retryable() || retry >= self.retry.retries {
                return Err(error);
            }
            let wait = self.retry.delay(retry, failure.retry_after);
            // Checked, not added: a `Retry-After` of years must not overflow the clock.
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|retry_at| retry_at >= retry_until)
            {
                debug!(sn, error = %error, "no retry: it would start past the deadline");
                return Err(error);
            }
            debug!(sn, error = %error, retry = retry + 1, wait = ?wait, "retrying the upstream");
            self.metrics.record_retry();
            tokio::time::sleep(wait).await;
            retry += 1;
        }
    }

    /// One request, if the circuit lets it through, with its outcome reported to the circuit.
    async fn attempt(&self, sn: &str) -> Result<Fetched, AttemptError> {
        // While it is open, fail without even queueing for a slot.
        if self.circuit.state() == CircuitState::Open {
            return Err(UpstreamError::CircuitOpen.into());
        }
        // The semaphore is never closed, so acquiring cannot fail; the error arm is unreachable
        // but kept total rather than panicking.
        let Ok(_permit) = self.limit.acquire().await else {
            return Err(
                UpstreamError::Connection("the upstream limit is closed".to_owned()).into(),
            );
        };
        // Asked only once a slot is ours: a fetch that queued while the circuit was closed
        // must not call an upstream whose circuit opened meanwhile.
        let ticket = self
            .circuit
            .try_acquire_for(sn)
            .ok_or(UpstreamError::CircuitOpen)?;
        let started = Instant::now();
        self.metrics.upstream_in_flight().inc();
        let result = match tokio::time::timeout(self.timeout, self.fetch_now(sn)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout(self.timeout).into()),
        };
        self.metrics.upstream_in_flight().dec();
        let outcome = match &result {
            Ok(Fetched::Found(_)) => UpstreamOutcome::Ok,
            Ok(Fetched::NotFound) => UpstreamOutcome::NotFound,
            Err(failure) if matches!(failure.error, UpstreamError::Timeout(_)) => {
                UpstreamOutcome::Timeout
            }
            Err(_) => UpstreamOutcome::Error,
        };
        self.metrics.record_upstream(outcome, started.elapsed());
        match &result {
            Ok(_) => ticket.success(),
            Err(failure) if failure.error.counts_against_upstream() => ticket.failure(),
            // A bad body for one SN says nothing about the upstream's health.
            Err(_) => drop(ticket),
        }
        result
    }

    async fn fetch_now(&self, sn: &str) -> Result<Fetched, AttemptError> {
        let url = self.template.url_for(sn)?;
        let url = reqwest::Url::parse(&url).map_err(|err| UpstreamError::Url(err.to_string()))?;
        let mut request = self.http.get(url);
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        // `without_url`: the URL may carry credentials in a template's query string.
        let mut response = request
            .send()
            .await
            .map_err(|err| UpstreamError::Connection(err.without_url().to_string()))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Fetched::NotFound),
            other => {
                return Err(AttemptError {
                    error: UpstreamError::Status(other.as_u16()),
                    retry_after: retry::retry_after(response.headers()),
                });
            }
        }
        let body = self.read_body(&mut response).await?;
        Ok(Fetched::Found(compact_json(body)?))
    }

    /// Reads the body chunk by chunk, giving up as soon as it passes the limit.
    async fn read_body(&self, response: &mut reqwest::Response) -> Result<Bytes, UpstreamError> {
        if response
            .content_length()
            .is_some_and(|len| len > self.max_body_bytes as u64)
        {
            return Err(UpstreamError::TooLarge(self.max_body_bytes));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| UpstreamError::Connection(err.without_url().to_string()))?
        {
            if body.len() + chunk.len() > self.max_body_bytes {
                return Err(UpstreamError::TooLarge(self.max_body_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

fn authorization(token: &Secret) -> Result<HeaderValue, UpstreamError> {
    let mut value = HeaderValue::from_str(&format!("Token {}", token.expose()))
        .map_err(|_| UpstreamError::BadToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// Checks the body is one JSON value and makes it a single line, so it can be spliced into
/// responses (and NDJSON lines) as-is. Nothing else changes: key order, number spelling and
/// escapes stay the upstream's. A body already on one line is kept without a copy.
fn compact_json(body: Bytes) -> Result<Bytes, UpstreamError> {
    let value: &serde_json::value::RawValue =
        serde_json::from_slice(&body).map_err(|_| UpstreamError::NotJson)?;
    let trimmed = value.get();
    let start = body.len() - body.trim_ascii_start().len();
    let json = body.slice(start..start + trimmed.len());
    if !trimmed.contains(['\n', '\r']) {
        return Ok(json);
    }
    // In valid JSON a raw line break can only be whitespace between tokens (inside strings
    // it must be escaped), so dropping those bytes keeps the value and its spelling.
    Ok(json
        .iter()
        .copied()
        .filter(|byte| !matches!(byte, b'\n' | b'\r'))
        .collect::<Vec<u8>>()
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_are_kept_verbatim_or_made_one_line() {
        let body = Bytes::from_static(br#" {"ratio": "0.35"} "#);
        assert_eq!(
            compact_json(body).unwrap(),
            Bytes::from_static(br#"{"ratio": "0.35"}"#)
        );
        let body = Bytes::from_static(b"{\r\n  \"z\": 1.50,\n  \"a\": \"x\\ny\"\n}\n");
        assert_eq!(
            compact_json(body).unwrap(),
            Bytes::from_static(br#"{  "z": 1.50,  "a": "x\ny"}"#)
        );
        assert!(matches!(
            compact_json(Bytes::from_static(b"<html>")),
            Err(UpstreamError::NotJson)
        ));
        assert!(matches!(
            compact_json(Bytes::from_static(b"{\"a\":")),
            Err(UpstreamError::NotJson)
        ));
        assert!(matches!(
            compact_json(Bytes::new()),
            Err(UpstreamError::NotJson)
        ));
    }
}
