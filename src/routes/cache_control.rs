//! Cache control: forgetting one SN (`DELETE`) or many (`invalidate`), on every instance.

use super::input::read_sns;
use super::{Body, body_limits, full, json_response};
use crate::error::Error;
use crate::sn;
use crate::state::AppState;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

pub(super) async fn delete_one(state: &AppState, sn: &str) -> Result<Response<Body>, Error> {
    state
        .lookup
        .invalidate(&[sn])
        .await
        .map_err(|_| Error::CacheUnavailable)?;
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

pub(super) async fn invalidate(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, Error> {
    let sns = read_sns(request, &body_limits(state)).await?;
    if let Some((index, err)) = sns
        .iter()
        .enumerate()
        .find_map(|(i, sn)| sn::validate(sn).err().map(|err| (i, err)))
    {
        return Err(Error::InvalidRequest(format!(
            "sns[{index}] is not a valid SN: {err}"
        )));
    }
    let sns: Vec<&str> = sns.iter().map(String::as_str).collect();
    let invalidated = state
        .lookup
        .invalidate(&sns)
        .await
        .map_err(|_| Error::CacheUnavailable)?;
    Ok(json_response(
        StatusCode::OK,
        json!({ "invalidated": invalidated })
            .to_string()
            .into_bytes(),
    ))
}
