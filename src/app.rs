//! Wires the configuration into the running parts and serves them until shutdown: the one
//! start-up path of `serve`, `demo` and the integration tests, so each runs the same proxy.

use crate::cache::{Cache, MemoryCache, RedisCache, TieredCache};
use crate::config::{Config, redacted_url};
use crate::health::Health;
use crate::lookup::{Distributed, Lifetimes, Lookup, LookupSettings};
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::upstream::{UpstreamClient, UpstreamSettings};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{info, warn};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheChoice {
    /// Redis at `redis.url` (with the in-process tier when `cache.local.enabled`): the
    /// production shape. A Redis that is down at start is degraded, never a failed start.
    Redis,
    /// Redis if it answers now, else the bounded in-process cache: `demo` on a laptop.
    RedisIfAnswering,
    /// The bounded in-process cache only.
    Memory,
}

/// Builds every part from the config: metrics, cache, upstream client, lookup core.
///
/// # Errors
/// A Redis URL redis-rs rejects, or a TLS stack that cannot be set up.
pub async fn build(config: &Config, choice: CacheChoice) -> Result<Arc<AppState>, StartError> {
    let metrics = Arc::new(Metrics::new());
    let (cache, redis) = build_cache(config, choice, &metrics).await?;
    let distributed = redis
        .filter(|_| config.coalesce.distributed)
        .map(|redis| {
            redis.coordinate();
            info!(lease_ttl = ?config.coalesce.lease_ttl, "coalescing with the instances sharing redis");
            Distributed {
                coordination: redis,
                lease_ttl: config.coalesce.lease_ttl,
            }
        });
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
        distributed,
    );
    Ok(Arc::new(AppState::new(
        &config.server,
        config.redis.mode,
        lookup,
        health,
        metrics,
    )))
}

/// The cache lookups use, and the Redis behind it (if any).
type Built = (Arc<dyn Cache>, Option<Arc<RedisCache>>);

async fn build_cache(
    config: &Config,
    choice: CacheChoice,
    metrics: &Arc<Metrics>,
) -> Result<Built, StartError> {
    let memory = || -> Built {
        info!(
            max_entries = config.cache.memory_max_entries,
            "cache: in-process"
        );
        (
            Arc::new(MemoryCache::new(config.cache.memory_max_entries)),
            None,
        )
    };
    if choice == CacheChoice::Memory {
        return Ok(memory());
    }
    let redis = match RedisCache::new(&config.redis, Arc::clone(metrics)) {
        Ok(redis) => Arc::new(redis),
        Err(err) if choice == CacheChoice::RedisIfAnswering => {
            warn!(error = %err, "redis URL unusable; using the in-process cache");
            return Ok(memory());
        }
        Err(err) => return Err(err.into()),
    };
    let url = redacted_url(&config.redis.url);
    match redis.ping().await {
        Ok(()) => info!(url = %url, "cache: redis answers"),
        Err(err) if choice == CacheChoice::RedisIfAnswering => {
            warn!(url = %url, error = %err, "redis does not answer; using the in-process cache");
            return Ok(memory());
        }
        Err(err) => warn!(
            url = %url, error = %err,
            "cache: redis does not answer; lookups go to the upstream until it does"
        ),
    }
    Ok((with_local_tier(config, &redis, metrics), Some(redis)))
}

/// Redis, with the in-process tier in front when `cache.local.enabled`.
fn with_local_tier(
    config: &Config,
    redis: &Arc<RedisCache>,
    metrics: &Arc<Metrics>,
) -> Arc<dyn Cache> {
    let local = &config.cache.local;
    if !local.enabled {
        return Arc::clone(redis) as Arc<dyn Cache>;
    }
    let tiered = TieredCache::new(
        Arc::clone(redis),
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
    let state = build(config, choice).await?;
    if let Ok(local) = listener.local_addr() {
        info!(addr = %local, "listening");
    }
    info!(
        url = %redacted_url(&config.upstream.url),
        concurrency = config.upstream.concurrency,
        timeout = ?config.upstream.timeout,
        token = if config.upstream.token.is_some() { "set" } else { "none" },
        "upstream"
    );
    Ok(Prepared { state, listener })
}

impl Prepared {
    /// The state the proxy serves with, for a caller that watches it (the tests).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` resolves and the drain is over.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        crate::server::run(self.listener, self.state, shutdown).await;
    }
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
