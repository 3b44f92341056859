//! One batch to `POST /v1/discounts/lookup` and back: what became of each of its SNs.

use super::tally::{Failure, Kind};
use crate::secret::Secret;
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use std::time::Duration;

/// How often a batch turned away as `503 overloaded` is sent again before its SNs count as
/// errors.
const OVERLOAD_RETRIES: u32 = 5;

/// The longest `Retry-After` honoured; a longer one is read as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Sends batches to one proxy.
pub struct BatchClient {
    http: reqwest::Client,
    url: url::Url,
    token: Option<Secret>,
}

/// What one attempt at a batch came to.
enum Attempt {
    /// Each SN's outcome, in the batch's order.
    Answered(Vec<Kind>),
    /// `503 overloaded`: try again after this long.
    Overloaded(Duration, Failure),
    /// The whole batch failed.
    Failed(Failure),
}

/// The answer of a batch that went through, items in request order.
#[derive(Deserialize)]
struct LookupResponse {
    results: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    status: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

/// `{"error": {"code": …, "message": …}}`, the proxy's error body and an item's error.
#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: ErrorBody,
}

impl BatchClient {
    /// A client for the proxy at `proxy`; `refresh` makes every lookup skip the cache.
    ///
    /// # Errors
    /// The HTTP client could not be built (no TLS roots, say).
    pub fn new(
        proxy: &url::Url,
        refresh: bool,
        token: Option<Secret>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let mut url = proxy.clone();
        url.set_path(&format!(
            "{}/v1/discounts/lookup",
            proxy.path().trim_end_matches('/')
        ));
        url.set_query(refresh.then_some("refresh=true"));
        Ok(Self { http, url, token })
    }

    /// Looks up `sns`, resending a batch the proxy turned away as overloaded; `note` hears
    /// about each resend.
    ///
    /// # Errors
    /// The whole batch failed: no answer, a non-200 answer, or still overloaded after
    /// [`OVERLOAD_RETRIES`] resends. Each of its SNs is then an error.
    pub async fn send(&self, sns: &[String], note: impl Fn(String)) -> Result<Vec<Kind>, Failure> {
        let body = serde_json::json!({ "sns": sns }).to_string();
        let mut resends = 0;
        loop {
            return match self.attempt(&body, sns.len()).await {
                Attempt::Answered(kinds) => Ok(kinds),
                Attempt::Overloaded(wait, _) if resends < OVERLOAD_RETRIES => {
                    resends += 1;
                    note(format!(
                        "warm: the proxy is overloaded; resending {} SNs in {} s ({resends} of {OVERLOAD_RETRIES})",
                        sns.len(),
                        wait.as_secs()
                    ));
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Attempt::Overloaded(_, failure) | Attempt::Failed(failure) => Err(failure),
            };
        }
    }

    async fn attempt(&self, body: &str, expected: usize) -> Attempt {
        let mut request = self
            .http
            .post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(body.to_owned());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => return Attempt::Failed(transport_failure(&err)),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(err) => return Attempt::Failed(transport_failure(&err)),
        };
        if status != StatusCode::OK {
            let failure = error_failure(status, &bytes, self.token.is_some());
            if status == StatusCode::SERVICE_UNAVAILABLE && failure.code == "overloaded" {
                return Attempt::Overloaded(retry_after(&headers), failure);
            }
            return Attempt::Failed(failure);
        }
        match serde_json::from_slice::<LookupResponse>(&bytes) {
            Ok(answer) if answer.results.len() == expected => {
                Attempt::Answered(answer.results.into_iter().map(classify).collect())
            }
            Ok(answer) => Attempt::Failed(Failure {
                code: "bad_response".to_owned(),
                message: format!(
                    "the proxy answered {} items for {expected} SNs",
                    answer.results.len()
                ),
            }),
            Err(err) => Attempt::Failed(Failure {
                code: "bad_response".to_owned(),
                message: format!("the proxy's answer is not a lookup response: {err}"),
            }),
        }
    }
}

/// An item's outcome: found or not, and from where.
fn classify(item: Item) -> Kind {
    let failure = || {
        let error = item.error.as_ref();
        Failure {
            code: error.map_or_else(|| item.status.clone(), |e| e.code.clone()),
            message: error.map(|e| e.message.clone()).unwrap_or_default(),
        }
    };
    match (item.status.as_str(), item.source.as_deref()) {
        ("not_found", _) => Kind::NotFound,
        ("ok", Some("upstream")) => Kind::Fetched,
        ("ok", _) => Kind::Cached,
        ("invalid", _) => Kind::Invalid(failure()),
        _ => Kind::Error(failure()),
    }
}

/// The failure a non-200 answer stands for, from its JSON error body when it has one.
fn error_failure(status: StatusCode, body: &[u8], sent_token: bool) -> Failure {
    let (code, message) = match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(ErrorResponse { error }) => (error.code, error.message),
        Err(_) => (
            format!("http_{}", status.as_u16()),
            format!("the proxy answered {status} without a JSON error body"),
        ),
    };
    let hint = match (status, sent_token) {
        (StatusCode::UNAUTHORIZED, false) => {
            "; the proxy needs a token: pass --token or set DISCOUNT_PROXY_CLIENT_TOKEN"
        }
        (StatusCode::UNAUTHORIZED, true) => "; the proxy does not accept the token given",
        _ => "",
    };
    Failure {
        code,
        message: format!("HTTP {}: {message}{hint}", status.as_u16()),
    }
}

/// A request that got no answer: the proxy is unreachable, or too slow.
fn transport_failure(err: &reqwest::Error) -> Failure {
    let code = if err.is_timeout() {
        "timeout"
    } else {
        "connection_failed"
    };
    let mut message = String::from("could not get an answer from the proxy");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Failure {
        code: code.to_owned(),
        message,
    }
}

/// `Retry-After` in seconds, 1 s when missing or unreadable, capped at [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap) -> Duration {
    crate::retry_after::retry_after(headers)
        .map_or(Duration::from_secs(1), |wait| wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn item(json: &str) -> Kind {
        classify(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn items_are_classified_by_status_and_source() {
        assert_eq!(
            item(r#"{"status":"ok","source":"upstream"}"#),
            Kind::Fetched
        );
        assert_eq!(item(r#"{"status":"ok","source":"cache"}"#), Kind::Cached);
        assert_eq!(item(r#"{"status":"ok","source":"stale"}"#), Kind::Cached);
        assert_eq!(
            item(r#"{"status":"not_found","source":"cache"}"#),
            Kind::NotFound
        );
        let Kind::Invalid(failure) =
            item(r#"{"status":"invalid","error":{"code":"invalid_sn","message":"m"}}"#)
        else {
            panic!("not invalid")
        };
        assert_eq!(failure.code, "invalid_sn");
        let Kind::Error(failure) = item(r#"{"status":"error"}"#) else {
            panic!("not an error")
        };
        assert_eq!(failure.code, "error");
    }

    #[test]
    fn error_bodies_give_code_and_message_and_a_401_a_hint() {
        let body = br#"{"error":{"code":"unauthorized","message":"no token"}}"#;
        let failure = error_failure(StatusCode::UNAUTHORIZED, body, false);
        assert_eq!(failure.code, "unauthorized");
        assert!(failure.message.contains("no token"));
        assert!(failure.message.contains("--token"));
        let failure = error_failure(StatusCode::BAD_GATEWAY, b"<html>", false);
        assert_eq!(failure.code, "http_502");
    }

    #[test]
    fn retry_after_defaults_to_a_second_and_is_capped() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), Duration::from_secs(1));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(" 3 "));
        assert_eq!(retry_after(&headers), Duration::from_secs(3));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("99999999"));
        assert_eq!(retry_after(&headers), MAX_RETRY_AFTER);
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), Duration::from_secs(1));
    }
}
