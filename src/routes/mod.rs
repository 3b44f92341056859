//! Method + path → handler. JSON in, JSON out; the lookup core does the work.

mod input;

use self::input::{BodyLimits, read_sns, refresh_requested};
use crate::admission::{AdmittedBody, Slot, Unflushed};
use crate::app::AppState;
use crate::circuit::CircuitState;
use crate::error::Error;
use crate::lookup::{Batch, Outcome, Overloaded, Source, Summary};
use crate::metrics::Current;
use crate::{health, render, sn};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
pub async fn handle(state: &AppState, request: Request<Incoming>) -> Response<Body> {
    // A lookup's deadline counts from here, reading its body included.
    let arrived = Instant::now();
    let endpoint = endpoint(request.method(), request.uri().path());
    let response = route(state, request, arrived)
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
fn endpoint(method: &Method, path: &str) -> Option<&'static str> {
    match (method, path) {
        (_, "/v1/discounts/lookup") => Some("batch"),
        (_, "/v1/discounts/invalidate") => Some("invalidate"),
        (&Method::DELETE, path) if path.starts_with(SN_PATH_PREFIX) => Some("delete"),
        (_, path) if path.starts_with(SN_PATH_PREFIX) => Some("single"),
        _ => None,
    }
}

async fn route(
    state: &AppState,
    request: Request<Incoming>,
    arrived: Instant,
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
            Ok(readyz(state).await)
        }
        "/metrics" => {
            allow(&method, route_methods(path))?;
            Ok(metrics(state))
        }
        "/openapi.yaml" => {
            allow(&method, route_methods(path))?;
            let mut response = Response::new(full(OPENAPI));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/yaml"),
            );
            Ok(response)
        }
        "/v1/discounts/lookup" => {
            allow(&method, route_methods(path))?;
            authorize(state, &request)?;
            let admitted = admit(state, &request)?;
            let response = lookup_batch(state, request, arrived).await;
            Ok(admitted.hold(response?))
        }
        "/v1/discounts/invalidate" => {
            allow(&method, route_methods(path))?;
            authorize(state, &request)?;
            let admitted = admit(state, &request)?;
            Ok(admitted.hold(invalidate(state, request).await?))
        }
        _ => match path
            .strip_prefix(SN_PATH_PREFIX)
            .filter(|raw| !raw.is_empty())
        {
            Some(raw_sn) => {
                allow(&method, route_methods(SN_ROUTE))?;
                authorize(state, &request)?;
                let admitted = admit(state, &request)?;
                let sn = sn::decode_path_segment(raw_sn)?;
                let response = if method == Method::DELETE {
                    delete_one(state, &sn).await
                } else {
                    lookup_one(state, sn, refresh_requested(&request)?, arrived).await
                };
                Ok(admitted.hold(response?))
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

/// The API description, served at `/openapi.yaml`.
const OPENAPI: &str = include_str!("../../openapi.yaml");

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
    unflushed: Option<Arc<Unflushed>>,
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
fn admit(state: &AppState, request: &Request<Incoming>) -> Result<Admitted, Error> {
    let Some(slot) = state.admission.try_admit() else {
        state.metrics.record_shed("in_flight");
        return Err(Error::Overloaded(OVERLOADED_RETRY_AFTER_SECS));
    };
    let unflushed = request.extensions().get::<Arc<Unflushed>>().cloned();
    Ok(Admitted { slot, unflushed })
}

/// The lookup's outcome, or `503 overloaded` when its fetches would pass
/// `upstream.max_pending`.
fn admitted(state: &AppState, batch: Result<Batch, Overloaded>) -> Result<Batch, Error> {
    batch.map_err(|Overloaded| {
        state.metrics.record_shed("pending");
        Error::Overloaded(OVERLOADED_RETRY_AFTER_SECS)
    })
}

/// Prometheus metrics, the values of the moment (pool, circuits, pending fetches) read now.
fn metrics(state: &AppState) -> Response<Body> {
    let cache = state.lookup.cache();
    let pool = cache.pool().unwrap_or_default();
    state.metrics.set_current(&Current {
        pending_fetches: state.lookup.pending_fetches(),
        pool_size: pool.size,
        pool_available: pool.available,
        pool_waiting: pool.waiting,
        upstream_circuit: state.lookup.upstream_circuit(),
        redis_circuit: cache.circuit(),
        local_bytes: cache.local_bytes(),
        connections_open: state.connections.in_use(),
    });
    let mut response = Response::new(full(state.metrics.encode()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

async fn readyz(state: &AppState) -> Response<Body> {
    let cache = state.lookup.cache();
    let cache_ok = cache.ping().await.is_ok();
    let circuit = state.lookup.upstream_circuit();
    let upstream = match circuit {
        CircuitState::Closed => state.health.upstream_state(),
        // Open or probing: lookups without a stale value get `upstream_unavailable`.
        CircuitState::Open | CircuitState::HalfOpen => "unavailable",
    };
    let (ready, status) = health::readiness(state.health.phase(), cache_ok, upstream);
    // `redis` is always there, for dashboards; `unused` when the in-process cache serves.
    let redis = match (cache.kind(), cache_ok) {
        ("redis", true) => "ok",
        ("redis", false) => "down",
        _ => "unused",
    };
    let body = json!({
        "status": status,
        "cache": cache.kind(),
        "redis": redis,
        "redis_circuit": cache.circuit().as_str(),
        "upstream": upstream,
        "upstream_circuit": circuit.as_str(),
        "pending_fetches": state.lookup.pending_fetches(),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(code, body.to_string().into_bytes())
}

async fn lookup_batch(
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
    let resolving = resolving.map_err(|Overloaded| {
        state.metrics.record_shed("pending");
        Error::Overloaded(OVERLOADED_RETRY_AFTER_SECS)
    })?;
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

async fn lookup_one(
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

async fn delete_one(state: &AppState, sn: &str) -> Result<Response<Body>, Error> {
    state
        .lookup
        .invalidate(&[sn])
        .await
        .map_err(|_| Error::CacheUnavailable)?;
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

async fn invalidate(state: &AppState, request: Request<Incoming>) -> Result<Response<Body>, Error> {
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
