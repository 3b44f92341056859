//! discount-proxy: answers a whole batch of contract SNs at once from Redis, fetching only
//! the misses from the one-SN-per-request upstream discount service, and writing them back.
//!
//! # Layout
//!
//! - [`cli`]: command-line parsing (`serve`, `simulate-upstream`, `demo`, `warm`).
//! - [`config`]: TOML file → `DISCOUNT_PROXY_…` environment → flags, validated before binding.
//! - [`admission`]: how much is taken on at once: connections, and requests until their
//!   responses are written.
//! - [`app`]: wires config into the running parts (cache, upstream, lookup) and serves them:
//!   the one start-up path of `serve`, `demo` and the tests.
//! - [`state`]: what every request handler shares.
//! - [`server`]: accept loop, hyper connections, graceful shutdown, the per-request log line.
//! - [`routes`]: method + path → handler; JSON in, JSON out.
//! - [`error`]: the request-path error and the one place that maps it to status and code.
//! - [`health`]: the phase and dependency states `/readyz` reports.
//! - [`lookup`]: the core: dedup → cache (fresh, stale, gone) → coalesced, bounded upstream
//!   fetch → write-back.
//! - [`render`]: response bodies written straight into one buffer, cached JSON spliced in.
//! - [`sn`]: what a valid serial number is.
//! - [`cache`]: the `Cache` trait, the entry format, the Redis and in-memory backends.
//! - [`upstream`]: the HTTP client for the discount service, with retries and a circuit.
//! - [`circuit`]: the circuit breaker shared by the upstream client and the Redis cache.
//! - [`metrics`]: the Prometheus metric families, one set per proxy, served at `/metrics`.
//! - [`simulator`]: a stand-in for the upstream, for the quick start and benchmarks.
//! - [`telemetry`]: the tracing subscriber.
//! - [`retry_after`]: reading `Retry-After`, for the upstream client and `warm`.
//! - [`secret`]: a string that never shows itself in logs.
//! - [`tls`]: the crypto provider for TLS to the upstream and Redis.
//! - [`warm`]: the `warm` command, a client that sends SNs to a running proxy in batches.

pub mod admission;
pub mod app;
pub mod cache;
pub mod circuit;
pub mod cli;
pub mod config;
pub mod error;
pub mod health;
pub mod lookup;
pub mod manual;
pub mod metrics;
pub mod render;
pub mod retry_after;
pub mod routes;
pub mod secret;
pub mod server;
pub mod simulator;
pub mod sn;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod warm;
