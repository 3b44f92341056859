//! Wires the configuration into the running parts and serves them until shutdown.

use crate::admission::Admission;
use crate::cache::{Cache, MemoryCache, RedisCache, RedisSettings, TieredCache};
use crate::config::{Config, redacted_url};
use crate::health::Health;
use crate::lookup::{Lifetimes, Lookup, LookupSettings};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::upstream::{UpstreamClient, UpstreamSettings};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

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
    /// Time a client has to send its headers before it is cut off (slowloris defence).
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
    /// Every metric family, served at `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Redis cache could not be set up, for example from a URL redis-rs rejects.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The upstream client could not be built: a TLS stack failure or an unusable token.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// `server.listen` could not be bound: the address is taken or not this machine's.
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// The address that was asked for.
        addr: std::net::SocketAddr,
        /// Why the operating system refused it.
        #[source]
        source: std::io::Error,
    },
}

/// Which cache the proxy uses.
pub enum CacheChoice {
    /// Redis at `redis.url`: the production shape.
    Redis,
    /// The bounded in-process cache (`demo` without Redis).
    Memory,
    /// A cache already built (and checked) by the caller, such as `demo`'s Redis, with the
    /// metrics it reports into.
    Built {
        /// The cache.
        cache: Arc<dyn Cache>,
        /// The metrics the cache counts into; the rest of the proxy counts there too.
        metrics: Arc<Metrics>,
    },
}

impl AppState {
    /// Builds the cache, the upstream client and the lookup core from the config.
    ///
    /// # Errors
    /// A Redis URL redis-rs rejects, or a TLS stack that cannot be set up.
    pub fn build(config: &Config, choice: CacheChoice) -> Result<Arc<Self>, StartError> {
        let (cache, metrics): (Arc<dyn Cache>, _) = match choice {
            CacheChoice::Redis => {
                let metrics = Arc::new(Metrics::new());
                let redis =
                    RedisCache::new(&RedisSettings::from(&config.redis), Arc::clone(&metrics))?;
                (with_local_tier(config, redis, &metrics), metrics)
            }
            CacheChoice::Memory => (
                Arc::new(MemoryCache::new(config.cache.memory_max_entries)),
                Arc::new(Metrics::new()),
            ),
            CacheChoice::Built { cache, metrics } => (cache, metrics),
        };
        let upstream = Arc::new(UpstreamClient::new(
            &UpstreamSettings::from(&config.upstream),
            Arc::clone(&metrics),
        )?);
        let health = Arc::new(Health::default());
        let lookup = Lookup::new(
            cache,
            upstream,
            Arc::clone(&health),
            Arc::clone(&metrics),
            LookupSettings {
                lifetimes: Lifetimes {
                    ttl: config.cache.ttl,
                    stale_ttl: config.cache.stale_ttl,
                    negative_ttl: config.cache.negative_ttl,
                    early_refresh: config.cache.early_refresh,
                },
                request_timeout: config.server.request_timeout,
                max_pending: config.upstream.max_pending,
                write_batch: config.redis.chunk_size,
            },
        );
        Ok(Arc::new(Self {
            lookup,
            health,
            max_batch: config.server.max_batch,
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            api_tokens: config.server.api_tokens.clone(),
            shutdown_grace: config.server.shutdown_grace,
            header_read_timeout: config.server.header_read_timeout,
            drain_delay: config.server.drain_delay,
            admission: Admission::new(config.server.max_in_flight),
            connections: Admission::new(config.server.max_connections),
            write_timeout: config.server.write_timeout,
            metrics,
        }))
    }
}

/// Redis, with the in-process tier in front when `cache.local.enabled`.
fn with_local_tier(config: &Config, redis: RedisCache, metrics: &Arc<Metrics>) -> Arc<dyn Cache> {
    let local = &config.cache.local;
    if !local.enabled {
        return Arc::new(redis);
    }
    let tiered = TieredCache::new(
        Arc::new(redis),
        &config.redis.key_prefix,
        local.max_bytes,
        local.ttl,
        Arc::clone(metrics),
    );
    info!(
        max_bytes = local.max_bytes,
        ttl = ?local.ttl,
        channel = tiered.channel(),
        "cache: in-process tier in front of redis"
    );
    Arc::new(tiered)
}

/// Binds `server.listen`. Everything that can fail in the config has failed before this.
///
/// # Errors
/// The address is taken or not ours.
pub async fn bind(config: &Config) -> Result<TcpListener, StartError> {
    let addr = config.server.listen;
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// A proxy with its parts built and its dependencies logged, about to serve.
pub struct Prepared {
    state: Arc<AppState>,
    listener: TcpListener,
}

/// Builds the parts and logs what the proxy listens on and talks to.
///
/// # Errors
/// The parts cannot be built.
pub async fn prepare(
    config: &Config,
    listener: TcpListener,
    choice: CacheChoice,
) -> Result<Prepared, StartError> {
    let state = AppState::build(config, choice)?;
    if let Ok(local) = listener.local_addr() {
        info!(addr = %local, "listening");
    }
    log_dependencies(config, &state).await;
    Ok(Prepared { state, listener })
}

impl Prepared {
    /// Serves until `shutdown` resolves and the drain is over.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        crate::server::run(self.listener, self.state, shutdown).await;
    }
}

async fn log_dependencies(config: &Config, state: &AppState) {
    let cache = state.lookup.cache();
    match cache.kind() {
        "redis" => match cache.ping().await {
            Ok(()) => info!(url = %redacted_url(&config.redis.url), "cache: redis answers"),
            Err(err) => warn!(
                url = %redacted_url(&config.redis.url), error = %err,
                "cache: redis does not answer; lookups go to the upstream until it does"
            ),
        },
        kind => info!(
            kind,
            max_entries = config.cache.memory_max_entries,
            "cache: in-process"
        ),
    }
    info!(
        url = %redacted_url(&config.upstream.url),
        concurrency = config.upstream.concurrency,
        timeout = ?config.upstream.timeout,
        token = if config.upstream.token.is_some() { "set" } else { "none" },
        "upstream"
    );
}

/// Resolves on the next SIGTERM or Ctrl-C, for whatever the process does on it.
pub async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
