//! What every request handler shares: the lookup core, health, metrics and the server's
//! bounds, read from the config once at start.

use crate::admission::Admission;
use crate::config::{RedisMode, ServerConfig};
use crate::health::Health;
use crate::lookup::Lookup;
use crate::metrics::Metrics;
use crate::secret::Secret;
use std::sync::Arc;
use std::time::Duration;

/// Everything a request handler needs, shared by all connections.
pub struct AppState {
    /// The lookup core that answers every batch, single GET and invalidation.
    pub lookup: Lookup,
    /// The phase and dependency states that `/readyz` reports.
    pub health: Arc<Health>,
    /// Most SNs in one request (`server.max_batch`); more is `413 batch_too_large`.
    pub max_batch: usize,
    /// Largest request body (`server.max_body_bytes`); more is `413 payload_too_large`.
    pub max_body_bytes: usize,
    /// Time a request body has to arrive (`server.body_read_timeout`); else `408`.
    pub body_read_timeout: Duration,
    /// Bearer tokens accepted on `/v1/*` (`server.api_tokens`); empty means no auth.
    pub api_tokens: Vec<Secret>,
    /// Time after SIGTERM for in-flight requests and write-backs (`server.shutdown_grace`).
    pub shutdown_grace: Duration,
    /// Time a client has to send its request head before it is cut off (slowloris defence).
    pub header_read_timeout: Duration,
    /// After SIGTERM, how long to keep serving while `/readyz` says 503 (`server.drain_delay`).
    pub drain_delay: Duration,
    /// One slot per `/v1/*` request being answered, until its response is written
    /// (`server.max_in_flight`); none left means `503 overloaded`.
    pub admission: Admission,
    /// One place per open client connection (`server.max_connections`).
    pub connections: Admission,
    /// A response the client takes no bytes of for this long is abandoned and its
    /// connection closed (`server.write_timeout`).
    pub write_timeout: Duration,
    /// Smallest JSON response compressed for a client that accepts it
    /// (`server.compress_min_bytes`).
    pub compress_min_bytes: usize,
    /// Every metric family, served at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The kind of Redis deployment (`redis.mode`), for `/readyz`.
    pub redis_mode: RedisMode,
}

impl AppState {
    /// The shared state of a proxy whose parts are built: `server` supplies its bounds.
    pub fn new(
        server: &ServerConfig,
        redis_mode: RedisMode,
        lookup: Lookup,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            lookup,
            health,
            max_batch: server.max_batch,
            max_body_bytes: server.max_body_bytes,
            body_read_timeout: server.body_read_timeout,
            api_tokens: server.api_tokens.clone(),
            shutdown_grace: server.shutdown_grace,
            header_read_timeout: server.header_read_timeout,
            drain_delay: server.drain_delay,
            admission: Admission::new(server.max_in_flight),
            connections: Admission::new(server.max_connections),
            write_timeout: server.write_timeout,
            compress_min_bytes: server.compress_min_bytes,
            metrics,
            redis_mode,
        }
    }
}
