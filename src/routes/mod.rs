//! Method + path → handler: the route table, auth, admission, and the one place an error
//! becomes a response. JSON in, JSON out; the lookup core does the work.
//!
//! - `operations`: `/healthz`, `/readyz`, `/metrics`, `/openapi.yaml`.
//! - `lookups`: batch, streamed and single lookups.
//! - `cache_control`: `DELETE` of one SN and `invalidate`.
//! - `input`: reading bodies and queries.

mod cache_control;
mod encoding;
mod input;
mod lookups;
mod operations;

use self::input::{BodyLimits, refresh_requested};
use crate::admission::{AdmittedBody, Slot, Unflushed};
use crate::error::Error;
use crate::lookup::Summary;
use crate::metrics::{Endpoint, ShedReason};
use crate::state::AppState;
use crate::{render, sn};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::time::Instant;

/// The response body type of every route.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A whole body at once.
fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// What a lookup did, attached to its response for the request log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct LookupStats {
    /// SNs requested, duplicates included.
    pub sns: usize,
    /// Distinct SNs answered from a cache tier (stale included).
    pub hits: usize,
    /// Distinct SNs sent to the upstream.
    pub misses: usize,
}

impl From<&Summary> for LookupStats {
    fn from(summary: &Summary) -> Self {
        Self {
            sns: summary.requested,
            hits: summary.cache_hits + summary.stale,
            misses: summary.upstream_fetches,
        }
    }
}

const SN_PATH_PREFIX: &str = "/v1/discounts/";

/// Routes one request. Errors become their JSON error response here.
///
/// `unflushed` is the connection's: an admitted request's slot is parked there until its
/// response is on the socket (see [`crate::admission`]).
pub async fn handle(
    state: &AppState,
    request: Request<Incoming>,
    unflushed: &Arc<Unflushed>,
) -> Response<Body> {
    // A lookup's deadline counts from here, reading its body included.
    let arrived = Instant::now();
    let endpoint = endpoint(request.method(), request.uri().path());
    let response = route(state, request, arrived, unflushed)
        .await
        .unwrap_or_else(error_response);
    if let Some(endpoint) = endpoint {
        let status = response.status().as_u16();
        state
            .metrics
            .record_lookup(endpoint, status, arrived.elapsed());
    }
    response
}

/// The `endpoint` label of a `/v1/*` request in the metrics; `None` for the others.
fn endpoint(method: &Method, path: &str) -> Option<Endpoint> {
    match (method, path) {
        (_, "/v1/discounts/lookup") => Some(Endpoint::Batch),
        (_, "/v1/discounts/invalidate") => Some(Endpoint::Invalidate),
        (&Method::DELETE, path) if path.starts_with(SN_PATH_PREFIX) => Some(Endpoint::Delete),
        (_, path) if path.starts_with(SN_PATH_PREFIX) => Some(Endpoint::Single),
        _ => None,
    }
}

async fn route(
    state: &AppState,
    request: Request<Incoming>,
    arrived: Instant,
    unflushed: &Arc<Unflushed>,
) -> Result<Response<Body>, Error> {
    let method = request.method().clone();
    // A Uri clone shares its bytes: the request is moved into the handler, the path stays.
    let uri = request.uri().clone();
    let path = uri.path();
    match path {
        "/healthz" => {
            allow(&method, route_methods(path))?;
            Ok(json_response(
                StatusCode::OK,
                br#"{"status":"ok"}"#.to_vec(),
            ))
        }
        "/readyz" => {
            allow(&method, route_methods(path))?;
            Ok(operations::readyz(state).await)
        }
        "/metrics" => {
            allow(&method, route_methods(path))?;
            Ok(operations::metrics(state))
        }
        "/openapi.yaml" => {
            allow(&method, route_methods(path))?;
            Ok(operations::openapi())
        }
        "/v1/discounts/lookup" => {
            allow(&method, route_methods(path))?;
            authorize(state, &request)?;
            let admitted = admit(state, unflushed)?;
            let coding = encoding::negotiate(request.headers());
            let response = lookups::lookup_batch(state, request, arrived).await?;
            let response = encoding::compress(response, coding, state.compress_min_bytes);
            Ok(admitted.hold(response))
        }
        "/v1/discounts/invalidate" => {
            allow(&method, route_methods(path))?;
            authorize(state, &request)?;
            let admitted = admit(state, unflushed)?;
            Ok(admitted.hold(cache_control::invalidate(state, request).await?))
        }
        _ => match path
            .strip_prefix(SN_PATH_PREFIX)
            .filter(|raw| !raw.is_empty())
        {
            Some(raw_sn) => {
                allow(&method, route_methods(SN_ROUTE))?;
                authorize(state, &request)?;
                let admitted = admit(state, unflushed)?;
                let sn = sn::decode_path_segment(raw_sn)?;
                let response = if method == Method::DELETE {
                    cache_control::delete_one(state, &sn).await?
                } else {
                    let coding = encoding::negotiate(request.headers());
                    let refresh = refresh_requested(&request)?;
                    let found = lookups::lookup_one(state, sn, refresh, arrived).await?;
                    encoding::compress(found, coding, state.compress_min_bytes)
                };
                Ok(admitted.hold(response))
            }
            None => Err(Error::RouteNotFound(format!("{method} {path}"))),
        },
    }
}

/// The methods of the read-only operational endpoints.
const READ_ONLY: &[Method] = &[Method::GET, Method::HEAD];

/// The route of one SN, as `openapi.yaml` writes it.
const SN_ROUTE: &str = "/v1/discounts/{sn}";

/// Every route the router knows, with its methods, written as in `openapi.yaml` (a test
/// checks the two describe the same routes). The router takes each route's methods from here.
pub const ROUTES: &[(&str, &[Method])] = &[
    ("/healthz", READ_ONLY),
    ("/readyz", READ_ONLY),
    ("/metrics", READ_ONLY),
    ("/openapi.yaml", READ_ONLY),
    ("/v1/discounts/lookup", &[Method::POST]),
    ("/v1/discounts/invalidate", &[Method::POST]),
    (SN_ROUTE, &[Method::GET, Method::DELETE]),
];

/// The methods of a route in [`ROUTES`].
fn route_methods(route: &str) -> &'static [Method] {
    ROUTES
        .iter()
        .find(|(path, _)| *path == route)
        .map_or(&[], |(_, methods)| methods)
}

/// Passes `method` if the route takes it; otherwise the 405, its `Allow` built from `allowed`.
fn allow(method: &Method, allowed: &[Method]) -> Result<(), Error> {
    if allowed.contains(method) {
        return Ok(());
    }
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::MethodNotAllowed {
        method: method.to_string(),
        allow,
    })
}

/// With `server.api_tokens` set, `/v1/*` needs `Authorization: Bearer <token>`.
fn authorize(state: &AppState, request: &Request<Incoming>) -> Result<(), Error> {
    if state.api_tokens.is_empty() {
        return Ok(());
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .ok_or(Error::Unauthorized)?;
    // Check every token, so timing does not tell which one came close.
    let matched = state
        .api_tokens
        .iter()
        .fold(false, |found, token| token.matches(presented) | found);
    if matched {
        Ok(())
    } else {
        Err(Error::Unauthorized)
    }
}

/// What `Retry-After` tells a client turned away as overloaded.
const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

/// A request admitted among `server.max_in_flight`, with the connection its response goes
/// out on.
struct Admitted {
    slot: Slot,
    unflushed: Arc<Unflushed>,
}

impl Admitted {
    /// The response, its body holding the slot until it is written to the socket (see
    /// [`crate::admission`]); an error response built from `?` frees it at once instead.
    fn hold(self, response: Response<Body>) -> Response<Body> {
        response.map(|body| AdmittedBody::new(body, self.slot, self.unflushed).boxed_unsync())
    }
}

/// A slot among `server.max_in_flight`; none free is `503 overloaded`, decided before the
/// body is read, so shedding costs next to nothing.
fn admit(state: &AppState, unflushed: &Arc<Unflushed>) -> Result<Admitted, Error> {
    let Some(slot) = state.admission.try_admit() else {
        state.metrics.record_shed(ShedReason::InFlight);
        return Err(Error::Overloaded(OVERLOADED_RETRY_AFTER_SECS));
    };
    Ok(Admitted {
        slot,
        unflushed: Arc::clone(unflushed),
    })
}

fn body_limits(state: &AppState) -> BodyLimits {
    BodyLimits {
        max_bytes: state.max_body_bytes,
        read_timeout: state.body_read_timeout,
        max_batch: state.max_batch,
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The one place an [`Error`] becomes a response.
fn error_response(err: Error) -> Response<Body> {
    let mut response = json_response(err.status(), render::error(err.code(), &err.to_string()));
    match &err {
        Error::MethodNotAllowed { allow, .. } => {
            if let Ok(allow) = HeaderValue::from_str(allow) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
        }
        Error::Overloaded(seconds) => {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
        }
        _ => {}
    }
    response
}
