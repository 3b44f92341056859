//! Reading what a client sent: the `{"sns": [...]}` body and the `refresh` query flag.
//! Each check fails with the error the contract names, before any work is done.

mod bounded;

use self::bounded::BodyError;
use super::encoding;
use crate::error::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::Request;
use hyper::body::Incoming;
use hyper::header;
use std::time::Duration;

/// What a request body may be: its size, how long it may take, how many SNs it may hold.
pub(super) struct BodyLimits {
    pub max_bytes: usize,
    pub read_timeout: Duration,
    pub max_batch: usize,
}

/// Reads a `{"sns": [...]}` body: media type, size (enforced while reading), then JSON, shape
/// and count, the count enforced while parsing.
pub(super) async fn read_sns(
    request: Request<Incoming>,
    limits: &BodyLimits,
) -> Result<Vec<String>, Error> {
    let body = read_json_body(request, limits).await?;
    let sns = bounded::parse_sns(&body, limits.max_batch).map_err(|err| match err {
        BodyError::TooMany => Error::BatchTooLarge {
            max: limits.max_batch,
        },
        BodyError::Json(err) => match err.classify() {
            serde_json::error::Category::Data => {
                Error::InvalidRequest(format!("expected {{\"sns\": [\"<sn>\", ...]}}: {err}"))
            }
            _ => Error::InvalidJson(err.to_string()),
        },
    })?;
    if sns.is_empty() {
        return Err(Error::InvalidRequest(
            "`sns` must hold at least one SN".to_owned(),
        ));
    }
    Ok(sns)
}

async fn read_json_body(request: Request<Incoming>, limits: &BodyLimits) -> Result<Bytes, Error> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Error::UnsupportedMediaType);
    }
    let gzipped = encoding::gzipped(request.headers())?;
    let max = limits.max_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(Error::PayloadTooLarge { max });
    }
    // Limited stops reading at `max`, whatever Content-Length claimed (or chunked encoding);
    // the timeout stops a body that trickles in or stalls.
    let read = Limited::new(request.into_body(), max).collect();
    match tokio::time::timeout(limits.read_timeout, read).await {
        Err(_) => Err(Error::BodyTimeout(limits.read_timeout)),
        Ok(Ok(collected)) if gzipped => encoding::gunzip(&collected.to_bytes(), max),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(Error::PayloadTooLarge { max })
        }
        Ok(Err(err)) => Err(Error::InvalidRequest(format!(
            "the request body could not be read: {err}"
        ))),
    }
}

pub(super) fn refresh_requested(request: &Request<Incoming>) -> Result<bool, Error> {
    let query = request.uri().query().unwrap_or_default();
    let mut refresh = false;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key == "refresh" {
            refresh = match value.as_ref() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(Error::InvalidRequest(format!(
                        "refresh must be true or false, got {other:?}"
                    )));
                }
            };
        }
    }
    Ok(refresh)
}
