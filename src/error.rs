//! The request path's error, and the one place that maps it to an HTTP status and API code.

use crate::lookup::ItemError;
use crate::sn::SnError;
use crate::upstream::UpstreamError;
use hyper::StatusCode;

/// Everything that can end a request early. Messages go to the client: no internal detail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not parseable JSON (`400 invalid_json`).
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The request is well-formed but wrong: bad shape, empty `sns`, bad `refresh`, and so on.
    #[error("{0}")]
    InvalidRequest(String),
    /// The SN in a single GET or DELETE path is not a valid SN (`400 invalid_sn`).
    #[error(transparent)]
    InvalidSn(#[from] SnError),
    /// API tokens are configured and the request has no valid bearer token (`401`).
    #[error("this endpoint needs an `Authorization: Bearer <token>` header with a valid token")]
    Unauthorized,
    /// No route matches the path (`404 not_found`); holds the method and path.
    #[error("there is no route {0}")]
    RouteNotFound(String),
    /// The path exists but not for this method (`405`, with an `Allow` header).
    #[error("{method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed {
        /// The method the client used.
        method: String,
        /// The methods the path accepts, as the `Allow` header value.
        allow: String,
    },
    /// The body holds more SNs than `server.max_batch` (`413 batch_too_large`).
    /// Counted while parsing, which stops at the first SN past the bound: how many more
    /// there were is never known.
    #[error("the batch has more than {max} SNs; at most {max} are allowed")]
    BatchTooLarge {
        /// The configured `server.max_batch`.
        max: usize,
    },
    /// The body is bigger than `server.max_body_bytes`, declared or read (`413`).
    #[error("the request body is larger than {max} bytes")]
    PayloadTooLarge {
        /// The configured `server.max_body_bytes`.
        max: usize,
    },
    /// The body was not sent as `Content-Type: application/json` (`415`).
    #[error("the request body must be JSON, sent with `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// The body came with a `Content-Encoding` the proxy does not read (`415`).
    #[error(
        "the request body's Content-Encoding {0:?} is not supported: send it as gzip or unencoded"
    )]
    UnsupportedEncoding(String),
    /// The body did not arrive within `server.body_read_timeout` (`408 body_timeout`).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// A single GET's SN has no answer: the upstream failed or the deadline passed (`502`/`504`).
    #[error(transparent)]
    Item(#[from] ItemError),
    /// Too much work in flight: the request was turned away before any was done for it
    /// (`503 overloaded`, with `Retry-After`).
    #[error("the proxy is overloaded; retry in {0} s")]
    Overloaded(u64),
    /// Redis could not be reached for a DELETE or invalidate, so nothing is claimed removed.
    #[error(
        "the cache could not be reached; some or all of the SNs may still be cached, try again"
    )]
    CacheUnavailable,
}

/// Every code an error response or an item can carry, for the API description's enum (a
/// test keeps `openapi.yaml` in step with it).
pub const ERROR_CODES: &[&str] = &[
    "invalid_json",
    "invalid_request",
    "invalid_sn",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "batch_too_large",
    "payload_too_large",
    "unsupported_media_type",
    "body_timeout",
    "upstream_error",
    "upstream_timeout",
    "upstream_unavailable",
    "deadline_exceeded",
    "overloaded",
    "cache_unavailable",
];

impl Error {
    /// The HTTP status, from API.md's Errors table.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) | Self::InvalidRequest(_) | Self::InvalidSn(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BatchTooLarge { .. } | Self::PayloadTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::UnsupportedMediaType | Self::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Item(
                ItemError::Upstream(UpstreamError::Timeout(_)) | ItemError::DeadlineExceeded,
            ) => StatusCode::GATEWAY_TIMEOUT,
            Self::Item(ItemError::Upstream(UpstreamError::CircuitOpen))
            | Self::Overloaded(_)
            | Self::CacheUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Item(ItemError::Upstream(_)) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The machine-readable code, from API.md's Errors table.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidSn(_) => "invalid_sn",
            Self::Unauthorized => "unauthorized",
            Self::RouteNotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::BatchTooLarge { .. } => "batch_too_large",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType | Self::UnsupportedEncoding(_) => "unsupported_media_type",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Item(item) => item.code(),
            Self::Overloaded(_) => "overloaded",
            Self::CacheUnavailable => "cache_unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_code_is_listed_in_error_codes() {
        let errors = [
            Error::InvalidJson(String::new()),
            Error::InvalidRequest(String::new()),
            Error::InvalidSn(crate::sn::SnError::Empty),
            Error::Unauthorized,
            Error::RouteNotFound(String::new()),
            Error::MethodNotAllowed {
                method: String::new(),
                allow: String::new(),
            },
            Error::BatchTooLarge { max: 1 },
            Error::PayloadTooLarge { max: 1 },
            Error::UnsupportedMediaType,
            Error::BodyTimeout(Duration::from_secs(1)),
            Error::Item(ItemError::Upstream(UpstreamError::Status(500))),
            Error::Item(ItemError::Upstream(UpstreamError::Timeout(Duration::ZERO))),
            Error::Item(ItemError::Upstream(UpstreamError::CircuitOpen)),
            Error::Item(ItemError::DeadlineExceeded),
            Error::Overloaded(1),
            Error::CacheUnavailable,
        ];
        let mut codes: Vec<&str> = errors.iter().map(Error::code).collect();
        codes.sort_unstable();
        let mut listed = ERROR_CODES.to_vec();
        listed.sort_unstable();
        assert_eq!(codes, listed);
    }

    #[test]
    fn upstream_failures_map_to_gateway_statuses() {
        let timeout = Error::Item(ItemError::Upstream(UpstreamError::Timeout(
            Duration::from_secs(1),
        )));
        assert_eq!(
            (timeout.status(), timeout.code()),
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
        );
        let status = Error::Item(ItemError::Upstream(UpstreamError::Status(503)));
        assert_eq!(
            (status.status(), status.code()),
            (StatusCode::BAD_GATEWAY, "upstream_error")
        );
        let open = Error::Item(ItemError::Upstream(UpstreamError::CircuitOpen));
        assert_eq!(
            (open.status(), open.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable")
        );
        let deadline = Error::Item(ItemError::DeadlineExceeded);
        assert_eq!(
            (deadline.status(), deadline.code()),
            (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
        );
    }
}
