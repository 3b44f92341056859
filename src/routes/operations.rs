//! The operational endpoints: liveness, readiness, metrics and the API description.

use super::{Body, full, json_response};
use crate::cache::CacheKind;
use crate::circuit::CircuitState;
use crate::health::{self, RedisState, UpstreamState};
use crate::metrics::Current;
use crate::state::AppState;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

/// The API description, served at `/openapi.yaml`.
const OPENAPI: &str = include_str!("../../openapi.yaml");

pub(super) fn openapi() -> Response<Body> {
    let mut response = Response::new(full(OPENAPI));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml"),
    );
    response
}

/// Prometheus metrics, the values of the moment (pool, circuits, pending fetches) read now.
pub(super) fn metrics(state: &AppState) -> Response<Body> {
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

pub(super) async fn readyz(state: &AppState) -> Response<Body> {
    let cache = state.lookup.cache();
    let cache_ok = cache.ping().await.is_ok();
    let circuit = state.lookup.upstream_circuit();
    let upstream = match circuit {
        CircuitState::Closed => state.health.upstream_state(),
        // Open or probing: lookups without a stale value get `upstream_unavailable`.
        CircuitState::Open | CircuitState::HalfOpen => UpstreamState::Unavailable,
    };
    let (ready, status) = health::readiness(state.health.phase(), cache_ok, upstream);
    // `redis` is always there, for dashboards; `unused` when the in-process cache serves.
    let redis = match (cache.kind(), cache_ok) {
        (CacheKind::Redis, true) => RedisState::Ok,
        (CacheKind::Redis, false) => RedisState::Down,
        (CacheKind::Memory, _) => RedisState::Unused,
    };
    let body = json!({
        "status": status,
        "cache": cache.kind(),
        "redis": redis,
        "redis_circuit": cache.circuit().as_str(),
        "redis_mode": state.redis_mode,
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
