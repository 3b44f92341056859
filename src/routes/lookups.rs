//! Lookups: a JSON batch, a streamed (NDJSON) batch, and one SN by path.

use super::input::read_sns;
use super::{
    Body, LookupStats, OVERLOADED_RETRY_AFTER_SECS, body_limits, error_response, json_response,
    refresh_requested,
};
use crate::error::Error;
use crate::lookup::{Outcome, Overloaded, Source};
use crate::metrics::ShedReason;
use crate::render;
use crate::state::AppState;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The lookup, or `503 overloaded` when its fetches would pass `upstream.max_pending`.
fn admitted<T>(state: &AppState, lookup: Result<T, Overloaded>) -> Result<T, Error> {
    lookup.map_err(|Overloaded| {
        state.metrics.record_shed(ShedReason::Pending);
        Error::Overloaded(OVERLOADED_RETRY_AFTER_SECS)
    })
}

pub(super) async fn lookup_batch(
    state: &AppState,
    request: Request<Incoming>,
    arrived: Instant,
) -> Result<Response<Body>, Error> {
    let refresh = refresh_requested(&request)?;
    let streaming = wants_ndjson(&request);
    let sns = read_sns(request, &body_limits(state)).await?;
    if streaming {
        return lookup_stream(state, sns, refresh, arrived).await;
    }
    let batch = self::admitted(state, state.lookup.resolve(sns, refresh, arrived).await)?;
    let stats = LookupStats::from(&batch.summary);
    let mut response = json_response(StatusCode::OK, render::batch(&batch));
    response.extensions_mut().insert(stats);
    Ok(response)
}

/// Whether the client asked for `application/x-ndjson` (one item per line as each resolves).
fn wants_ndjson(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|media| {
            media
                .split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/x-ndjson"))
        })
}

/// The NDJSON answer: each distinct SN once, in the order it resolves (what needed no fetch
/// first), then `{"summary": ...}`. Lines are made as the client reads them, so a slow reader
/// holds back the proxy instead of making it buffer, and the cache is read a window at a time
/// as they go (see [`crate::lookup::Lookup::stream`]); a client that goes away cancels the
/// fetches this lookup queued but had not started (those under way finish and are written).
async fn lookup_stream(
    state: &AppState,
    sns: Vec<String>,
    refresh: bool,
    arrived: Instant,
) -> Result<Response<Body>, Error> {
    let resolving = state
        .lookup
        .stream(sns, refresh, arrived, CancellationToken::new())
        .await;
    let resolving = admitted(state, resolving)?;
    let lines = futures_util::stream::unfold(Some(resolving), |resolving| async move {
        let mut resolving = resolving?;
        let line = match resolving.next_resolved().await {
            Some(index) => {
                let (sn, outcome) = resolving.resolved(index)?;
                let line = render::line(render::item(sn, outcome));
                return Some((Ok(Frame::data(line)), Some(resolving)));
            }
            None => render::line(render::summary(&resolving.batch().await.summary)),
        };
        Some((Ok::<_, Infallible>(Frame::data(line)), None))
    });
    let mut response = Response::new(StreamBody::new(lines).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

pub(super) async fn lookup_one(
    state: &AppState,
    sn: String,
    refresh: bool,
    arrived: Instant,
) -> Result<Response<Body>, Error> {
    let mut batch = admitted(
        state,
        state.lookup.resolve(vec![sn], refresh, arrived).await,
    )?;
    let stats = LookupStats::from(&batch.summary);
    let (Some(sn), Some(outcome)) = (batch.distinct.pop(), batch.outcomes.pop()) else {
        return Err(Error::InvalidRequest("no SN in the path".to_owned()));
    };
    let mut response = match &outcome {
        Outcome::Found { source, .. } => with_x_cache(
            json_response(StatusCode::OK, render::item(&sn, &outcome)),
            *source,
        ),
        Outcome::NotFound { source } => {
            let body = render::not_found_single(&sn, *source);
            with_x_cache(json_response(StatusCode::NOT_FOUND, body), *source)
        }
        Outcome::Invalid(err) => error_response(Error::InvalidSn(*err)),
        Outcome::Failed(err) => error_response(Error::Item(err.clone())),
    };
    // Failures are lookups too: the log line counts their SN and miss.
    response.extensions_mut().insert(stats);
    Ok(response)
}

fn with_x_cache(mut response: Response<Body>, source: Source) -> Response<Body> {
    let x_cache = match source {
        Source::Cache => "HIT",
        Source::Upstream => "MISS",
        Source::Stale => "STALE",
    };
    response
        .headers_mut()
        .insert("x-cache", HeaderValue::from_static(x_cache));
    response
}
